"""Vision-language: captions and visual questions with a ViT encoder and a prefix-LM MoE decoder.

Scores: VQA exact match and caption BLEU (greedy answers); the decoder's expert load is split by modality
(``expert_load_image`` / ``expert_load_text``) and drawn as ``modality_load.png``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.tasks.base import Task, data_dir, missing_data
from moe_jax.tasks.classification import check_group_sizes, moe_field, num_patches
from moe_jax.train import decode as decode_lib
from moe_jax.train.step import cross_entropy


def greedy_decode_vlm(
    model,
    images_BHWC: jax.Array,
    prompt_BT: jax.Array,
    prompt_len_B: jax.Array,
    *,
    eos_id: int,
    max_new_tokens: int | None = None,
) -> jax.Array:
    """Greedy continuation of each row's prompt; returns ``int32[B, T]`` generated tokens (pad 0 after EOS).

    The image is encoded once; each step re-runs the decoder over the fixed ``[B, T]`` text buffer (later
    positions are pad, which attention and routing ignore), so a step's logits are computed exactly as in
    teacher-forced training. Rows have different prompt lengths, so each row writes at its own position.
    """
    prefix_BPD, _ = model.encode_image(images_BHWC, deterministic=True)
    T = prompt_BT.shape[1]
    steps = T if max_new_tokens is None else min(max_new_tokens, T)

    def logits_fn(text_BT, t):
        return model.decode_text(prefix_BPD, text_BT, deterministic=True, split_by_modality=False)[0]

    out_BS = decode_lib.greedy(
        logits_fn, prompt_BT, prompt_len_B.astype(jnp.int32), steps=steps, eos_id=eos_id
    )
    return jnp.pad(out_BS, ((0, 0), (0, T - steps)))


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and surrounding space (VQA-style exact match)."""
    return " ".join("".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace()).split())


def vqa_exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Share (0-100) of answers equal to the reference after :func:`normalize_answer`."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} answers but {len(references)} references")
    if not hypotheses:
        return 0.0
    return 100.0 * float(
        np.mean([normalize_answer(h) == normalize_answer(r) for h, r in zip(hypotheses, references)])
    )


def caption_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of captions against one reference each (``metrics_text.bleu``)."""
    from moe_jax.train.metrics_text import bleu

    return bleu(list(hypotheses), list(references))


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


class VLMTask(Task):
    """Captioning + VQA: next-token loss on the caption / answer tokens only."""

    train_keys = ("image", "text", "targets", "token_weight")
    eval_keys = ("image", "text", "targets", "token_weight", "row_weight")
    identity_data_fields = ("source", "builder_config", "image_size", "channels", "max_text_len")

    def validate(self, config, *, data_parallel: int) -> None:
        patches = num_patches(config.model.vision)
        if patches is None:
            return
        text = int(config.data.max_text_len)
        check_group_sizes(
            config,
            [
                (
                    "model.vision.moe.group_size",
                    moe_field(config.model.vision, "group_size"),
                    patches,
                    "patches",
                ),
                (
                    "model.moe.group_size",
                    moe_field(config.model, "group_size"),
                    patches + text,
                    "image + text tokens",
                ),
            ],
        )

    def load_data(self, config):
        from moe_jax.data import DatasetUnavailableError, vision

        try:
            return vision.make_vlm_data(config.data, data_dir=data_dir(config))
        except DatasetUnavailableError as e:
            raise missing_data(e) from None

    def build_model(self, config, data):
        from moe_jax.models.vlm import VisionLanguageModel, VLMConfig

        try:
            cfg = VLMConfig.from_mapping(config.model.to_dict(), vocab_size=data.tokenizer.vocab_size)
            return VisionLanguageModel(cfg, rngs=nnx.Rngs(params=int(config.seed)))
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.model: {e}") from None

    def count_tokens(self, batch) -> float:
        return float(np.count_nonzero(batch["text"]))

    def loss_sums(self, model, batch, *, dropout_key, deterministic):
        logits_BTV, aux = model(batch["image"], batch["text"], deterministic=deterministic)
        weights_BT = batch["token_weight"].astype(jnp.float32)
        if "row_weight" in batch:
            weights_BT = weights_BT * batch["row_weight"][:, None]
        ce_sum, correct = cross_entropy(logits_BTV, batch["targets"], weights_BT, self.label_smoothing)
        return {"loss_sum": ce_sum, "correct_sum": correct, "weight_sum": weights_BT.sum()}, aux

    def _decoder(self, run):
        if getattr(run, "_vlm_decoder", None) is None:
            graphdef, eos = run.graphdef, run.data.tokenizer.eos_id
            run._vlm_decoder = jax.jit(
                lambda s, img, p, n: greedy_decode_vlm(nnx.merge(graphdef, s)[0], img, p, n, eos_id=eos),
                in_shardings=(run.state_sh, run.batch_sh, run.batch_sh, run.batch_sh),
            )
        return run._vlm_decoder

    def predict_and_score(self, run, state, split: str = "test", *, stream=None) -> dict[str, float]:
        """Greedy answers and captions on ``split``: VQA exact match and caption BLEU (0-100)."""
        tok, cfg = run.data.tokenizer, self.config.eval
        decode = self._decoder(run)
        metrics, samples = {}, {}
        for kind in ("vqa", "caption"):
            hyps, refs, prompts = [], [], []
            for batch in run.data.eval_batches(
                split, int(cfg.batch_size), kind=kind, max_examples=cfg.get("max_decode_examples")
            ):
                out = jax.device_get(
                    decode(
                        state, run.put(batch["image"]), run.put(batch["prompt"]), run.put(batch["prompt_len"])
                    )
                )
                keep = batch["row_weight"] > 0
                hyps += [tok.decode(row) for row, k in zip(out, keep) if k]
                refs += [r for r, k in zip(batch["target_text"], keep) if k]
                prompts += [p for p, k in zip(batch["prompt_text"], keep) if k]
            if not refs:
                continue
            if kind == "vqa":
                metrics["vqa_accuracy"] = vqa_exact_match(hyps, refs)
            else:
                metrics["caption_bleu"] = caption_bleu(hyps, refs)
            samples[kind] = list(zip(prompts, refs, hyps))[: int(cfg.get("num_samples", 3))]
        for kind, rows in samples.items():
            for prompt, ref, hyp in rows:
                print(
                    f"--- {kind} sample | {prompt or '<caption>'} | target: {ref} | model: {hyp}",
                    file=stream,
                    flush=True,
                )
        return metrics

    def after_run(self, run, final: dict, workdir: str) -> None:
        plot_modality_load(final, os.path.join(workdir, "modality_load.png"))
