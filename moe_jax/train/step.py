"""Pure, module-level train and eval steps over ``nnx.split`` state.

The training state is ``nnx.state((model, optimizer))`` with ``graphdef`` from the same split. The steps
merge it inside the jitted function (cheaper than ``nnx.jit``, see COOKBOOK §3) and return the new state,
so :func:`jit_train_step` can donate it and pin its shardings.

Loss = token cross-entropy (label smoothing optional) + ``lb_weight``·Σ load_balancing_loss
+ ``z_weight``·Σ router_z_loss, the sums running over the MoE layers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax.moe.layer import SelectionBias

TRAIN_KEYS = ("inputs", "targets")
# Per-MoE-layer aux entries that are reported as metrics (the losses are reported as sums, too).
_LAYER_METRICS = (
    "load_balancing_loss",
    "router_z_loss",
    "expert_load",
    "dropped_fraction",
    "router_entropy",
    "max_load_ratio",
)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation):
    """Wraps ``model`` in ``nnx.Optimizer(model, tx, wrt=nnx.Param)``; returns ``(graphdef, state)``."""
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    return nnx.split((model, optimizer))


def cross_entropy(
    logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and summed correct predictions over ``weights_BL``.

    With label smoothing the constant entropy of the smoothed target is subtracted, so a perfect model
    still scores zero.
    """
    V = logits_BLV.shape[-1]
    logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    if label_smoothing > 0:
        confidence, low = 1.0 - label_smoothing, label_smoothing / (V - 1)
        soft_BLV = jax.nn.one_hot(targets_BL, V) * (confidence - low) + low
        const = -(confidence * jnp.log(confidence) + (V - 1) * low * jnp.log(low + 1e-20))
        loss_BL = -jnp.sum(soft_BLV * logp_BLV, axis=-1) - const
    else:
        loss_BL = -jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
    correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
    return jnp.sum(loss_BL * weights_BL), jnp.sum(correct_BL * weights_BL)


def layer_metrics(aux: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    """Flattens per-layer aux into ``moe/<layer>/<metric>`` entries."""
    return {
        f"moe/{name}/{k}": layer_aux[k]
        for name, layer_aux in aux.items()
        for k in _LAYER_METRICS
        if k in layer_aux
    }


def _model_loss(model, batch, *, label_smoothing, lb_weight, z_weight, dropout_key, deterministic):
    targets_BL = batch["targets"]
    weights_BL = (targets_BL != 0).astype(jnp.float32)
    logits_BLV, aux = model(batch["inputs"], targets_BL, dropout_key=dropout_key, deterministic=deterministic)
    ce_sum, correct = cross_entropy(logits_BLV, targets_BL, weights_BL, label_smoothing)
    num_tokens = jnp.maximum(weights_BL.sum(), 1.0)
    ce = ce_sum / num_tokens
    lb = sum((a["load_balancing_loss"] for a in aux.values()), jnp.zeros((), jnp.float32))
    z = sum((a["router_z_loss"] for a in aux.values()), jnp.zeros((), jnp.float32))
    loss = ce + lb_weight * lb + z_weight * z
    metrics = {
        "loss": loss,
        "ce_loss": ce,
        "accuracy": correct / num_tokens,
        "num_tokens": weights_BL.sum(),
        "load_balancing_loss": lb,
        "router_z_loss": z,
        **layer_metrics(aux),
    }
    return loss, metrics


def train_step(
    graphdef,
    state,
    batch,
    *,
    schedule: Callable,
    seed: int,
    label_smoothing: float = 0.0,
    lb_weight: float = 0.01,
    z_weight: float = 0.0,
    skip_nonfinite: bool = True,
):
    """One optimizer update.

    Args:
        graphdef: from :func:`create_train_state`.
        state: ``nnx.State`` of ``(model, optimizer)``.
        batch: ``{'inputs': int32[B, K], 'targets': int32[B, L]}`` with pad id 0.
        schedule: learning rate by update count (for the ``learning_rate`` metric).
        seed: dropout randomness is ``fold_in(key(seed), step)``, so a resumed run draws the same masks.
        skip_nonfinite: with a non-finite loss or gradient keep the old state (the update is skipped); the
            ``finite`` metric says so either way and the trainer decides whether to stop.

    Returns:
        ``(new_state, metrics)``; metrics are scalars plus per-MoE-layer entries (see :func:`layer_metrics`).
    """
    # merge() may hand the state's own Variables to the model, which update() then mutates: keep the
    # incoming arrays aside for the non-finite fallback.
    old_leaves = jax.tree.leaves(state)
    model, optimizer = nnx.merge(graphdef, state)
    step = optimizer.step[...]
    dropout_key = jax.random.fold_in(jax.random.key(seed), step)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        m = nnx.merge(model_def, params, rest, copy=True)  # fresh Variables: the forward may set some
        loss, metrics = _model_loss(
            m,
            batch,
            label_smoothing=label_smoothing,
            lb_weight=lb_weight,
            z_weight=z_weight,
            dropout_key=dropout_key,
            deterministic=False,
        )
        # MoE layers with a selection bias update it in the forward pass (aux-loss-free balancing).
        return loss, (metrics, nnx.state(m, SelectionBias))

    (loss, (metrics, bias_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grad_norm = optax.global_norm(grads)
    optimizer.update(model, grads)
    nnx.update(model, bias_state)
    new_state = nnx.state((model, optimizer))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
        new_leaves, treedef = jax.tree.flatten(new_state)
        new_state = jax.tree.unflatten(
            treedef, [jnp.where(finite, n, o) for n, o in zip(new_leaves, old_leaves)]
        )
    metrics.update(grad_norm=grad_norm, finite=finite, learning_rate=schedule(step))
    return new_state, metrics


def eval_step(graphdef, state, batch, *, label_smoothing: float = 0.0):
    """Sums over a batch (rows weighted by ``batch['weights']`` if present): loss, correct, tokens."""
    model, _ = nnx.merge(graphdef, state)
    targets_BL = batch["targets"]
    weights_BL = (targets_BL != 0).astype(jnp.float32)
    if "weights" in batch:
        weights_BL = weights_BL * batch["weights"][:, None]
    logits_BLV, aux = model(batch["inputs"], targets_BL, deterministic=True)
    ce_sum, correct = cross_entropy(logits_BLV, targets_BL, weights_BL, label_smoothing)
    return {"loss_sum": ce_sum, "correct_sum": correct, "num_tokens": weights_BL.sum()}


def jit_train_step(graphdef, state_shardings, batch_sharding, **kwargs):
    """``train_step`` jitted once: explicit in/out shardings, state donated."""
    fn = functools.partial(train_step, graphdef, **kwargs)
    return jax.jit(
        fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )


def jit_eval_step(graphdef, state_shardings, batch_sharding, **kwargs):
    fn = functools.partial(eval_step, graphdef, **kwargs)
    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding))


def classification_train_step(graphdef, state, batch, *, seed: int, lb_weight: float, z_weight: float):
    """One update of a :class:`~moe_jax.models.feature_classifier.FeatureClassifier`."""
    old_leaves = jax.tree.leaves(state)
    model, optimizer = nnx.merge(graphdef, state)
    dropout_key = jax.random.fold_in(jax.random.key(seed), optimizer.step[...])
    model_def, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        m = nnx.merge(model_def, params, rest, copy=True)  # fresh Variables: the forward may set some
        logits_BQ, aux = m(batch["x"], dropout_key=dropout_key, deterministic=False)
        ones_B1 = jnp.ones(batch["y"].shape + (1,), jnp.float32)
        ce_sum, correct = cross_entropy(logits_BQ[:, None], batch["y"][:, None], ones_B1)
        n = batch["y"].shape[0]
        lb = sum((a["load_balancing_loss"] for a in aux.values()), jnp.zeros((), jnp.float32))
        z = sum((a["router_z_loss"] for a in aux.values()), jnp.zeros((), jnp.float32))
        loss = ce_sum / n + lb_weight * lb + z_weight * z
        metrics = {"loss": loss, "ce_loss": ce_sum / n, "accuracy": correct / n}
        return loss, (metrics, nnx.state(m, SelectionBias))

    (loss, (metrics, bias_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    optimizer.update(model, grads)
    nnx.update(model, bias_state)
    new_state = nnx.state((model, optimizer))
    finite = jnp.isfinite(loss) & jnp.isfinite(jax.tree.reduce(lambda a, g: a + jnp.sum(g * g), grads, 0.0))
    leaves, treedef = jax.tree.flatten(new_state)
    new_state = jax.tree.unflatten(treedef, [jnp.where(finite, n, o) for n, o in zip(leaves, old_leaves)])
    return new_state, {**metrics, "finite": finite}
