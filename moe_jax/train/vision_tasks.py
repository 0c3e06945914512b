"""Task pieces for vision and vision-language training: losses, eval sums, greedy VLM decoding, scores.

Every loss returns ``(loss, metrics)`` where ``loss = task loss + lb_weight·Σ load_balancing_loss +
z_weight·Σ router_z_loss`` over all MoE layers (vision and decoder alike), as in ``train/step.py``.
Metrics carry per-layer routing entries ``moe/<layer>/<metric>``; VLM decoder layers add the modality split
``expert_load_image`` / ``expert_load_text``. :func:`train_step` is the pure update both the vision trainer
(``train/vision_loop.py``) and the quick API's image classifier (``moe_jax/api/vision.py``) jit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_jax.moe.layer import SelectionBias
from moe_jax.train.step import cross_entropy

LAYER_METRICS = (
    "load_balancing_loss",
    "router_z_loss",
    "expert_load",
    "dropped_fraction",
    "router_entropy",
    "max_load_ratio",
    "expert_load_image",
    "expert_load_text",
    "expert_count_image",
    "expert_count_text",
)


def aux_losses(aux: Mapping[str, Mapping[str, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """Summed load-balancing and router z-losses over the MoE layers."""
    zero = jnp.zeros((), jnp.float32)
    lb = sum((a["load_balancing_loss"] for a in aux.values()), zero)
    z = sum((a["router_z_loss"] for a in aux.values()), zero)
    return lb, z


def layer_metrics(aux: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    """Flattens per-layer aux into ``moe/<layer>/<metric>`` entries."""
    return {f"moe/{name}/{k}": a[k] for name, a in aux.items() for k in LAYER_METRICS if k in a}


def classification_loss(
    model,
    batch,
    *,
    deterministic: bool,
    label_smoothing: float = 0.0,
    lb_weight: float = 0.01,
    z_weight: float = 0.0,
):
    """Softmax cross-entropy over classes (mean over the batch, rows weighted by ``weights`` if present)."""
    logits_BQ, aux = model(batch["image"], deterministic=deterministic)
    labels_B = batch["label"]
    weights_B = batch.get("weights", jnp.ones(labels_B.shape, jnp.float32))
    ce_sum, correct = cross_entropy(
        logits_BQ[:, None], labels_B[:, None], weights_B[:, None], label_smoothing
    )
    n = jnp.maximum(weights_B.sum(), 1.0)
    lb, z = aux_losses(aux)
    loss = ce_sum / n + lb_weight * lb + z_weight * z
    metrics = {
        "loss": loss,
        "ce_loss": ce_sum / n,
        "accuracy": correct / n,
        "load_balancing_loss": lb,
        "router_z_loss": z,
        **layer_metrics(aux),
    }
    return loss, metrics


def vlm_loss(
    model,
    batch,
    *,
    deterministic: bool,
    label_smoothing: float = 0.0,
    lb_weight: float = 0.01,
    z_weight: float = 0.0,
):
    """Next-token cross-entropy on the weighted text positions only (image positions have no logits).

    ``batch``: ``image``, ``text`` (inputs), ``targets`` (text shifted left), ``weights`` float32[B, T]
    (1 on caption / answer tokens and EOS).
    """
    logits_BTV, aux = model(batch["image"], batch["text"], deterministic=deterministic)
    weights_BT = batch["weights"].astype(jnp.float32)
    ce_sum, correct = cross_entropy(logits_BTV, batch["targets"], weights_BT, label_smoothing)
    n = jnp.maximum(weights_BT.sum(), 1.0)
    lb, z = aux_losses(aux)
    loss = ce_sum / n + lb_weight * lb + z_weight * z
    metrics = {
        "loss": loss,
        "ce_loss": ce_sum / n,
        "accuracy": correct / n,
        "num_tokens": weights_BT.sum(),
        "load_balancing_loss": lb,
        "router_z_loss": z,
        **layer_metrics(aux),
    }
    return loss, metrics


def classification_eval_sums(model, batch) -> dict[str, jax.Array]:
    """Summed loss, correct and rows over a batch (padding rows weigh zero), plus routing aux."""
    logits_BQ, aux = model(batch["image"], deterministic=True)
    weights_B = batch["weights"]
    ce_sum, correct = cross_entropy(logits_BQ[:, None], batch["label"][:, None], weights_B[:, None])
    return {"loss_sum": ce_sum, "correct_sum": correct, "count": weights_B.sum(), **layer_metrics(aux)}


def vlm_eval_sums(model, batch) -> dict[str, jax.Array]:
    """Summed text loss, correct tokens and tokens (padding rows weigh zero), plus routing aux."""
    logits_BTV, aux = model(batch["image"], batch["text"], deterministic=True)
    weights_BT = batch["weights"] * batch["example_weight"][:, None]
    ce_sum, correct = cross_entropy(logits_BTV, batch["targets"], weights_BT)
    return {"loss_sum": ce_sum, "correct_sum": correct, "count": weights_BT.sum(), **layer_metrics(aux)}


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
    B, T = prompt_BT.shape
    steps = T if max_new_tokens is None else min(max_new_tokens, T)
    rows_B = jnp.arange(B)

    def cond(carry):
        t, _, _, done_B = carry
        return (t < steps) & ~jnp.all(done_B)

    def body(carry):
        t, text_BT, out_BT, done_B = carry
        logits_BTV, _ = model.decode_text(prefix_BPD, text_BT, deterministic=True, split_by_modality=False)
        pos_B = prompt_len_B + t  # where the next token goes
        logits_BV = logits_BTV[rows_B, jnp.clip(pos_B - 1, 0, T - 1)]
        tok_B = jnp.where(done_B | (pos_B > T), 0, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))
        out_BT = out_BT.at[:, t].set(tok_B)
        text_BT = text_BT.at[rows_B, pos_B].set(tok_B, mode="drop")
        return t + 1, text_BT, out_BT, done_B | (tok_B == eos_id) | (pos_B >= T)

    init = (jnp.int32(0), prompt_BT.astype(jnp.int32), jnp.zeros((B, T), jnp.int32), jnp.zeros((B,), bool))
    return jax.lax.while_loop(cond, body, init)[2]


def train_step(graphdef, state, batch, *, loss_fn, schedule):
    """One optimizer update of ``nnx.merge(graphdef, state) = (model, optimizer)`` on ``batch``.

    Args:
        graphdef, state: the split ``(model, optimizer)`` pair (``step.create_train_state``).
        batch: what ``loss_fn`` reads.
        loss_fn: ``loss_fn(model, batch, deterministic=False) -> (loss, metrics)``, e.g.
            :func:`classification_loss` or :func:`vlm_loss` with their weights bound.
        schedule: the learning-rate schedule (reported as ``learning_rate``).

    Returns:
        ``(new_state, metrics)``; metrics gain ``grad_norm``, ``finite`` and ``learning_rate``. A non-finite
        loss or gradient leaves the state unchanged (``finite`` is False), so the caller decides whether to
        stop or skip.
    """
    model, optimizer = nnx.merge(graphdef, state)
    step = optimizer.step[...]
    model_def, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        m = nnx.merge(model_def, p, rest, copy=True)  # fresh Variables: the forward may set some
        loss, metrics = loss_fn(m, batch, deterministic=False)
        # MoE layers with a selection bias update it in the forward pass (aux-loss-free balancing).
        return loss, (metrics, nnx.state(m, SelectionBias))

    (loss, (metrics, bias_state)), grads = jax.value_and_grad(f, has_aux=True)(params)
    grad_norm = optax.global_norm(grads)
    optimizer.update(model, grads)
    nnx.update(model, bias_state)
    new_state = nnx.state((model, optimizer))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics.update(grad_norm=grad_norm, finite=finite, learning_rate=schedule(step))
    return new_state, metrics


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
