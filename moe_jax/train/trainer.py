"""``train_and_evaluate(config, workdir)``: the whole run, resumable, with evaluation and decoding.

Flow: validate the config (fail fast, :class:`~moe_jax.errors.ConfigError`) → mesh and sharding rules →
data → model and optimizer → resume from the newest readable checkpoint of the workdir (or start fresh) →
train with periodic logging, validation and checkpoints → final validation, greedy and beam decoding of the
test split with BLEU (translation) or ROUGE (summarization), sample outputs printed → routing plot.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from moe_jax import sharding
from moe_jax.errors import ConfigError, NonFiniteLossError
from moe_jax.models import ModelConfig, Seq2SeqTransformer
from moe_jax.train import decode as decode_lib
from moe_jax.train import optim
from moe_jax.train import step as step_lib
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.logging import RunLogger
from moe_jax.train.workdir import resolve_workdir

log = logging.getLogger(__name__)


def _cfg_get(section, name, default=None):
    value = section.get(name, default) if hasattr(section, "get") else getattr(section, name, default)
    return default if value is None else value


def model_config_dict(config) -> dict[str, Any]:
    """The model section as plain JSON values (what checkpoints record to detect a changed model)."""
    return json.loads(json.dumps(config.model.to_dict(), default=str))


def data_parallel_size(mesh: jax.sharding.Mesh, rules) -> int:
    """How many ways the batch dim is split (product of the mesh axes ``act_batch`` maps to)."""
    spec = sharding.logical_to_spec(("act_batch",), rules, mesh.axis_names)
    axes = spec[0] if spec else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    return int(np.prod([sizes[a] for a in axes])) if axes else 1


def validate_config(config) -> tuple[jax.sharding.Mesh, Any]:
    """Checks the values a run depends on; returns ``(mesh, rules)``.

    Raises:
        ConfigError: naming the field and the fix.
    """
    m = config.model
    if not isinstance(m.num_experts, int) or m.num_experts < 1:
        raise ConfigError(f"config.model.num_experts={m.num_experts!r} must be a positive integer")
    if not isinstance(m.top_k, int) or not 1 <= m.top_k <= m.num_experts:
        raise ConfigError(
            f"config.model.top_k={m.top_k!r} must be in [1, num_experts={m.num_experts}]; lower "
            f"--config.model.top_k or raise --config.model.num_experts"
        )
    if m.d_model % m.num_heads and not m.get("head_dim"):
        raise ConfigError(f"config.model.d_model={m.d_model} must be divisible by num_heads={m.num_heads}")
    lr = config.optim.learning_rate
    if not isinstance(lr, int | float) or not lr > 0:
        raise ConfigError(
            f"config.optim.learning_rate={lr!r} must be > 0 (e.g. --config.optim.learning_rate=1e-3)"
        )
    if config.optim.get("warmup_steps", 0) < 0:
        raise ConfigError(f"config.optim.warmup_steps={config.optim.warmup_steps} must be >= 0")
    if int(config.optim.get("grad_accum_steps", 1) or 1) < 1:
        raise ConfigError("config.optim.grad_accum_steps must be >= 1")
    t = config.train
    if t.num_train_steps < 0:
        raise ConfigError(f"config.train.num_train_steps={t.num_train_steps} must be >= 0")
    if t.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"config.train.nonfinite={t.nonfinite!r} must be 'stop' or 'skip'")
    for name in ("log_every", "eval_every", "checkpoint_every"):
        if t[name] < 0:
            raise ConfigError(f"config.train.{name}={t[name]} must be >= 0 (0 turns it off)")
    try:
        rules = sharding.preset_rules(config.sharding.preset)
        mesh = sharding.make_mesh(dict(config.sharding.mesh))
    except ValueError as e:
        raise ConfigError(f"config.sharding: {e}") from None
    dp = data_parallel_size(mesh, rules)
    for field, bs in (("train.batch_size", t.batch_size), ("eval.batch_size", config.eval.batch_size)):
        if bs < 1 or bs % dp:
            raise ConfigError(
                f"config.{field}={bs} must be a positive multiple of the {dp} data-parallel devices "
                f"(mesh {dict(zip(mesh.axis_names, mesh.devices.shape))}); set --config.{field}="
                f"{max(dp, bs // dp * dp or dp)}"
            )
    return mesh, rules


def build_model(config, *, vocab_size: int, bos_id: int, seed: int) -> Seq2SeqTransformer:
    """The seq2seq model of ``config.model`` (its ValueErrors become ConfigErrors)."""
    try:
        cfg = ModelConfig.from_mapping(config.model.to_dict(), vocab_size=vocab_size)
        return Seq2SeqTransformer(cfg, bos_id=bos_id, rngs=nnx.Rngs(params=seed))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None


def _data_dir(config) -> str:
    d = config.get("data_dir") or os.environ.get("MOE_JAX_DATA_DIR") or "~/.cache/moe_jax/data"
    return os.path.expanduser(d)


def load_data(config):
    """The run's :class:`~moe_jax.data.pipeline.Seq2SeqData` (missing data → ConfigError)."""
    if config.data.source == "synthetic":
        from moe_jax.train.synthetic import make_synthetic_data

        return make_synthetic_data(config.data, seed=config.seed)
    from moe_jax.data import DatasetUnavailableError, make_seq2seq_data

    try:
        return make_seq2seq_data(config.data, data_dir=_data_dir(config), seed=config.seed)
    except DatasetUnavailableError as e:
        raise ConfigError(str(e)) from None


def _text_metrics(task: str, hyps: list[str], refs: list[str]) -> dict[str, float]:
    try:
        from moe_jax.train import metrics_text
    except ImportError:  # the helper module is optional; sacrebleu/rouge-score do the same
        metrics_text = None
    if task == "summarization":
        if metrics_text is not None:
            return {k: float(v) for k, v in metrics_text.rouge(hyps, refs).items()}
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        scores = [scorer.score(r, h) for h, r in zip(hyps, refs)]
        return {
            k: 100 * float(np.mean([s[k].fmeasure for s in scores])) for k in ("rouge1", "rouge2", "rougeL")
        }
    if metrics_text is not None:
        return {"bleu": float(metrics_text.bleu(hyps, refs))}
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score)}


class _Run:
    """Compiled functions and placement for one run (kept together so evaluation can reuse them)."""

    def __init__(self, config, graphdef, state_sh, mesh, rules, data):
        self.config, self.graphdef, self.mesh, self.rules, self.data = config, graphdef, mesh, rules, data
        spec = sharding.logical_to_spec(("act_batch",), rules, mesh.axis_names)
        self.batch_sh = NamedSharding(mesh, spec)
        self.eval_fn = step_lib.jit_eval_step(
            graphdef, state_sh, self.batch_sh, label_smoothing=float(config.loss.label_smoothing)
        )
        tok = data.tokenizer
        max_len = int(config.eval.get("max_decode_len") or config.data.max_target_len)

        def greedy(state, inputs):
            model, _ = nnx.merge(graphdef, state)
            return decode_lib.greedy_decode(
                model, inputs, max_len=max_len, bos_id=tok.bos_id, eos_id=tok.eos_id
            )

        def beam(state, inputs):
            model, _ = nnx.merge(graphdef, state)
            return decode_lib.beam_search(
                model,
                inputs,
                beam_size=int(config.eval.beam_size),
                max_len=max_len,
                bos_id=tok.bos_id,
                eos_id=tok.eos_id,
                alpha=float(config.eval.length_penalty),
            )

        self.greedy_fn = jax.jit(greedy, in_shardings=(state_sh, self.batch_sh))
        self.beam_fn = jax.jit(beam, in_shardings=(state_sh, self.batch_sh))

    def put(self, array: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self.batch_sh, np.asarray(array))

    def validate(self, state) -> dict[str, float]:
        """Validation loss, token accuracy and perplexity (padding rows weigh nothing)."""
        totals = np.zeros(3)
        for batch in self.data.eval_batches(
            "validation",
            int(self.config.eval.batch_size),
            max_examples=self.config.eval.get("max_eval_examples"),
        ):
            out = self.eval_fn(state, {k: self.put(batch[k]) for k in ("inputs", "targets", "weights")})
            totals += np.array([float(out["loss_sum"]), float(out["correct_sum"]), float(out["num_tokens"])])
        n = max(totals[2], 1.0)
        return {
            "val_loss": float(totals[0] / n),
            "val_accuracy": float(totals[1] / n),
            "val_perplexity": float(np.exp(min(totals[0] / n, 50.0))),
        }

    def decode_and_score(self, state, split: str = "test", *, beam: bool = True, stream=None) -> dict:
        """Greedy (and beam) decoding of ``split`` with BLEU/ROUGE; prints a few samples."""
        cfg, tok = self.config.eval, self.data.tokenizer
        hyps = {"greedy": [], "beam": []} if beam else {"greedy": []}
        refs, srcs = [], []
        if not cfg.max_decode_examples:
            return {}
        for batch in self.data.eval_batches(split, int(cfg.batch_size), max_examples=cfg.max_decode_examples):
            keep = np.asarray(batch["weights"]) > 0
            inputs = self.put(batch["inputs"])
            for name in hyps:
                fn = self.greedy_fn if name == "greedy" else self.beam_fn
                out = decode_lib.to_token_lists(jax.device_get(fn(state, inputs)), tok.eos_id)
                hyps[name] += [tok.decode(ids) for ids, k in zip(out, keep) if k]
            refs += [t for t, k in zip(batch["targets_text"], keep) if k]
            srcs += [t for t, k in zip(batch["inputs_text"], keep) if k]
        task = self.config.get("task", "translation")
        metrics = {}
        for name, h in hyps.items():
            metrics.update({f"{name}_{k}": v for k, v in _text_metrics(task, h, refs).items()})
        for i in range(min(int(cfg.num_samples), len(refs))):
            print(
                f"--- sample {i}\n  input:  {srcs[i][:200]}\n  target: {refs[i][:200]}\n"
                + "".join(f"  {name}: {h[i][:200]}\n" for name, h in hyps.items()),
                file=stream,
                end="",
                flush=True,
            )
        return metrics


def train_and_evaluate(config, workdir: str, *, data=None) -> dict[str, Any]:
    """Trains and evaluates; re-running with the same workdir resumes from the newest good checkpoint.

    Args:
        config: the run's ``ConfigDict`` (see ``configs/translation.py``).
        workdir: checkpoints, ``metrics.jsonl``, TensorBoard events, ``routing.png`` and
            ``final_metrics.json`` go here.
        data: a ready :class:`~moe_jax.data.pipeline.Seq2SeqData` (tests, the quick API); default: built from
            ``config.data``.

    Returns:
        The final metrics (``val_loss``, ``val_accuracy``, BLEU or ROUGE of greedy and beam decoding, ...).

    Raises:
        ConfigError: bad config, unusable workdir or checkpoint, missing data.
        NonFiniteLossError: a non-finite loss with ``train.nonfinite='stop'`` (the last good checkpoint is
            kept).
    """
    workdir = resolve_workdir(workdir)
    mesh, rules = validate_config(config)
    data = load_data(config) if data is None else data
    t_cfg = config.train
    total_steps = int(t_cfg.num_train_steps)
    accum = int(config.optim.get("grad_accum_steps", 1) or 1)
    model_dict = model_config_dict(config)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = build_model(
            config, vocab_size=data.tokenizer.vocab_size, bos_id=data.tokenizer.bos_id, seed=config.seed
        )
        tx, schedule = optim.make_optimizer(config.optim, max(total_steps // accum, 1))
        graphdef, state = step_lib.create_train_state(model, tx)
        del model
        try:
            state_sh = sharding.state_shardings(state, mesh, rules)
        except ValueError as e:
            raise ConfigError(f"config.model / config.sharding: {e}") from None
        train_iter = data.train_iter(
            int(t_cfg.batch_size),
            seed=int(config.seed),
            shard_index=jax.process_index(),
            num_shards=jax.process_count(),
        )
        ckpt = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=int(t_cfg.keep_checkpoints),
            async_save=bool(t_cfg.get("async_checkpoints", True)),
            report=lambda msg: print(f"warning: {msg}", flush=True),
        )
        restored = ckpt.restore_latest(state, state_sh, model_config=model_dict, data_iter=train_iter)
        if restored is None:
            start_step, state = 0, jax.device_put(state, state_sh)
        else:
            start_step, state, _ = restored
            print(f"resumed from checkpoint step {start_step} in {ckpt.directory}", flush=True)

        run = _Run(config, graphdef, state_sh, mesh, rules, data)
        train_fn = step_lib.jit_train_step(
            graphdef,
            state_sh,
            run.batch_sh,
            schedule=lambda s: schedule(s // accum),
            seed=int(config.seed),
            label_smoothing=float(config.loss.label_smoothing),
            lb_weight=float(config.loss.lb_weight),
            z_weight=float(config.loss.z_weight),
            skip_nonfinite=True,
        )
        logger = RunLogger(workdir, total_steps, start_step, tensorboard=bool(t_cfg.get("tensorboard", True)))
        config_json = json.loads(config.to_json_best_effort())
        meta = lambda step: {"step": step, "model": model_dict, "vocab_size": data.tokenizer.vocab_size}

        def save(step, val_loss=None):
            ckpt.save(
                step, state, config=config_json, meta=meta(step), data_iter=train_iter, val_loss=val_loss
            )

        if start_step == 0 and config.eval.get("decode_at_start"):
            logger.log_eval(0, run.decode_and_score(state, beam=False), prefix="decode")

        tokens, last_good = 0.0, start_step
        try:
            for step in range(start_step + 1, total_steps + 1):
                ckpt.check()  # a failed background save ends the run now, not at the next save
                batch = next(train_iter)
                tokens += float(np.count_nonzero(batch["inputs"]) + np.count_nonzero(batch["targets"]))
                state, metrics = train_fn(state, {k: run.put(batch[k]) for k in step_lib.TRAIN_KEYS})
                if not bool(metrics["finite"]):
                    msg = f"non-finite loss at step {step} (loss={float(metrics['loss'])})"
                    if t_cfg.nonfinite == "stop":
                        raise NonFiniteLossError(
                            f"{msg}; stopped, the last good checkpoint is step {last_good}; lower "
                            f"config.optim.learning_rate or set config.train.nonfinite='skip'"
                        )
                    log.warning("%s; update skipped", msg)
                    print(f"warning: {msg}; update skipped", flush=True)
                if t_cfg.log_every and (step % t_cfg.log_every == 0 or step == total_steps):
                    logger.log_train(step, jax.device_get(metrics), tokens=tokens)
                    tokens = 0.0
                val = None
                if t_cfg.eval_every and step % t_cfg.eval_every == 0 and step != total_steps:
                    val = run.validate(state)
                    logger.log_eval(step, val)
                if t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0 and step != total_steps:
                    save(step, None if val is None else val["val_loss"])
                    last_good = step
            final = run.validate(state)
            if total_steps > start_step or not ckpt.steps():
                save(total_steps, final["val_loss"])
            final.update(run.decode_and_score(state, beam=int(config.eval.beam_size) > 0))
            logger.log_eval(max(total_steps, start_step), final, prefix="final")
        finally:
            ckpt.close()
            logger.close()
        plot = logger.plot_routing()
        if plot:
            print(f"routing plot: {plot}", flush=True)
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=1)
        return final
