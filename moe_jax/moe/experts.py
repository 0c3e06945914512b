"""Expert feed-forward networks: activations, stacked expert FFNs on capacity buffers, grouped rows."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe_jax.moe import core_layout, grouped_matmul

# name -> (elementwise function, gated?)
ACTIVATIONS: dict[str, tuple[Callable[[jax.Array], jax.Array], bool]] = {
    "swiglu": (jax.nn.silu, True),
    "geglu": (lambda x: jax.nn.gelu(x, approximate=False), True),
    "gelu": (lambda x: jax.nn.gelu(x, approximate=False), False),
    "relu": (jax.nn.relu, False),
    "silu": (jax.nn.silu, False),
}


def check_activation(activation: str) -> tuple[Callable[[jax.Array], jax.Array], bool]:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def ffn_hidden(gate: jax.Array | None, up: jax.Array, activation: str) -> jax.Array:
    """act(gate) · up for gated activations, act(up) otherwise."""
    fn, gated = ACTIVATIONS[activation]
    return fn(gate) * up if gated else fn(up)


def expert_ffn_ECD(
    x_ECD: jax.Array,
    w_gate_EDF: jax.Array | None,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
    activation: str,
) -> jax.Array:
    """Every expert on its own rows: batched matmuls over the leading expert dim."""
    up_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, w_up_EDF)
    gate_ECF = None if w_gate_EDF is None else jnp.einsum("ecd,edf->ecf", x_ECD, w_gate_EDF)
    return jnp.einsum("ecf,efd->ecd", ffn_hidden(gate_ECF, up_ECF, activation), w_down_EFD)


def expert_ffn_grouped(
    x_MD: jax.Array,
    grouping,
    w_gate_EDF: jax.Array | None,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
    activation: str,
    backend: str = "auto",
) -> jax.Array:
    """Expert FFN on rows grouped by expert.

    Args:
        x_MD: rows sorted by expert (``grouping`` = ``group_sizes_E``; rows past their sum give zero), or,
            with ``backend="core"``, rows in a ``core_layout`` (``grouping`` = its ``CoreLayout``).
        grouping: ``group_sizes_E`` or a ``core_layout.CoreLayout``.
        w_gate_EDF, w_up_EDF, w_down_EFD: expert weights (``w_gate_EDF`` None for ungated activations).
        activation: a name in ``ACTIVATIONS``.
        backend: ``"core"`` or a ``grouped_matmul`` backend.

    Gated activations fuse gate and up into one grouped matmul of width 2F (not for ``core``).
    """
    if backend == "core":
        matmul = lambda x, w: core_layout.gmm(x, w, grouping)
    else:
        matmul = lambda x, w: grouped_matmul.gmm(x, w, grouping, backend=backend)
    if w_gate_EDF is None:
        return matmul(ffn_hidden(None, matmul(x_MD, w_up_EDF), activation), w_down_EFD)
    if backend == "core":
        # Batched dots gain nothing from a wider N; the fused weight's concat and the split of its output
        # (and both again in the backward pass) cost ~10% of the layer on CPU.
        hidden_MF = ffn_hidden(matmul(x_MD, w_gate_EDF), matmul(x_MD, w_up_EDF), activation)
        return matmul(hidden_MF, w_down_EFD)
    F = w_up_EDF.shape[-1]
    gate_up_M2F = matmul(x_MD, jnp.concatenate([w_gate_EDF, w_up_EDF], axis=-1))
    return matmul(ffn_hidden(gate_up_M2F[:, :F], gate_up_M2F[:, F:], activation), w_down_EFD)


def dense_ffn(
    x_TD: jax.Array,
    w_gate_DF: jax.Array | None,
    w_up_DF: jax.Array,
    w_down_FD: jax.Array,
    activation: str,
) -> jax.Array:
    """A dense FFN (shared experts; the benchmark's baseline)."""
    gate_TF = None if w_gate_DF is None else x_TD @ w_gate_DF
    return ffn_hidden(gate_TF, x_TD @ w_up_DF, activation) @ w_down_FD
