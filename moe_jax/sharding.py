"""The one logical-axis vocabulary, the sharding-strategy presets and mesh construction.

This is the only module that spells ``PartitionSpec``s. Modules annotate parameters and activations with
*logical* axis names; a preset (a tuple of ``(logical, mesh_axes)`` rules) maps those onto the *mesh* axes
``data``, ``fsdp``, ``expert`` and ``tensor``.

Logical axes:
    Parameters: ``embed`` (d_model), ``mlp`` (d_ff), ``expert`` (E), ``heads`` (query heads), ``kv_heads``
    (key/value heads, fewer than ``heads`` under grouped-query attention), ``kv`` (head width), ``vocab``,
    ``layers`` (the stacking axis of scanned blocks, never sharded).
    Activations: ``act_batch`` (batch or token groups), ``act_length``, ``act_embed``, ``act_expert``
    (the expert dim of dispatched buffers), ``act_capacity``, ``act_mlp``.

Strategies (``PRESETS``):
    ``dp``: parameters replicated, batch over every mesh axis.
    ``fsdp``: parameters sharded over ``fsdp`` on their ``embed`` dim, batch over every axis.
    ``ep``: experts over ``expert``, the rest replicated; batch over every axis.
    ``ep_fsdp``: ``ep`` plus ``embed`` over ``fsdp``.
    ``ep_tp``: ``ep`` plus attention heads and MLP widths over ``tensor``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Batch-like activations are split over every axis that is not busy with parameters inside the op.
_BATCH_AXES = ("data", "fsdp", "expert")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_COMMON_ACTIVATIONS: Rules = (
    ("layers", None),  # the stacked-blocks axis of scanned layers: every chip holds every layer's slice
    ("act_batch", _BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_capacity", None),
)

PRESETS: dict[str, Rules] = {
    "dp": _COMMON_ACTIVATIONS
    + (("embed", None), ("mlp", None), ("expert", None), ("heads", None), ("kv", None), ("vocab", None))
    + (("act_expert", None), ("act_mlp", None), ("act_heads", None)),
    "fsdp": _COMMON_ACTIVATIONS
    + (("embed", "fsdp"), ("mlp", None), ("expert", None), ("heads", None), ("kv", None), ("vocab", None))
    + (("act_expert", None), ("act_mlp", None), ("act_heads", None)),
    "ep": _COMMON_ACTIVATIONS
    + (("embed", None), ("mlp", None), ("expert", "expert"), ("heads", None), ("kv", None), ("vocab", None))
    + (("act_expert", "expert"), ("act_mlp", None), ("act_heads", None)),
    "ep_fsdp": _COMMON_ACTIVATIONS
    + (("embed", "fsdp"), ("mlp", None), ("expert", "expert"), ("heads", None), ("kv", None), ("vocab", None))
    + (("act_expert", "expert"), ("act_mlp", None), ("act_heads", None)),
    "ep_tp": _COMMON_ACTIVATIONS
    + (("embed", None), ("mlp", "tensor"), ("expert", "expert"), ("heads", "tensor"), ("kv", None))
    + (("vocab", "tensor"), ("act_expert", "expert"), ("act_mlp", "tensor"), ("act_heads", "tensor")),
}

# Key/value heads are laid out like the query heads in every preset (grouped-query attention included).
PRESETS = {name: rules + (("kv_heads", dict(rules)["heads"]),) for name, rules in PRESETS.items()}


def preset_rules(name: str) -> Rules:
    """Returns the logical-axis rules of a sharding strategy.

    Raises:
        ValueError: ``name`` is not a known preset.
    """
    if name not in PRESETS:
        raise ValueError(f"sharding preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def logical_to_spec(
    logical_axes: Sequence[str | None] | None, rules: Rules, mesh_axis_names: Sequence[str] | None = None
) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec`` through ``rules``.

    A mesh axis is used at most once per spec (a later dim that wants it stays replicated), and mesh axes
    absent from ``mesh_axis_names`` (or of size one, if the caller filtered them) are dropped.
    """
    if logical_axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh_axis_names is None or a in mesh_axis_names))
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param(value: jax.Array, logical_axes: tuple[str | None, ...]) -> nnx.Param:
    """Wraps ``value`` in an ``nnx.Param`` carrying logical-axis metadata.

    Eager sharding is off on purpose: modules build the same way with or without a mesh (a notebook on one
    device, or under ``jax.set_mesh``); placement on a mesh is done by :func:`shard_state` or by ``jit``
    out-shardings from :func:`state_shardings`.
    """
    return nnx.Param(value, out_sharding=logical_axes, eager_sharding=False)


def current_rules() -> Rules:
    """Rules of the enclosing ``nnx.logical_axis_rules`` context, or ``ep`` when none is set."""
    rules = flax_spmd.get_logical_axis_rules()
    return tuple(rules) if rules else PRESETS["ep"]


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context.

    Only mesh axes whose size divides the constrained dim are kept, so a constraint never makes a shape
    illegal (for example a single group on a 4-way data axis stays replicated).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return x  # inside shard_map the layout is explicit already
    spec = logical_to_spec(logical_axes, current_rules(), mesh.axis_names)
    spec = _fit_spec_to_shape(spec, x.shape, dict(zip(mesh.axis_names, mesh.axis_sizes)))
    return jax.lax.with_sharding_constraint(x, spec)


def _fit_spec_to_shape(
    spec: PartitionSpec, shape: Sequence[int], sizes: Mapping[str, int], strict_name: str | None = None
) -> PartitionSpec:
    """Drops mesh axes that do not divide their dim; with ``strict_name`` raises instead."""
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept, prod = [], 1
        for a in axes:
            if dim % (prod * sizes[a]) == 0:
                kept.append(a)
                prod *= sizes[a]
            elif strict_name is not None:
                raise ValueError(
                    f"{strict_name}: dim of size {dim} (shape {tuple(shape)}) is not divisible by mesh axis "
                    f"{a!r} of size {sizes[a]}; change the model size or the mesh shape"
                )
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def make_mesh(
    shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """Builds a mesh over the axes ``data, fsdp, expert, tensor`` (GSPMD ``Auto`` axis types).

    Args:
        shape: sizes per axis, as a mapping (missing axes are 1) or a 4-sequence in ``MESH_AXES`` order. One
            size may be ``-1``: it is filled so the product equals the device count.
        devices: defaults to ``jax.devices()``. Multi-host: ``jax.devices()`` is ordered by process, so the
            leading (``data``) axis spans hosts, which keeps the slow links on the data-parallel all-reduce.

    Raises:
        ValueError: the sizes do not multiply to the device count, or more than one is ``-1``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh axes {sorted(unknown)} are unknown; the axes are {MESH_AXES}")
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh shape {tuple(sizes)} must give one size per axis {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if known <= 0 or len(devices) % known:
            raise ValueError(
                f"mesh shape {dict(zip(MESH_AXES, sizes))}: the fixed sizes multiply to {known}, which does "
                f"not divide the {len(devices)} devices"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if any(s < 1 for s in sizes) or math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, sizes))} multiplies to {math.prod(sizes)} but there are "
            f"{len(devices)} devices; make the product equal the device count (one size may be -1)"
        )
    device_array = np.asarray(devices, dtype=object).reshape(sizes)
    return jax.sharding.Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.State:
    """``NamedSharding`` per variable from its ``out_sharding`` metadata (replicated where absent)."""

    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))

    def one(path, variable):
        axes = variable.get_metadata().get("out_sharding")
        spec = logical_to_spec(axes, rules, mesh.axis_names)
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        spec = _fit_spec_to_shape(spec, np.shape(variable.get_value()), sizes, strict_name=name)
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def shard_state(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.State:
    """Places every variable of ``state`` on ``mesh`` according to its logical axes."""
    shardings = state_shardings(state, mesh, rules)
    return jax.tree.map(
        lambda v, s: v.replace(jax.device_put(v.get_value(), s)),
        state,
        shardings,
        is_leaf=lambda v: isinstance(v, nnx.Variable | NamedSharding),
    )
