"""Grouped matrix multiplication: rows of ``lhs`` sorted by group, each group times its own matrix.

``gmm(lhs[M, K], rhs[G, K, N], group_sizes[G]) -> out[M, N]``: rows ``[start_g, start_g + size_g)`` of
``lhs`` are multiplied by ``rhs[g]``; rows past ``sum(group_sizes)`` come out zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla")


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, backend: str = "auto") -> jax.Array:
    """Grouped matmul; see the module docstring. Output dtype is ``lhs.dtype``."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped matmul backend={backend!r} is unknown; choose one of {BACKENDS}")
    return jax.lax.ragged_dot(
        lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32
    ).astype(lhs.dtype)
