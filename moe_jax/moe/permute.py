"""The permutation around a grouped matmul: sort assignments by expert, gather their rows, and back.

One stable argsort gives the expert-major order; everything else is gathers. The inverse of that order is a
scatter of ``arange`` (linear time), never a second argsort. Row gathers carry custom VJPs so their backward
passes are a scatter-add with the same indices (``gather_rows``: rows may repeat, e.g. a token sent to K
experts) or a plain gather by the inverse permutation (``permute_rows``: a bijection, cheaper than a
scatter).

Shape letters: T source rows (tokens), M assignment rows, D features, E experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sort_by_expert(expert_M: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Expert-major order of assignments and the row count of each expert.

    Args:
        expert_M: ``[M]`` integer expert id per assignment. Ids outside ``[0, num_experts)`` (e.g. a
            sentinel ``num_experts`` for dropped assignments) sort after every expert and are counted in no
            group, so a grouped matmul gives them zero rows.
        num_experts: E.

    Returns:
        ``(order_M, group_sizes_E)``: ``expert_M[order_M]`` is sorted, ties kept in assignment order
        (stable); ``group_sizes_E`` int32 counts of each expert's assignments.
    """
    order_M = jnp.argsort(expert_M, stable=True).astype(jnp.int32)
    group_sizes_E = jnp.zeros((num_experts,), jnp.int32).at[expert_M].add(1, mode="drop")
    return order_M, group_sizes_E


def inverse_permutation(perm_M: jax.Array) -> jax.Array:
    """``inv`` with ``inv[perm[i]] = i``, by one scatter (no second sort)."""
    M = perm_M.shape[0]
    return jnp.zeros((M,), jnp.int32).at[perm_M].set(jnp.arange(M, dtype=jnp.int32), unique_indices=True)


@jax.custom_vjp
def gather_rows(x_TD: jax.Array, rows_M: jax.Array) -> jax.Array:
    """``x_TD[rows_M]``; the backward scatter-adds into ``T`` rows (in float32) with the same indices.

    Args:
        x_TD: ``[T, D]`` source rows.
        rows_M: ``[M]`` int indices into ``T``; repeats are allowed (their gradients add up).

    Returns:
        ``[M, D]`` gathered rows.
    """
    return jnp.take(x_TD, rows_M, axis=0, mode="clip")


def _gather_rows_fwd(x_TD, rows_M):
    # A zero-width slice carries T and the dtype to the backward without keeping x alive.
    return gather_rows(x_TD, rows_M), (rows_M, x_TD[:, :0])


def _gather_rows_bwd(residuals, dy_MD):
    rows_M, x_T0 = residuals
    # Accumulate in float32: a row gathered K times in bf16 would round after every add.
    dx_TD = jnp.zeros((x_T0.shape[0], dy_MD.shape[1]), jnp.float32).at[rows_M].add(dy_MD.astype(jnp.float32))
    return dx_TD.astype(x_T0.dtype), None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@jax.custom_vjp
def permute_rows(x_MD: jax.Array, perm_M: jax.Array, inverse_M: jax.Array) -> jax.Array:
    """``x_MD[perm_M]`` for a bijection ``perm_M``; the backward gathers by ``inverse_M``.

    Args:
        x_MD: ``[M, D]`` rows.
        perm_M: ``[M]`` a permutation of ``arange(M)``.
        inverse_M: ``inverse_permutation(perm_M)`` (passed in so one scatter serves several calls).

    Returns:
        ``[M, D]`` permuted rows.
    """
    return jnp.take(x_MD, perm_M, axis=0, mode="clip")


def _permute_rows_fwd(x_MD, perm_M, inverse_M):
    return permute_rows(x_MD, perm_M, inverse_M), (perm_M, inverse_M)


def _permute_rows_bwd(residuals, dy_MD):
    perm_M, inverse_M = residuals
    # y[i] = x[perm[i]]  =>  dx[j] = dy[inv[j]]: a gather, since every j is hit exactly once.
    return jnp.take(dy_MD, inverse_M, axis=0, mode="clip"), None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)
