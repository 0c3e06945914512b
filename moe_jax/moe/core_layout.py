"""Dropless grouped matmul in a "core + overflow" row layout: one batched dot for (almost) every row.

On CPU a batched dot ``[G, C, K] @ [G, K, N]`` runs at dense-matmul speed, while per-group dots written into
an ``[M, N]`` output cost 20-30% more (every extra pass over the output is ~10% of a matmul at these
sizes). This layout lets the dispatcher gather tokens straight into a batched-dot shape and read the results
straight back, so no copy sits between the matmuls and the permutation:

* ``R = G * C`` rows, ``C = ceil(M / G)``: rows ``[g * C, g * C + C)`` are expert ``g``'s *core*. The first
  ``min(size_g, C)`` assignments of expert ``g`` (in sorted order) go there.
* Core slots past ``size_g`` are *holes*. The rows an expert has beyond ``C`` (*overflow*) go into the holes,
  in hole order, grouped by expert. There are always enough holes: ``R >= M``.
* Forward: one batched dot over all cores (a hole gets a product with the wrong expert's weights), then the
  overflow rows, expert by expert in power-of-two chunks (the grouped-matmul ladder), are gathered from their
  holes, multiplied by their own expert and written over the wrong products. Unused holes keep finite
  garbage that nothing reads (their cotangent is exactly zero).
* The weight gradient masks the holes out of the batched dot and adds the overflow rows' products.

With balanced routing (what the load-balancing loss drives towards) the overflow is a few percent of the
rows, so the cost is one batched dot plus that few percent; if every row goes to one expert it is at most
two batched dots' worth of FLOPs plus the ladder over ``M - C`` rows: still exact, just slower.

Shape letters: M assignments, R layout rows, G groups (experts), C core capacity, K/N matmul dims.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from moe_jax.moe import grouped_matmul, permute


class CoreLayout(NamedTuple):
    """Where each expert's rows live in the ``[R = G * C]`` layout (all int32, no static fields).

    Attributes:
        group_sizes_G: rows per expert (dropped assignments excluded).
        overflow_start_G: first position of expert ``g``'s overflow rows in the hole sequence.
        overflow_G: ``max(size_g - C, 0)``.
        hole_rows_R: layout rows that are holes, in increasing order; entries past the hole count are 0.
    """

    group_sizes_G: jax.Array
    overflow_start_G: jax.Array
    overflow_G: jax.Array
    hole_rows_R: jax.Array


def plan(expert_M: jax.Array, num_experts: int) -> tuple[CoreLayout, jax.Array, jax.Array]:
    """Lays the assignments out by expert in the core + overflow layout.

    Args:
        expert_M: ``[M]`` expert id per assignment; ids outside ``[0, num_experts)`` (a sentinel for dropped
            assignments) get no row.
        num_experts: G.

    Returns:
        ``(layout, row_M, valid_M)``: ``row_M`` is each assignment's layout row (0 where not ``valid_M``);
        rows of valid assignments are distinct.
    """
    M = expert_M.shape[0]
    G = num_experts
    C = core_capacity(M, G)
    R = G * C
    order_M, sizes_G = permute.sort_by_expert(expert_M, G)  # the one stable argsort
    starts_G = jnp.cumsum(sizes_G) - sizes_G
    # Everything below is in sorted order (index i): group, position in group, core or overflow.
    group_i = expert_M[order_M]
    valid_i = (group_i >= 0) & (group_i < G)
    group_i = jnp.clip(group_i, 0, G - 1)
    slot_i = jnp.arange(M, dtype=jnp.int32) - starts_G[group_i]
    in_core_i = valid_i & (slot_i < C)
    overflow_i = valid_i & (slot_i >= C)
    overflow_rank_i = jnp.cumsum(overflow_i, dtype=jnp.int32) - 1  # overflow sorted by expert
    # Holes in increasing row order, compacted by a scatter of their ranks (linear, no sort).
    row_R = jnp.arange(R, dtype=jnp.int32)
    hole_R = (row_R % C) >= sizes_G[row_R // C]
    hole_rank_R = jnp.where(hole_R, jnp.cumsum(hole_R, dtype=jnp.int32) - 1, R)
    hole_rows_R = jnp.zeros((R,), jnp.int32).at[hole_rank_R].set(row_R, mode="drop")
    row_i = jnp.where(
        in_core_i,
        group_i * C + slot_i,
        jnp.where(overflow_i, hole_rows_R[jnp.clip(overflow_rank_i, 0, R - 1)], 0),
    )
    # Back to assignment order: row_M[order[i]] = row_i (a scatter; order is a permutation).
    row_M = jnp.zeros((M,), jnp.int32).at[order_M].set(row_i, unique_indices=True)
    valid_M = jnp.zeros((M,), bool).at[order_M].set(valid_i, unique_indices=True)
    overflow_G = jnp.maximum(sizes_G - C, 0)
    layout = CoreLayout(sizes_G, jnp.cumsum(overflow_G) - overflow_G, overflow_G, hole_rows_R)
    return layout, row_M, valid_M


def core_capacity(num_rows: int, num_groups: int) -> int:
    """``C = ceil(M / G)`` (at least 1): the mean group size, so cores hold every row when balanced."""
    return max(1, -(-num_rows // num_groups))


def gmm(x_RK: jax.Array, w_GKN: jax.Array, layout: CoreLayout) -> jax.Array:
    """``y[r] = x[r] @ w[expert of row r]`` for every assignment row of the layout.

    Args:
        x_RK: ``[G * C, K]`` rows in the layout of ``plan``.
        w_GKN: ``[G, K, N]``.
        layout: from ``plan``.

    Returns:
        ``[G * C, N]`` in ``x_RK.dtype`` (accumulated in float32); hole rows no assignment uses hold finite
        values nothing should read.
    """
    G = w_GKN.shape[0]
    if x_RK.shape[0] % G or x_RK.ndim != 2 or w_GKN.ndim != 3 or x_RK.shape[1] != w_GKN.shape[1]:
        raise ValueError(f"core-layout gmm expects x[G*C, K] and w[G, K, N]; got {x_RK.shape}, {w_GKN.shape}")
    dtype = jnp.result_type(x_RK.dtype, w_GKN.dtype)
    return _gmm(x_RK.astype(dtype), w_GKN.astype(dtype), layout).astype(x_RK.dtype)


@jax.custom_vjp
def _gmm(x_RK, w_GKN, layout):
    return _mm(x_RK, w_GKN, layout, transpose_w=False)


def _gmm_fwd(x_RK, w_GKN, layout):
    return _mm(x_RK, w_GKN, layout, transpose_w=False), (x_RK, w_GKN, layout)


def _gmm_bwd(residuals, dy_RN):
    x_RK, w_GKN, layout = residuals
    dy_RN = dy_RN.astype(x_RK.dtype)
    dx_RK = _mm(dy_RN, w_GKN, layout, transpose_w=True)
    dw_GKN = _tmm(x_RK, dy_RN, layout)
    return dx_RK, dw_GKN.astype(w_GKN.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _mm(x_RK, w_GKN, layout, transpose_w):
    G = w_GKN.shape[0]
    R, K = x_RK.shape
    C = R // G
    contract = 2 if transpose_w else 1
    y_GCN = lax.dot_general(
        x_RK.reshape(G, C, K), w_GKN, (((2,), (contract,)), ((0,), (0,))), preferred_element_type=jnp.float32
    )
    y_RN = y_GCN.astype(x_RK.dtype).reshape(R, -1)
    chunk_contract = (((1,), (1 if transpose_w else 0,)), ((), ()))

    def overflow(y_RN):
        def group_body(g, y_RN):
            w = w_GKN[g]

            def product(rows_B):
                x = jnp.take(x_RK, rows_B, axis=0)
                return lax.dot_general(x, w, chunk_contract, preferred_element_type=jnp.float32).astype(
                    y_RN.dtype
                )

            def full_chunk(y, start, size):
                rows_B = lax.dynamic_slice_in_dim(layout.hole_rows_R, start, size)
                return y.at[rows_B].set(product(rows_B), unique_indices=True)

            def rest_chunk(y, start, keep_B1):
                rows_B = lax.dynamic_slice_in_dim(layout.hole_rows_R, start, keep_B1.shape[0])
                # Rows outside this expert's overflow point past the end and are dropped by the scatter.
                target_B = jnp.where(keep_B1[:, 0], rows_B, R)
                return y.at[target_B].set(product(rows_B), mode="drop")

            return grouped_matmul.over_chunks(
                R, layout.overflow_G[g], layout.overflow_start_G[g], full_chunk, rest_chunk, y_RN
            )

        return lax.fori_loop(0, G, group_body, y_RN)

    # Balanced routing usually has some overflow, but skipping the loop when there is none is free.
    return lax.cond(jnp.any(layout.overflow_G > 0), overflow, lambda y: y, y_RN)


def _tmm(x_RK, dy_RN, layout):
    G = layout.group_sizes_G.shape[0]
    R, K = x_RK.shape
    C = R // G
    # Holes hold other experts' overflow rows (or nothing): zero them in one operand.
    real_GC = jnp.arange(C, dtype=jnp.int32)[None, :] < layout.group_sizes_G[:, None]
    x_GCK = jnp.where(real_GC[..., None], x_RK.reshape(G, C, K), 0)
    dw_GKN = lax.dot_general(
        x_GCK, dy_RN.reshape(G, C, -1), (((1,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32
    )
    contract_rows = (((0,), (0,)), ((), ()))

    def overflow(dw_GKN):
        def group_body(g, dw_GKN):
            def product(rows_B, keep_B1=None):
                x = jnp.take(x_RK, rows_B, axis=0)
                if keep_B1 is not None:
                    x = jnp.where(keep_B1, x, 0)
                dy = jnp.take(dy_RN, rows_B, axis=0)
                return lax.dot_general(x, dy, contract_rows, preferred_element_type=jnp.float32)

            def full_chunk(acc, start, size):
                return acc + product(lax.dynamic_slice_in_dim(layout.hole_rows_R, start, size))

            def rest_chunk(acc, start, keep_B1):
                rows_B = lax.dynamic_slice_in_dim(layout.hole_rows_R, start, keep_B1.shape[0])
                return acc + product(rows_B, keep_B1)

            acc_KN = grouped_matmul.over_chunks(
                R, layout.overflow_G[g], layout.overflow_start_G[g], full_chunk, rest_chunk, dw_GKN[g]
            )
            return lax.dynamic_update_index_in_dim(dw_GKN, acc_KN, g, 0)

        return lax.fori_loop(0, G, group_body, dw_GKN)

    return lax.cond(jnp.any(layout.overflow_G > 0), overflow, lambda dw: dw, dw_GKN)
