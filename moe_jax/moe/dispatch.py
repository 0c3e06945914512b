"""Dispatchers: move tokens to experts according to a :class:`Routing` and combine the results.

All three are exact for the same routing (tested against a dense reference):
    ``einsum``: one-hot dispatch/combine tensors [G, S, E, C] and two einsums (the TPU classic; memory
        grows with S·E·C).
    ``indices``: scatter token rows into an [E, G, C, D] capacity buffer by (expert, slot), gather back.
    ``grouped``: no capacity buffer; kept assignments sorted by expert and run through a grouped matmul
        (``grouped_matmul.gmm``), or, with the ``core`` backend, laid out as one batched dot per
        projection plus the overflow rows (``core_layout``). Dropless routing drops nothing.

The two capacity dispatchers call ``experts_ECD(x_ECD) -> y_ECD`` on a buffer of R = G·C rows per expert;
the grouped one calls ``experts_grouped(x_MD, group_sizes_E) -> y_MD``. The combine is done in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe_jax.moe import core_layout, grouped_matmul, permute
from moe_jax.moe.routing import TOKEN_CHOICE, Routing
from moe_jax.sharding import constrain

DISPATCHERS = ("einsum", "indices", "grouped")

# Backends of the grouped dispatcher: the core + overflow layout, or a grouped_matmul backend.
GROUPED_BACKENDS = ("auto", "core") + tuple(b for b in grouped_matmul.BACKENDS if b != "auto")


def resolve_grouped_backend(backend: str, dtype=jnp.float32) -> str:
    """``auto``: the platform's grouped-matmul kernels where there are some (TPU, Hopper), else ``core``.

    ``core`` beats the ``ladder`` wherever a batched dot is fast (CPU: 1.1-1.2x vs 1.6x a dense FFN,
    ``benchmarks/RESULTS.md``); the ladder stays available by name.
    """
    if backend != "auto":
        return backend
    resolved = grouped_matmul.resolve_backend("auto", dtype)
    return "core" if resolved == "ladder" else resolved


# Dispatched buffers: experts over the expert mesh axis, groups over the remaining batch axes. The switch
# from token-sharded x_GSD to expert-sharded x_EGCD is where GSPMD emits the all-to-all.
_BUFFER_AXES = ("act_expert", "act_batch", "act_capacity", "act_embed")
_TOKEN_BUFFER_AXES = (None, "act_batch", "act_capacity", "act_embed")


def _run_experts_on_buffer(x_EGCD: jax.Array, experts_ECD: Callable[[jax.Array], jax.Array]) -> jax.Array:
    E, G, C, D = x_EGCD.shape
    # Two steps: first pin the buffer where the tokens are (groups over every batch axis), then reshard to
    # experts over ``expert``. GSPMD turns that reshard into an all-to-all; constraining straight to the
    # expert layout lets it pick all-gathers of the tokens instead.
    x_EGCD = constrain(constrain(x_EGCD, _TOKEN_BUFFER_AXES), _BUFFER_AXES)
    y_ECD = experts_ECD(x_EGCD.reshape(E, G * C, D))
    return constrain(constrain(y_ECD.reshape(E, G, C, -1), _BUFFER_AXES), _TOKEN_BUFFER_AXES)


def dispatch_einsum(
    x_GSD: jax.Array,
    routing: Routing,
    num_experts: int,
    capacity: int,
    experts_ECD: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """One-hot dispatch and combine tensors; returns y_GSD in float32."""
    G, S, _ = x_GSD.shape
    E, C = num_experts, capacity
    kept_GN = routing.kept_GN.astype(jnp.float32)
    if routing.kind == TOKEN_CHOICE:
        K = routing.top_k
        expert_GSKE = jax.nn.one_hot(routing.expert_GN.reshape(G, S, K), E, dtype=jnp.float32)
        slot_GSKC = jax.nn.one_hot(routing.slot_GN.reshape(G, S, K), C, dtype=jnp.float32)
        slot_GSKC = slot_GSKC * kept_GN.reshape(G, S, K, 1)
        dispatch_GSEC = jnp.einsum("gske,gskc->gsec", expert_GSKE, slot_GSKC)
        weighted_GSKE = expert_GSKE * routing.weight_GN.reshape(G, S, K, 1)
        combine_GSEC = jnp.einsum("gske,gskc->gsec", weighted_GSKE, slot_GSKC)
    else:
        # Expert choice lists assignments expert-major with slot = position: [G, E, C] directly.
        token_GECS = jax.nn.one_hot(routing.token_GN.reshape(G, E, C), S, dtype=jnp.float32)
        token_GECS = token_GECS * kept_GN.reshape(G, E, C, 1)
        dispatch_GSEC = jnp.einsum("gecs->gsec", token_GECS)
        combine_GSEC = jnp.einsum("gecs,gec->gsec", token_GECS, routing.weight_GN.reshape(G, E, C))
    x_EGCD = jnp.einsum("gsec,gsd->egcd", dispatch_GSEC.astype(x_GSD.dtype), x_GSD)
    y_EGCD = _run_experts_on_buffer(x_EGCD, experts_ECD)
    return jnp.einsum("gsec,egcd->gsd", combine_GSEC, y_EGCD.astype(jnp.float32))


def dispatch_indices(
    x_GSD: jax.Array,
    routing: Routing,
    num_experts: int,
    capacity: int,
    experts_ECD: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """Scatter rows into an [E, G, C, D] buffer by (expert, slot); gather back; returns y_GSD in float32."""
    G, S, D = x_GSD.shape
    E, C = num_experts, capacity
    # Assignments that are not kept point one past the buffer and are dropped by the scatter. Scatter and
    # gather are vmapped over groups so GSPMD sees the group dim as a batch dim and keeps it sharded.
    slot_GN = jnp.where(routing.kept_GN, routing.slot_GN, C)
    x_GND = jnp.take_along_axis(x_GSD, routing.token_GN[..., None], axis=1)
    x_GECD = jax.vmap(lambda e, c, x: jnp.zeros((E, C, D), x.dtype).at[e, c].set(x, mode="drop"))(
        routing.expert_GN, slot_GN, x_GND
    )
    y_EGCD = _run_experts_on_buffer(jnp.swapaxes(x_GECD, 0, 1), experts_ECD)
    y_GND = jax.vmap(lambda y, e, c: y[e, c])(
        jnp.swapaxes(y_EGCD, 0, 1), routing.expert_GN, jnp.minimum(slot_GN, C - 1)
    )
    y_GND = y_GND.astype(jnp.float32) * routing.weight_GN[..., None]
    return combine_assignments(y_GND, routing, S)


def dispatch_grouped(
    x_GSD: jax.Array,
    routing: Routing,
    num_experts: int,
    experts_grouped: Callable[[jax.Array, object], jax.Array],
    *,
    layout: str = "sorted",
) -> jax.Array:
    """Rows grouped by expert, one grouped matmul per projection; returns y_GSD in float32.

    Args:
        x_GSD: tokens.
        routing: kept assignments.
        num_experts: E.
        experts_grouped: ``(x_MD, group_sizes_E) -> y_MD`` for ``layout="sorted"``, ``(x_RD, CoreLayout) ->
            y_RD`` for ``layout="core"``.
        layout: ``"sorted"`` (contiguous rows per expert) or ``"core"`` (``core_layout``).
    """
    G, S, D = x_GSD.shape
    # Dropped assignments get the sentinel expert E: they sort last and fall outside every group.
    expert_M = jnp.where(routing.kept_GN, routing.expert_GN, num_experts).reshape(-1)
    row_M = (routing.token_GN + S * jnp.arange(G, dtype=jnp.int32)[:, None]).reshape(-1)
    y_ND = grouped_rows(x_GSD.reshape(G * S, D), row_M, expert_M, num_experts, experts_grouped, layout=layout)
    y_ND = y_ND * routing.weight_GN.reshape(-1, 1)  # weighted in float32
    return combine_assignments(y_ND.reshape(G, -1, y_ND.shape[-1]), routing, S)


def grouped_rows(
    x_TD: jax.Array,
    row_M: jax.Array,
    expert_M: jax.Array,
    num_experts: int,
    experts_grouped: Callable[[jax.Array, object], jax.Array],
    *,
    layout: str = "sorted",
) -> jax.Array:
    """Expert outputs of rows ``x_TD[row_M]``, each through expert ``expert_M``, in assignment order.

    The grouped core of :func:`dispatch_grouped`, shared with the expert-parallel transports (which run it
    on the rows they received).

    Args:
        x_TD: source rows.
        row_M: ``[M]`` source row of each assignment (rows may repeat).
        expert_M: ``[M]`` expert of each assignment; ids outside ``[0, num_experts)`` give zero rows.
        num_experts: E.
        experts_grouped: as in :func:`dispatch_grouped`.
        layout: ``"sorted"`` or ``"core"``.

    Returns:
        ``y_MD`` float32, unweighted.
    """
    E = num_experts
    if layout == "core":
        plan, slot_M, valid_M = core_layout.plan(expert_M, E)
        R = E * core_layout.core_capacity(expert_M.shape[0], E)
        # Layout rows no assignment uses read token 0: finite values whose cotangent is exactly zero.
        token_R = jnp.zeros((R,), jnp.int32).at[jnp.where(valid_M, slot_M, R)].set(row_M, mode="drop")
        y_RD = experts_grouped(permute.gather_rows(x_TD, token_R), plan)
        return jnp.where(valid_M[:, None], permute.gather_rows(y_RD, slot_M).astype(jnp.float32), 0)
    order_M, group_sizes_E = permute.sort_by_expert(expert_M, E)  # the one stable argsort
    inverse_M = permute.inverse_permutation(order_M)  # a scatter, not a second sort
    x_MD = permute.gather_rows(x_TD, row_M[order_M])  # backward: f32 scatter-add
    y_MD = experts_grouped(x_MD, group_sizes_E)
    # Back to assignment order by a gather (its backward gathers by order_M).
    return permute.permute_rows(y_MD, inverse_M, order_M).astype(jnp.float32)


def combine_assignments(y_GND: jax.Array, routing: Routing, tokens_per_group: int) -> jax.Array:
    """Sums weighted assignment outputs into their tokens."""
    G, N, D = y_GND.shape
    if routing.kind == TOKEN_CHOICE:
        # Token-major assignments: the K outputs of a token are adjacent.
        return y_GND.reshape(G, tokens_per_group, routing.top_k, D).sum(axis=2)
    return jax.vmap(lambda y, t: jnp.zeros((tokens_per_group, D), y.dtype).at[t].add(y))(
        y_GND, routing.token_GN
    )
