"""Explicit expert parallelism: ``jax.shard_map`` with ``all_to_all`` over the ``expert`` mesh axis.

The GSPMD path (sharding constraints on the dispatched buffer, ``dispatch.py``) leaves the collective to the
compiler. This path spells it out, so what crosses the network is exactly the capacity buffers:

    per device: local groups x_GSD ──route──▶ capacity buffer [E, R, D] (R = G_local·C rows per expert)
        ──all_to_all(expert)──▶ [E_local, n·R, D] ──local experts──▶ ──all_to_all back──▶ combine.

Expert weights stay sharded over ``expert`` (their optimizer state too, since it follows the parameters);
weights sharded over ``fsdp`` on their ``embed`` dim are all-gathered inside, and an ``mlp`` dim sharded over
``tensor`` yields partial sums that are ``psum``-ed. Routing statistics are summed over the batch shards, so
the losses and metrics equal the unsharded ones.

``jax.lax.ragged_all_to_all`` would avoid the capacity padding, but XLA:CPU rejects it, so the fixed-capacity
exchange is the path that runs (and is tested) everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec

from moe_jax import sharding
from moe_jax.moe import dispatch as dispatch_lib
from moe_jax.moe import experts as experts_lib
from moe_jax.moe.routing import Routing


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
        capacity: C slots per expert per group (dropless routing uses C = S).
        activation: expert activation name.

    Returns:
        ``(y_GSD float32, summed routing statistics)``.

    Raises:
        ValueError: no mesh is set, or the groups do not divide over the batch axes.
    """
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

        def experts_ERD(x_ERD):
            for a in expert_axes:
                x_ERD = jax.lax.all_to_all(x_ERD, a, 0, 1, tiled=True)
            y_ERD = experts_lib.expert_ffn_ECD(x_ERD, w_gate, w_up, w_down, activation)
            for a in mlp_axes:  # each tensor shard holds a slice of F: partial sums
                y_ERD = jax.lax.psum(y_ERD, a)
            for a in reversed(expert_axes):
                y_ERD = jax.lax.all_to_all(y_ERD, a, 1, 0, tiled=True)
            return y_ERD

        routing = route(logits_GSE, mask_GS)
        y_GSD = dispatch_lib.dispatch_indices(x_GSD, routing, num_experts, capacity, experts_ERD)
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
    )
    return fn(x_GSD, logits_GSE, mask_GS, w_gate, w_up, w_down)
