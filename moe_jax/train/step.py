"""THE train step and THE eval step: pure, module-level functions over ``nnx.split`` state.

The training state is ``nnx.state((model, optimizer))`` with ``graphdef`` from the same split. The steps
merge it inside the jitted function (a pure ``jax.jit`` over split state costs ~0.9 ms per step against
~5.6 ms for ``nnx.jit`` on a tiny model) and return the new state, so :func:`jit_train_step` can donate it
and pin its shardings. Every task plugs in through one function, its ``loss_sums``::

    loss_sums(model, batch, *, dropout_key, deterministic) -> ({'loss_sum', 'correct_sum', 'weight_sum'}, aux)

(summed cross-entropy, summed correct predictions and the summed weight they run over — tokens for
sequence tasks, rows for classification — plus the model's per-MoE-layer aux dict).

Loss = loss_sum / weight_sum + ``lb_weight``·Σ load_balancing_loss + ``z_weight``·Σ router_z_loss, the
sums running over every MoE layer of the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossSums = Callable[..., tuple[dict[str, jax.Array], dict]]

# Per-MoE-layer aux entries reported as metrics (``moe/<layer>/<name>``); the modality split exists only
# in the VLM decoder.
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


def aux_losses(aux: Mapping[str, Mapping[str, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """Summed load-balancing and router z-losses over the MoE layers."""
    zero = jnp.zeros((), jnp.float32)
    lb = sum((a["load_balancing_loss"] for a in aux.values()), zero)
    z = sum((a["router_z_loss"] for a in aux.values()), zero)
    return lb, z


def layer_metrics(aux: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    """Flattens per-layer aux into ``moe/<layer>/<metric>`` entries."""
    return {f"moe/{name}/{k}": a[k] for name, a in aux.items() for k in LAYER_METRICS if k in a}


def _loss_and_metrics(sums, aux, *, lb_weight: float, z_weight: float):
    n = jnp.maximum(sums["weight_sum"], 1.0)
    ce = sums["loss_sum"] / n
    lb, z = aux_losses(aux)
    loss = ce + lb_weight * lb + z_weight * z
    metrics = {
        "loss": loss,
        "ce_loss": ce,
        "accuracy": sums["correct_sum"] / n,
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
    loss_sums: LossSums,
    schedule: Callable,
    seed: int,
    lb_weight: float = 0.01,
    z_weight: float = 0.0,
):
    """One optimizer update.

    Args:
        graphdef: from :func:`create_train_state`.
        state: ``nnx.State`` of ``(model, optimizer)``.
        batch: what ``loss_sums`` reads (the task's training batch).
        loss_sums: the task's forward (see the module docstring).
        schedule: learning rate by update count (for the ``learning_rate`` metric).
        seed: dropout randomness is ``fold_in(key(seed), step)``, so a resumed run draws the same masks.
        lb_weight, z_weight: weights of the summed load-balancing and router z-losses.

    Returns:
        ``(new_state, metrics)``. Every non-parameter variable the forward changed (MoE selection biases,
        the router-jitter RNG count) is written back, so jitter noise advances every step and resumes
        exactly. With a non-finite loss or gradient the old state is returned unchanged; ``finite`` (and
        ``loss_finite`` / ``grad_finite``) say so and the loop decides whether to stop or skip.
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
        sums, aux = loss_sums(m, batch, dropout_key=dropout_key, deterministic=False)
        loss, metrics = _loss_and_metrics(sums, aux, lb_weight=lb_weight, z_weight=z_weight)
        return loss, (metrics, nnx.state(m, nnx.Not(nnx.Param)))

    (loss, (metrics, changed)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grad_norm = optax.global_norm(grads)
    optimizer.update(model, grads)
    nnx.update(model, changed)
    new_state = nnx.state((model, optimizer))
    loss_finite, grad_finite = jnp.isfinite(loss), jnp.isfinite(grad_norm)
    finite = loss_finite & grad_finite
    new_leaves, treedef = jax.tree.flatten(new_state)
    new_state = jax.tree.unflatten(treedef, [jnp.where(finite, n, o) for n, o in zip(new_leaves, old_leaves)])
    metrics.update(
        grad_norm=grad_norm,
        finite=finite,
        loss_finite=loss_finite,
        grad_finite=grad_finite,
        learning_rate=schedule(step),
    )
    return new_state, metrics


def eval_step(graphdef, state, batch, *, loss_sums: LossSums) -> dict[str, jax.Array]:
    """Sums over a batch (padding rows weigh zero through ``row_weight``) plus per-layer routing metrics."""
    model, _ = nnx.merge(graphdef, state)
    sums, aux = loss_sums(model, batch, dropout_key=None, deterministic=True)
    return {**sums, **layer_metrics(aux)}


def jit_train_step(graphdef, state_shardings, batch_sharding, **kwargs):
    """:func:`train_step` jitted once: explicit in/out shardings, state donated."""
    fn = functools.partial(train_step, graphdef, **kwargs)
    return jax.jit(
        fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )


def jit_eval_step(graphdef, state_shardings, batch_sharding, **kwargs):
    """:func:`eval_step` jitted once with explicit input shardings."""
    fn = functools.partial(eval_step, graphdef, **kwargs)
    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding))
