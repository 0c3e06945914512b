"""THE training loop: ``train_and_evaluate(config, workdir)`` for every task.

Flow: resolve the workdir and lock it → validate the config (one :class:`~moe_jax.errors.ConfigError`
naming the field) → mesh and sharding rules → the task's data and model → optimizer → resume from the
newest readable checkpoint that matches this run (task, data, tokenizer, model) or start fresh → train
(gradient accumulation, per-process input, non-finite policy, progress line, ``metrics.jsonl``,
TensorBoard, validation, checkpoints; SIGINT/SIGTERM save the current step and stop) → final validation
and test evaluation, the task's predictions and scores, ``final_metrics.json``, ``routing.png``.

``mode='eval'`` evaluates the newest checkpoint without training and writes ``eval_metrics.json`` only:
it never saves a checkpoint or rewrites ``metrics.jsonl`` / ``final_metrics.json``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from moe_jax import sharding
from moe_jax.errors import ConfigError, NonFiniteLossError, RunInterrupted
from moe_jax.tasks import get_task
from moe_jax.tasks.base import model_identity
from moe_jax.train import optim
from moe_jax.train import step as step_lib
from moe_jax.train.checkpoint import Checkpointer, identity_differences
from moe_jax.train.lock import WorkdirLock
from moe_jax.train.logging import RunLogger
from moe_jax.train.workdir import resolve_workdir


def data_parallel_size(mesh: jax.sharding.Mesh, rules) -> int:
    """How many ways the batch dim is split (product of the mesh axes ``act_batch`` maps to)."""
    spec = sharding.logical_to_spec(("act_batch",), rules, mesh.axis_names)
    axes = spec[0] if spec else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    return int(np.prod([sizes[a] for a in axes])) if axes else 1


def _int_field(section, path: str, name: str, *, minimum: int, fix: str = "") -> int:
    value = section.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config.{path}.{name}={value!r} must be an integer >= {minimum}{fix}")
    return value


def validate_config(config, task=None) -> tuple[jax.sharding.Mesh, Any]:
    """Checks the values every run depends on (and the task's own); returns ``(mesh, rules)``.

    Raises:
        ConfigError: naming the field and the fix.
    """
    task = task or get_task(config)
    lr = config.optim.learning_rate
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
        raise ConfigError(
            f"config.optim.learning_rate={lr!r} must be > 0 (e.g. --config.optim.learning_rate=1e-3)"
        )
    _int_field(config.optim, "optim", "warmup_steps", minimum=0)
    if config.optim.get("grad_accum_steps") is not None:
        _int_field(config.optim, "optim", "grad_accum_steps", minimum=1)
    t = config.train
    _int_field(t, "train", "num_train_steps", minimum=0)
    if t.get("nonfinite", "stop") not in ("stop", "skip"):
        raise ConfigError(f"config.train.nonfinite={t.nonfinite!r} must be 'stop' or 'skip'")
    for name in ("log_every", "eval_every", "checkpoint_every"):
        _int_field(t, "train", name, minimum=0, fix=" (0 turns it off)")
    _check_profile_steps(t.get("profile_steps"))
    _int_field(t, "train", "keep_checkpoints", minimum=1, fix=" (older checkpoints beyond it are deleted)")
    try:
        rules = sharding.preset_rules(config.sharding.preset)
        mesh = sharding.make_mesh(dict(config.sharding.mesh))
    except ValueError as e:
        raise ConfigError(f"config.sharding: {e}") from None
    dp = data_parallel_size(mesh, rules)
    for field, bs in (("train.batch_size", t.batch_size), ("eval.batch_size", config.eval.batch_size)):
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1 or bs % dp:
            raise ConfigError(
                f"config.{field}={bs!r} must be a positive multiple of the {dp} data-parallel devices "
                f"(mesh {dict(zip(mesh.axis_names, mesh.devices.shape))}); set --config.{field}="
                f"{max(dp, int(bs) // dp * dp or dp) if isinstance(bs, int) else dp}"
            )
    task.validate(config, data_parallel=dp)
    return mesh, rules


_SUMS = ("loss_sum", "correct_sum", "weight_sum", "byte_sum")


class Run:
    """Placement and compiled functions of one run (what the task's predictions and the loop share)."""

    def __init__(self, config, task, graphdef, state_sh, mesh, rules, data):
        self.config, self.task, self.graphdef, self.state_sh, self.data = (
            config,
            task,
            graphdef,
            state_sh,
            data,
        )
        self.batch_sh = NamedSharding(mesh, sharding.logical_to_spec(("act_batch",), rules, mesh.axis_names))
        self.eval_fn = step_lib.jit_eval_step(graphdef, state_sh, self.batch_sh, loss_sums=task.loss_sums)

    def put(self, array) -> jax.Array:
        """A host batch array placed on the mesh (this process's rows)."""
        return jax.make_array_from_process_local_data(self.batch_sh, np.asarray(array))

    def evaluate(self, state, split: str, prefix: str) -> dict[str, Any]:
        """Loss, accuracy (and perplexity for token tasks) on ``split``, plus routing metrics averaged
        over its batches (``<prefix>/moe/<layer>/<metric>``)."""
        cfg = self.config.eval
        totals, routing, batches = np.zeros(4), {}, 0
        for batch in self.data.eval_batches(
            split, int(cfg.batch_size), max_examples=cfg.get("max_eval_examples")
        ):
            out = jax.device_get(self.eval_fn(state, {k: self.put(batch[k]) for k in self.task.eval_keys}))
            totals += [float(out[k]) if k in out else 0.0 for k in _SUMS]
            batches += 1
            for k, v in out.items():
                if k.startswith("moe/") and "/expert_count_" not in k:
                    routing[k] = routing.get(k, 0.0) + np.asarray(v, np.float64)
        n = max(totals[2], 1.0)
        metrics = {f"{prefix}_loss": totals[0] / n, f"{prefix}_accuracy": totals[1] / n}
        if self.task.token_level:
            metrics[f"{prefix}_perplexity"] = float(np.exp(min(totals[0] / n, 50.0)))
        if totals[3] > 0:  # the task counts the bytes its tokens stand for
            metrics[f"{prefix}_bits_per_byte"] = totals[0] / (np.log(2.0) * totals[3])
        metrics.update({f"{prefix}/{k}": (v / max(batches, 1)).tolist() for k, v in routing.items()})
        return metrics


class _StopSignals:
    """SIGINT / SIGTERM (a preemption): before training starts they stop the run at once (nothing to save);
    once ``training`` is set they only set a flag that the loop checks at every step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self.training = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.training:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _nonfinite_message(step: int, metrics) -> str:
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not bool(metrics["loss_finite"]):
        return f"non-finite loss at step {step} (loss={loss})"
    return f"non-finite gradient at step {step} (grad_norm={grad_norm}; the loss {loss:.4f} was finite)"


def train_and_evaluate(
    config, workdir: str, *, data=None, stream=None, mode: str = "train"
) -> dict[str, Any]:
    """Trains and evaluates any task; re-running with the same workdir resumes from the newest good step.

    Args:
        config: the run's ``ConfigDict`` (``configs/<task>.py``); ``config.task`` picks the task.
        workdir: checkpoints, ``metrics.jsonl``, TensorBoard events, plots and ``final_metrics.json`` go here
            (relative paths and ``~`` are resolved here).
        data: ready data following the task's data contract (tests, experiments); default: from the config.
        stream: where progress lines and samples go (default stdout).
        mode: ``train`` (resume, train, evaluate) or ``eval`` (evaluate the newest checkpoint only).

    Returns:
        The final metrics: ``val_loss``, ``val_accuracy`` (``val_perplexity``), ``test_loss``,
        ``test_accuracy``, the task's scores (BLEU / ROUGE / VQA), routing averages, ``train_seconds``.

    Raises:
        ConfigError: bad config, unusable workdir or checkpoint, missing data, a failed checkpoint write.
        NonFiniteLossError: a non-finite loss with ``train.nonfinite='stop'`` (the last good checkpoint is
            kept).
        RunInterrupted: SIGINT / SIGTERM; the current step was checkpointed first.
    """
    if mode not in ("train", "eval"):
        raise ConfigError(f"--mode={mode!r} must be 'train' or 'eval'")
    evaluating = mode == "eval"
    workdir = resolve_workdir(workdir, create=not evaluating)
    if evaluating and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} does not exist: nothing to evaluate (train first)")
    task = get_task(config)
    mesh, rules = validate_config(config, task)
    with WorkdirLock(workdir), _StopSignals() as signals:
        return _run(config, task, workdir, mesh, rules, data, stream, evaluating, signals)


def _run(config, task, workdir, mesh, rules, data, stream, evaluating, signals) -> dict[str, Any]:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if evaluating and not os.path.isdir(ckpt_dir):
        raise ConfigError(f"--workdir={workdir} holds no checkpoint: nothing to evaluate (train first)")
    if os.path.isdir(ckpt_dir):
        # Another run's workdir is refused before its data is prepared or its model built.
        early = Checkpointer(ckpt_dir, keep=config.train.keep_checkpoints, async_save=False)
        try:
            early.check_identity(task.identity(config))
        finally:
            early.close()
    data = task.load_data(config) if data is None else data
    t_cfg = config.train
    total_steps = int(t_cfg.num_train_steps)
    accum = int(config.optim.get("grad_accum_steps", 1) or 1)
    identity = task.identity(config, data)
    say = lambda msg: print(msg, file=stream, flush=True)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = task.build_model(config, data)
        # The schedule counts optimizer updates: one per `accum` micro-steps.
        try:
            tx, schedule = optim.make_optimizer(config.optim, max(total_steps // accum, 1))
        except ValueError as e:
            raise ConfigError(f"config.{e}") from None
        graphdef, state = step_lib.create_train_state(model, tx)
        del model
        try:
            state_sh = sharding.state_shardings(state, mesh, rules)
        except ValueError as e:
            raise ConfigError(f"config.model / config.sharding: {e}") from None
        train_iter = data.train_iter(
            int(t_cfg.batch_size) // jax.process_count(),
            seed=int(config.seed),
            shard_index=jax.process_index(),
            num_shards=jax.process_count(),
        )
        ckpt = Checkpointer(
            ckpt_dir,
            keep=config.train.keep_checkpoints,
            async_save=bool(t_cfg.get("async_checkpoints", True)),
            report=lambda msg: say(f"warning: {msg}"),
        )
        try:
            restored = ckpt.restore_latest(state, state_sh, identity=identity, data_iter=train_iter)
        except BaseException:
            ckpt.close()
            raise
        if restored is None:
            if evaluating:
                ckpt.close()
                raise ConfigError(
                    f"--workdir={workdir} holds no checkpoint: nothing to evaluate (train first)"
                )
            start_step, state = 0, jax.device_put(_initial_state(config, workdir, state, say), state_sh)
        else:
            start_step, state, _ = restored
            say(f"resumed from checkpoint step {start_step} in {ckpt.directory}")
        if evaluating:
            total_steps = start_step
        run = Run(config, task, graphdef, state_sh, mesh, rules, data)
        logger = RunLogger(
            workdir,
            total_steps,
            start_step,
            tensorboard=bool(t_cfg.get("tensorboard", True)) and not evaluating,
            stream=stream,
            read_only=evaluating,
        )
        config_json = json.loads(config.to_json_best_effort())
        saved = {start_step} if restored is not None else set()

        def save(step, val_loss=None):
            if step in saved:
                return
            meta = {"step": step, **identity}
            _keep_tokenizer(data, workdir)
            ckpt.save(step, state, config=config_json, meta=meta, data_iter=train_iter, val_loss=val_loss)
            saved.add(step)

        def stop_if_signalled(step):
            if signals.signum is not None:
                if not evaluating:
                    save(step)
                ckpt.wait()
                raise RunInterrupted(signals.signum, step, saved=not evaluating)

        profiler = _Profiler(None, workdir, say)
        try:
            if start_step == 0 and not evaluating:
                at_start = task.at_start(run, state, stream=stream)
                if at_start:
                    logger.log_eval(0, at_start, prefix="decode")
            train_fn = step_lib.jit_train_step(
                graphdef,
                state_sh,
                run.batch_sh,
                loss_sums=task.loss_sums,
                schedule=lambda s: schedule(s // accum),
                seed=int(config.seed),
                lb_weight=float(config.loss.lb_weight),
                z_weight=float(config.loss.z_weight),
            )
            profiler = _Profiler(t_cfg.get("profile_steps"), workdir, say)
            tokens, last_good, t0 = 0.0, start_step, time.time()
            signals.training = True
            for step in range(start_step + 1, total_steps + 1):
                ckpt.check()  # a failed background save ends the run now, not at the next save
                stop_if_signalled(step - 1)
                batch = next(train_iter)
                tokens += task.count_tokens(batch)
                profiler.before(step)
                state, metrics = train_fn(state, {k: run.put(batch[k]) for k in task.train_keys})
                profiler.after(step, metrics)
                if not bool(metrics["finite"]):
                    msg = _nonfinite_message(step, metrics)
                    if t_cfg.get("nonfinite", "stop") == "stop":
                        raise NonFiniteLossError(
                            f"{msg}; stopped, the last good checkpoint is step {last_good}; lower "
                            f"config.optim.learning_rate or set config.train.nonfinite='skip'"
                        )
                    say(f"warning: {msg}; update skipped")
                if t_cfg.log_every and (step % t_cfg.log_every == 0 or step == total_steps):
                    logger.log_train(step, jax.device_get(metrics), tokens=tokens)
                    tokens = 0.0
                val = None
                if t_cfg.eval_every and step % t_cfg.eval_every == 0 and step != total_steps:
                    val = run.evaluate(state, "validation", "val")
                    logger.log_eval(step, val)
                if t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0 and step != total_steps:
                    save(step, None if val is None else val["val_loss"])
                    last_good = step
            train_seconds = time.time() - t0
            stop_if_signalled(total_steps)
            final = run.evaluate(state, "validation", "val")
            if not evaluating and (total_steps > start_step or not ckpt.steps()):
                save(total_steps, final["val_loss"])
            stop_if_signalled(total_steps)
            final.update(run.evaluate(state, "test", "test"))
            final.update(task.predict_and_score(run, state, "test", stream=stream))
            if not evaluating:
                final["train_seconds"] = train_seconds
            logger.log_eval(max(total_steps, start_step), final, prefix="final")
        finally:
            profiler.close()
            ckpt.close()
            logger.close()
        if not evaluating:
            plot = logger.plot_routing()
            if plot:
                say(f"routing plot: {plot}")
            task.after_run(run, final, workdir)
        name = "eval_metrics.json" if evaluating else "final_metrics.json"
        _write_json_atomic(os.path.join(workdir, name), final)
        return final


def _check_profile_steps(value) -> None:
    """``config.train.profile_steps``: None, or ``(first, last)`` training steps, 1 <= first <= last."""
    if value is None:
        return
    ok = (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 1 <= value[0] <= value[1]
    )
    if not ok:
        raise ConfigError(
            f"config.train.profile_steps={value!r} must be None or (first, last) steps with 1 <= first <= "
            "last (e.g. --config.train.profile_steps='(10, 12)')"
        )


class _Profiler:
    """A ``jax.profiler`` trace of training steps ``first..last`` into ``WORKDIR/profile`` (TensorBoard's
    profile plugin and Perfetto read it); does nothing without ``profile_steps``."""

    def __init__(self, steps, workdir: str, say):
        self.first, self.last = steps if steps else (None, None)
        self.dir, self.say, self.active = os.path.join(workdir, "profile"), say, False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after(self, step: int, metrics) -> None:
        if self.active and step == self.last:
            jax.block_until_ready(metrics)  # the trace must hold the whole last step
            self.close()
            self.say(
                f"profile of steps {self.first}-{self.last}: {self.dir} (tensorboard --logdir={self.dir})"
            )

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def _initial_state(config, workdir: str, state, say):
    """The step-0 state: ``WORKDIR/init_params.safetensors`` when present (``moe_jax.convert``), else random.

    Raises:
        ConfigError: the file was written for another model (naming the field), or does not fit it.
    """
    from moe_jax.train import init_params

    found = init_params.read_init_params(workdir)
    if found is None:
        return state
    saved, params = found
    where = os.path.join(workdir, init_params.INIT_PARAMS)
    diffs = identity_differences({"model": saved.get("model", {})}, {"model": model_identity(config.model)})
    if diffs:
        raise ConfigError(
            f"{where} was written for another model ({'; '.join(diffs[:3])}); run with the config it was "
            "converted with, or use a new --workdir"
        )
    try:
        state = init_params.apply_init_params(state, params, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    say(f"starting from the parameters in {where}")
    return state


def _keep_tokenizer(data, workdir: str) -> None:
    """Copies the run's SentencePiece model to ``WORKDIR/tokenizer.model`` beside its checkpoints (generation
    reads it there; the prepared-data cache may be gone by then)."""
    proto = getattr(getattr(data, "tokenizer", None), "model_proto", None)
    path = os.path.join(workdir, "tokenizer.model")
    if proto is None or os.path.exists(path):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(proto)
    os.replace(tmp, path)


def _write_json_atomic(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)
