"""Explicit expert parallelism: ``jax.shard_map`` over the ``expert`` mesh axis, with three token transports.

The GSPMD path (sharding constraints on the dispatched buffer, ``dispatch.py``) leaves the collective to the
compiler. This path spells it out. Each device routes its own token groups, then (``transport``):

``capacity``: capacity buffers [E, R, D] (R = G_local·C rows per expert) ``all_to_all`` over ``expert`` to
    [E_local, n·R, D], through the local experts and back. Fixed shapes; with dropless routing C = S, so it
    sends E/K times the bytes the tokens need.
``ring``: ring of experts. All-gather the tokens (and their routing) over ``expert``, run every assignment
    that goes to a local expert through the grouped matmul, ``psum_scatter`` the partial outputs back to their
    shards (in float32: it sums n partials). Per device (n−1)/n of the gathered tokens each way.
``ragged``: one ``ragged_all_to_all`` each way moving exactly the assignments routed to each shard's experts
    (sizes exchanged first, ``ragged_exchange.py``); the local experts run on the received rows with the
    grouped matmul. Per device, K·D values per token each way (plus a few hundred bytes of sizes).

All three are exact (the same outputs, routing statistics and gradients as one device) for any routing;
``ring`` and ``ragged`` are dropless without padding. Because the grouped matmul runs inside ``shard_map``,
each device sees an ordinary local computation, so the Mosaic kernels (megablox) work over several chips,
which GSPMD cannot partition.

Expert weights stay sharded over ``expert`` (their optimizer state too, since it follows the parameters);
weights sharded over ``fsdp`` on their ``embed`` dim are all-gathered inside, and an ``mlp`` dim sharded over
``tensor`` yields partial sums that are ``psum``-ed. Routing statistics are summed over the batch shards, so
the losses and metrics equal the unsharded ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moe_jax import sharding
from moe_jax.moe import dispatch as dispatch_lib
from moe_jax.moe import experts as experts_lib
from moe_jax.moe import grouped_matmul, permute, ragged_exchange
from moe_jax.moe.routing import Routing

TRANSPORTS = ("capacity", "ring", "ragged")


def _axis_of(spec: PartitionSpec, dim: int) -> tuple[str, ...]:
    entry = tuple(spec)[dim] if dim < len(spec) else None
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def expert_parallel_moe(
    x_GSD: jax.Array,
    logits_GSE: jax.Array,
    mask_GS: jax.Array,
    weights: tuple[jax.Array | None, jax.Array, jax.Array],
    *,
    route: Callable[[jax.Array, jax.Array], Routing],
    num_experts: int,
    capacity: int,
    activation: str,
    transport: str = "capacity",
    grouped_backend: str = "core",
) -> tuple[jax.Array, dict]:
    """Routes, exchanges, computes and combines inside ``shard_map`` over the context mesh.

    Args:
        x_GSD: tokens in groups (compute dtype).
        logits_GSE: float32 router logits of those tokens.
        mask_GS: True for real tokens.
        weights: (w_gate_EDF or None, w_up_EDF, w_down_EFD) in the compute dtype.
        route: ``route(logits_GSE, mask_GS) -> Routing`` for one shard's groups (groups are independent, so
            routing per shard equals routing of the whole batch).
        num_experts: E.
        capacity: C slots per expert per group of the ``capacity`` transport (dropless routing uses C = S).
        activation: expert activation name.
        transport: ``capacity``, ``ring`` or ``ragged`` (see the module docstring).
        grouped_backend: the local grouped matmul of ``ring`` and ``ragged``: ``core`` or a
            ``grouped_matmul`` backend (resolved, not ``auto``).

    Returns:
        ``(y_GSD float32, summed routing statistics)``.

    Raises:
        ValueError: no mesh is set, the groups do not divide over the batch axes, or the transport is
            unknown.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"ep_transport={transport!r} is unknown; choose one of {TRANSPORTS}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        raise ValueError("expert_parallel='shard_map' needs a mesh: call the layer under jax.set_mesh(mesh)")
    rules = sharding.current_rules()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch_axes = _axis_of(sharding.logical_to_spec(("act_batch",), rules, mesh.axis_names), 0)
    # Size-1 axes stay in: the expert weights still vary over them in shard_map's replication check.
    shards = 1
    for a in batch_axes:
        shards *= sizes[a]
    G = x_GSD.shape[0]
    if G % shards:
        raise ValueError(
            f"expert_parallel='shard_map': {G} token groups do not divide over the batch mesh axes "
            f"{batch_axes} of total size {shards}; make batch (or tokens / group_size) a multiple of {shards}"
        )
    w_gate, w_up, w_down = weights
    in_spec = sharding.logical_to_spec(("expert", "embed", "mlp"), rules, mesh.axis_names)
    out_spec = sharding.logical_to_spec(("expert", "mlp", "embed"), rules, mesh.axis_names)
    expert_axes = _axis_of(in_spec, 0)
    embed_axes, mlp_axes = _axis_of(in_spec, 1), _axis_of(in_spec, 2)
    for a in expert_axes:
        if num_experts % sizes[a]:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by mesh axis {a!r} of size {sizes[a]}"
            )
    act_spec = PartitionSpec(batch_axes or None)

    def body(x_GSD, logits_GSE, mask_GS, w_gate, w_up, w_down):
        # FSDP: parameters are stored sharded over their embed dim; gather them for the matmuls.
        for a in embed_axes:
            w_up = jax.lax.all_gather(w_up, a, axis=1, tiled=True)
            w_gate = None if w_gate is None else jax.lax.all_gather(w_gate, a, axis=1, tiled=True)
            w_down = jax.lax.all_gather(w_down, a, axis=2, tiled=True)

        routing = route(logits_GSE, mask_GS)
        if transport == "capacity":

            def experts_ERD(x_ERD):
                for a in expert_axes:
                    x_ERD = jax.lax.all_to_all(x_ERD, a, 0, 1, tiled=True)
                y_ERD = experts_lib.expert_ffn_ECD(x_ERD, w_gate, w_up, w_down, activation)
                for a in mlp_axes:  # each tensor shard holds a slice of F: partial sums
                    y_ERD = jax.lax.psum(y_ERD, a)
                for a in reversed(expert_axes):
                    y_ERD = jax.lax.all_to_all(y_ERD, a, 1, 0, tiled=True)
                return y_ERD

            y_GSD = dispatch_lib.dispatch_indices(x_GSD, routing, num_experts, capacity, experts_ERD)
        else:

            def experts_grouped(x_MD, grouping):
                x_MD, *ws = _vary_alike(x_MD, w_gate, w_up, w_down)
                return experts_lib.expert_ffn_grouped(
                    x_MD, grouping, *ws, activation, backend=grouped_backend
                )

            layout = "core" if grouped_backend == "core" else "sorted"
            if expert_axes:
                exchange = _ring if transport == "ring" else _ragged
                y_GSD = exchange(x_GSD, routing, num_experts, experts_grouped, layout, expert_axes)
            else:  # experts not sharded (a preset without an expert axis): nothing to exchange
                y_GSD = dispatch_lib.dispatch_grouped(
                    x_GSD, routing, num_experts, experts_grouped, layout=layout
                )
            if mlp_axes:  # partial sums over the tensor shards' slices of F, summed once at the end
                y_GSD = jax.lax.psum(y_GSD, mlp_axes)
        stats = routing.stats
        if batch_axes:
            stats = jax.lax.psum(stats, batch_axes)
        return y_GSD, stats

    w_gate_spec = None if w_gate is None else in_spec
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(act_spec, act_spec, act_spec, w_gate_spec, in_spec, out_spec),
        out_specs=(act_spec, PartitionSpec()),
        # megablox / mosaic_gpu build their pallas_call output shapes without a manual-axis type, which the
        # replication check refuses; without the check the same body gives the same (tested) gradients.
        check_vma=not (transport != "capacity" and grouped_backend in grouped_matmul.PALLAS_BACKENDS),
    )
    return fn(x_GSD, logits_GSE, mask_GS, w_gate, w_up, w_down)


def _vary_alike(*arrays):
    """Casts arrays to vary over the same manual mesh axes (``None`` passes through).

    The grouped matmuls' custom VJPs must return each cotangent with its input's type, but a weight
    gradient built from tokens varies over the batch axes the (expert-sharded) weight does not; once every
    input varies alike, the cast's transpose outside the custom VJP is the ``psum`` the gradient needs.
    """
    axes = set()
    for a in arrays:
        if a is not None:
            axes |= set(jax.typeof(a).manual_axis_type.varying)
    out = []
    for a in arrays:
        missing = None if a is None else tuple(sorted(axes - set(jax.typeof(a).manual_axis_type.varying)))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return out


def _ring(x_GSD, routing: Routing, num_experts, experts_grouped, layout, expert_axes) -> jax.Array:
    """All-gather tokens over ``expert``, local experts on their assignments, reduce-scatter back."""
    G, S, D = x_GSD.shape
    n = jax.lax.psum(1, expert_axes)
    local_experts = num_experts // n
    gather = functools.partial(jax.lax.all_gather, axis_name=expert_axes, axis=0, tiled=True)
    x_all_GSD = gather(x_GSD)
    token_GN, expert_GN = gather(routing.token_GN), gather(routing.expert_GN)
    weight_GN, kept_GN = gather(routing.weight_GN), gather(routing.kept_GN)
    local_GN = expert_GN - jax.lax.axis_index(expert_axes) * local_experts
    mine_GN = kept_GN & (local_GN >= 0) & (local_GN < local_experts)
    # Assignments of other shards' experts get the sentinel: no row in the grouped matmul, output zero.
    expert_M = jnp.where(mine_GN, local_GN, local_experts).reshape(-1)
    row_M = (token_GN + S * jnp.arange(n * G, dtype=jnp.int32)[:, None]).reshape(-1)
    y_MD = dispatch_lib.grouped_rows(
        x_all_GSD.reshape(n * G * S, D), row_M, expert_M, local_experts, experts_grouped, layout=layout
    )
    y_MD = y_MD * jnp.where(mine_GN, weight_GN, 0.0).reshape(-1, 1)
    y_all_GSD = dispatch_lib.combine_assignments(
        y_MD.reshape(n * G, -1, D), routing.replace(token_GN=token_GN), S
    )
    return jax.lax.psum_scatter(y_all_GSD, expert_axes, scatter_dimension=0, tiled=True)


def _ragged(x_GSD, routing: Routing, num_experts, experts_grouped, layout, expert_axes) -> jax.Array:
    """Exactly the routed rows to their experts' shards and back (``ragged_exchange``)."""
    G, S, D = x_GSD.shape
    n = jax.lax.psum(1, expert_axes)
    # Dropped assignments get the sentinel E: they sort last and are sent nowhere.
    expert_M = jnp.where(routing.kept_GN, routing.expert_GN, num_experts).reshape(-1)
    row_M = (routing.token_GN + S * jnp.arange(G, dtype=jnp.int32)[:, None]).reshape(-1)
    order_M, group_sizes_E = permute.sort_by_expert(expert_M, num_experts)
    x_MD = permute.gather_rows(x_GSD.reshape(G * S, D), row_M[order_M])
    plan = ragged_exchange.plan(group_sizes_E, expert_axes)
    x_RD = ragged_exchange.forward(x_MD, plan, expert_axes)
    R = x_RD.shape[0]
    expert_R = ragged_exchange.received_experts(plan, R)
    y_RD = dispatch_lib.grouped_rows(
        x_RD, jnp.arange(R, dtype=jnp.int32), expert_R, num_experts // n, experts_grouped, layout=layout
    )
    y_MD = ragged_exchange.backward(y_RD.astype(x_GSD.dtype), plan, x_MD.shape[0], expert_axes)
    y_ND = permute.permute_rows(y_MD, permute.inverse_permutation(order_M), order_M).astype(jnp.float32)
    y_ND = y_ND * routing.weight_GN.reshape(-1, 1)
    return dispatch_lib.combine_assignments(y_ND.reshape(G, -1, D), routing, S)
