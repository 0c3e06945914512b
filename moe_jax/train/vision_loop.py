"""``train_and_evaluate(config, workdir)`` for ``config.task`` in ``image_classification`` and ``vlm``.

The same shape as the seq2seq trainer (``train/trainer.py``), reusing its pieces (optimizer, pure jitted
step over ``nnx.split`` state, :class:`~moe_jax.train.checkpoint.Checkpointer`, :class:`RunLogger`):
config → mesh and rules → data → model → resume or start → train with logging, validation and checkpoints
→ final test metrics (top-1 accuracy; or VQA exact match and caption BLEU with sample outputs) and
``final_metrics.json``. A VLM run also writes ``modality_load.png``: expert load of image vs text tokens
per decoder MoE layer on the test split.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from moe_jax import sharding
from moe_jax.errors import ConfigError, NonFiniteLossError
from moe_jax.train import optim
from moe_jax.train import step as step_lib
from moe_jax.train import vision_tasks as tasks
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.logging import RunLogger
from moe_jax.train.workdir import resolve_workdir

TASKS = ("image_classification", "vlm")


def _data_dir(config) -> str:
    d = config.get("data_dir") or os.environ.get("MOE_JAX_DATA_DIR") or "~/.cache/moe_jax/data"
    return os.path.expanduser(d)


def load_data(config):
    """The run's :class:`ImageClassificationData` or :class:`VLMData` (missing data → ConfigError)."""
    from moe_jax.data import DatasetUnavailableError, vision

    try:
        if config.task == "image_classification":
            return vision.make_image_data(config.data, data_dir=_data_dir(config))
        return vision.make_vlm_data(config.data, data_dir=_data_dir(config))
    except DatasetUnavailableError as e:
        raise ConfigError(str(e)) from None


def build_model(config, *, vocab_size: int | None = None, seed: int = 0) -> nnx.Module:
    """The task's model from ``config.model`` (its ValueErrors become ConfigErrors naming the section)."""
    from moe_jax.models.vit import ViTClassifier, ViTConfig
    from moe_jax.models.vlm import VisionLanguageModel, VLMConfig

    try:
        if config.task == "image_classification":
            return ViTClassifier(ViTConfig.from_mapping(config.model.to_dict()), rngs=nnx.Rngs(params=seed))
        model = config.model.to_dict()
        cfg = VLMConfig.from_mapping(model, model["vision"], vocab_size=vocab_size)
        return VisionLanguageModel(cfg, rngs=nnx.Rngs(params=seed))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None


def validate_config(config):
    """Checks task, batch sizes and sharding; returns ``(mesh, rules)``."""
    if config.get("task") not in TASKS:
        raise ConfigError(f"config.task={config.get('task')!r} must be one of {TASKS}")
    if config.train.num_train_steps < 0:
        raise ConfigError(f"config.train.num_train_steps={config.train.num_train_steps} must be >= 0")
    lr = config.optim.learning_rate
    if not isinstance(lr, int | float) or not lr > 0:
        raise ConfigError(f"config.optim.learning_rate={lr!r} must be > 0")
    try:
        rules = sharding.preset_rules(config.sharding.preset)
        mesh = sharding.make_mesh(dict(config.sharding.mesh))
    except ValueError as e:
        raise ConfigError(f"config.sharding: {e}") from None
    from moe_jax.train.trainer import data_parallel_size

    dp = data_parallel_size(mesh, rules)
    for field, bs in (
        ("train.batch_size", config.train.batch_size),
        ("eval.batch_size", config.eval.batch_size),
    ):
        if bs < 1 or bs % dp:
            raise ConfigError(
                f"config.{field}={bs} must be a positive multiple of the {dp} data-parallel "
                f"devices; set --config.{field}={max(dp, bs // dp * dp or dp)}"
            )
    check_group_sizes(config)
    return mesh, rules


def check_group_sizes(config) -> None:
    """Fails fast when an MoE ``group_size`` does not divide a batch's tokens (else the first step fails)."""
    m = config.model
    vision = m if config.task == "image_classification" else m.vision
    if vision.image_size % vision.patch_size:
        return  # build_model reports it, naming both fields
    patches = (vision.image_size // vision.patch_size) ** 2
    prefix = "model" if config.task == "image_classification" else "model.vision"
    checks = [(f"{prefix}.group_size", vision.get("group_size"), patches, "patches")]
    if config.task == "vlm":
        text = int(config.data.max_text_len)
        checks.append(("model.group_size", m.get("group_size"), patches + text, "image + text tokens"))
    for field, group, per_example, what in checks:
        if group is None:
            continue
        for batch_field, bs in (
            ("train.batch_size", config.train.batch_size),
            ("eval.batch_size", config.eval.batch_size),
        ):
            if (bs * per_example) % group:
                raise ConfigError(
                    f"config.{field}={group} must divide the {bs * per_example} tokens of a batch "
                    f"(config.{batch_field}={bs} x {per_example} {what}); pick a divisor (whole examples: a "
                    f"multiple of {per_example}), or None for one routing group per example"
                )


class VisionRun:
    """Compiled steps, placement and evaluation of one run."""

    def __init__(self, config, graphdef, state_sh, mesh, rules, data, schedule):
        self.config, self.graphdef, self.data = config, graphdef, data
        self.is_vlm = config.task == "vlm"
        spec = sharding.logical_to_spec(("act_batch",), rules, mesh.axis_names)
        self.batch_sh = NamedSharding(mesh, spec)
        loss = tasks.vlm_loss if self.is_vlm else tasks.classification_loss
        loss_fn = functools.partial(
            loss,
            label_smoothing=float(config.loss.label_smoothing),
            lb_weight=float(config.loss.lb_weight),
            z_weight=float(config.loss.z_weight),
        )
        self.train_keys = ("image", "text", "targets", "weights") if self.is_vlm else ("image", "label")
        self.train_fn = jax.jit(
            functools.partial(tasks.train_step, graphdef, loss_fn=loss_fn, schedule=schedule),
            in_shardings=(state_sh, self.batch_sh),
            out_shardings=(state_sh, None),
            donate_argnums=0,
        )
        sums = tasks.vlm_eval_sums if self.is_vlm else tasks.classification_eval_sums
        self.eval_fn = jax.jit(
            lambda s, b: sums(nnx.merge(graphdef, s)[0], b), in_shardings=(state_sh, self.batch_sh)
        )
        if self.is_vlm:
            eos = data.tokenizer.eos_id
            self.decode_fn = jax.jit(
                lambda s, img, p, n: tasks.greedy_decode_vlm(
                    nnx.merge(graphdef, s)[0], img, p, n, eos_id=eos
                ),
                in_shardings=(state_sh, self.batch_sh, self.batch_sh, self.batch_sh),
            )

    def put(self, array) -> jax.Array:
        return jax.make_array_from_process_local_data(self.batch_sh, np.asarray(array))

    def _eval_batches(self, split: str, kind: str | None = None):
        cfg = self.config.eval
        if self.is_vlm:
            return self.data.eval_batches(
                split, int(cfg.batch_size), kind=kind, max_examples=cfg.get("max_eval_examples")
            )
        return self.data.eval_batches(split, int(cfg.batch_size), max_examples=cfg.get("max_eval_examples"))

    def evaluate(self, state, split: str, *, decode: bool = True, stream=None) -> dict[str, Any]:
        """Loss and accuracy on ``split``; for the VLM also VQA exact match, caption BLEU and samples.

        Routing metrics are averaged over batches (``<layer>/expert_load_image`` etc., as lists).
        """
        keys = (
            ("image", "text", "targets", "weights", "example_weight")
            if self.is_vlm
            else ("image", "label", "weights")
        )
        totals, routing, nb = np.zeros(3), {}, 0
        for kind in ("caption", "vqa") if self.is_vlm else (None,):
            for batch in self._eval_batches(split, kind):
                out = jax.device_get(self.eval_fn(state, {k: self.put(batch[k]) for k in keys}))
                totals += [float(out["loss_sum"]), float(out["correct_sum"]), float(out["count"])]
                nb += 1
                for k, v in out.items():
                    if k.startswith("moe/"):
                        routing[k] = routing.get(k, 0.0) + np.asarray(v)
        n = max(totals[2], 1.0)
        metrics = {f"{split}_loss": totals[0] / n, f"{split}_accuracy": totals[1] / n}
        metrics.update(
            {
                f"{split}/{k}": (v / max(nb, 1)).tolist()
                for k, v in routing.items()
                if not k.endswith("_count_image") and not k.endswith("_count_text")
            }
        )
        if self.is_vlm and decode:
            metrics.update(self.decode_and_score(state, split, stream=stream))
        return metrics

    def decode_and_score(self, state, split: str, *, stream=None) -> dict[str, float]:
        """Greedy answers and captions on ``split``: VQA exact match and caption BLEU (0-100)."""
        tok, cfg = self.data.tokenizer, self.config.eval
        metrics, samples = {}, {}
        for kind in ("vqa", "caption"):
            hyps, refs, prompts = [], [], []
            for batch in self.data.eval_batches(
                split, int(cfg.batch_size), kind=kind, max_examples=cfg.get("max_decode_examples")
            ):
                out = jax.device_get(
                    self.decode_fn(
                        state,
                        self.put(batch["image"]),
                        self.put(batch["prompt"]),
                        self.put(batch["prompt_len"]),
                    )
                )
                keep = batch["example_weight"] > 0
                hyps += [tok.decode(row) for row, k in zip(out, keep) if k]
                refs += [r for r, k in zip(batch["target_text"], keep) if k]
                prompts += [p for p, k in zip(batch["prompt_text"], keep) if k]
            if not refs:
                continue
            if kind == "vqa":
                metrics["vqa_accuracy"] = tasks.vqa_exact_match(hyps, refs)
            else:
                metrics["caption_bleu"] = tasks.caption_bleu(hyps, refs)
            samples[kind] = list(zip(prompts, refs, hyps))[: int(cfg.get("num_samples", 3))]
        for kind, rows in samples.items():
            for prompt, ref, hyp in rows:
                print(
                    f"--- {kind} sample | {prompt or '<caption>'} | target: {ref} | model: {hyp}",
                    file=stream,
                    flush=True,
                )
        return metrics


def plot_modality_load(metrics: dict, path: str, *, prefix: str = "test/moe/") -> str | None:
    """Heatmap of decoder expert load for image vs text tokens (rows: layer × modality; columns: experts)."""
    rows, labels = [], []
    for key in sorted(metrics):
        if key.startswith(prefix) and key.endswith("/expert_load_image"):
            layer = key[len(prefix) : -len("/expert_load_image")]
            for modality in ("image", "text"):
                rows.append(metrics[f"{prefix}{layer}/expert_load_{modality}"])
                labels.append(f"{layer} {modality}")
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load_RE = np.asarray(rows)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * load_RE.shape[1], 0.9 + 0.45 * len(rows)))
    im = ax.imshow(load_RE, cmap="viridis", aspect="auto", vmin=0)
    for r in range(load_RE.shape[0]):
        for e in range(load_RE.shape[1]):
            ax.text(e, r, f"{load_RE[r, e]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(load_RE.shape[1]))
    ax.set_xlabel("expert")
    ax.set_title("expert load by modality (share of the modality's assignments)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def train_and_evaluate(config, workdir: str, *, data=None, stream=None) -> dict[str, Any]:
    """Trains (resuming from the workdir's newest good checkpoint) and evaluates on the test split.

    Args:
        config: a ``configs/image_classification.py`` or ``configs/vlm.py`` config.
        workdir: checkpoints, ``metrics.jsonl``, ``routing.png``, ``modality_load.png`` (VLM) and
            ``final_metrics.json``.
        data: ready data (tests, experiments); default: built from ``config.data``.
        stream: where progress lines and samples go (default stdout).

    Returns:
        Final metrics: ``test_loss``, ``test_accuracy`` (top-1 for classification, next-token for the VLM),
        ``vqa_accuracy`` and ``caption_bleu`` (VLM), routing averages, ``train_seconds``.
    """
    import time

    workdir = resolve_workdir(workdir)
    mesh, rules = validate_config(config)
    data = load_data(config) if data is None else data
    t_cfg = config.train
    total_steps = int(t_cfg.num_train_steps)
    model_dict = json.loads(json.dumps(config.model.to_dict(), default=str))
    vocab = getattr(getattr(data, "tokenizer", None), "vocab_size", None)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = build_model(config, vocab_size=vocab, seed=int(config.seed))
        tx, schedule = optim.make_optimizer(config.optim, max(total_steps, 1))
        graphdef, state = step_lib.create_train_state(model, tx)
        del model
        state_sh = sharding.state_shardings(state, mesh, rules)
        train_iter = data.train_iter(int(t_cfg.batch_size), seed=int(config.seed))
        ckpt = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=int(t_cfg.get("keep_checkpoints", 2)),
            async_save=bool(t_cfg.get("async_checkpoints", True)),
        )
        restored = ckpt.restore_latest(state, state_sh, model_config=model_dict, data_iter=train_iter)
        if restored is None:
            start_step, state = 0, jax.device_put(state, state_sh)
        else:
            start_step, state, _ = restored
            print(f"resumed from checkpoint step {start_step}", file=stream, flush=True)
        run = VisionRun(config, graphdef, state_sh, mesh, rules, data, schedule)
        logger = RunLogger(
            workdir, total_steps, start_step, tensorboard=bool(t_cfg.get("tensorboard", False)), stream=stream
        )
        config_json = json.loads(config.to_json_best_effort())

        def save(step, val_loss=None):
            ckpt.save(
                step,
                state,
                config=config_json,
                meta={"step": step, "model": model_dict},
                data_iter=train_iter,
                val_loss=val_loss,
            )

        t0 = time.time()
        try:
            for step in range(start_step + 1, total_steps + 1):
                ckpt.check()  # a failed background save ends the run now, not at the next save
                batch = next(train_iter)
                state, metrics = run.train_fn(state, {k: run.put(batch[k]) for k in run.train_keys})
                if not bool(metrics["finite"]):
                    if t_cfg.get("nonfinite", "stop") == "stop":
                        raise NonFiniteLossError(
                            f"non-finite loss at step {step}; lower config.optim.learning_rate"
                        )
                    print(f"warning: non-finite loss at step {step}; update skipped", file=stream, flush=True)
                if t_cfg.log_every and (step % t_cfg.log_every == 0 or step == total_steps):
                    logger.log_train(step, jax.device_get(metrics))
                val = None
                if t_cfg.eval_every and step % t_cfg.eval_every == 0 and step != total_steps:
                    val = run.evaluate(
                        state, "validation", decode=bool(config.eval.get("decode_in_validation"))
                    )
                    logger.log_eval(step, {k: v for k, v in val.items() if not isinstance(v, list)})
                if (
                    t_cfg.get("checkpoint_every")
                    and step % t_cfg.checkpoint_every == 0
                    and step != total_steps
                ):
                    save(step, None if val is None else val["validation_loss"])
            train_seconds = time.time() - t0
            if total_steps > start_step or not ckpt.steps():
                save(total_steps)
            final = run.evaluate(state, "test", stream=stream)
            final["train_seconds"] = train_seconds
            logger.log_eval(max(total_steps, start_step), final, prefix="final")
        finally:
            ckpt.close()
            logger.close()
    logger.plot_routing()
    if run.is_vlm:
        plot_modality_load(final, os.path.join(workdir, "modality_load.png"))
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump(final, f, indent=1)
    return final


def main(argv=None) -> None:
    """``python -m moe_jax.train.vision_loop --config=configs/vlm.py[:variant] --workdir=DIR``."""
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "configs/<task>.py[:variant]", lock_config=True
    )
    workdir_flag = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")

    def run(_):
        if config_flag.value is None or not workdir_flag.value:
            sys.exit("error: pass --config=configs/<task>.py[:variant] and --workdir=DIR")
        try:
            train_and_evaluate(config_flag.value, workdir_flag.value)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except NonFiniteLossError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(3)

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
