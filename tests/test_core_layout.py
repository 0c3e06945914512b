"""The core + overflow layout and its grouped matmul vs a float64 per-assignment reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import core_layout

# (M assignments, K, N, G, expert ids): balanced, overflow into several holes, everything in one expert,
# dropped assignments (sentinel id G), M not divisible by G, G = 1, experts with no rows.
CASES = {
    "balanced": (64, 8, 12, 4, np.repeat(np.arange(4), 16)),
    "overflow": (60, 8, 12, 4, np.array([0] * 31 + [1] * 3 + [2] * 20 + [3] * 6)),
    "one_expert_takes_all": (48, 8, 12, 4, np.full(48, 2)),
    "dropped_sentinel": (40, 8, 12, 4, np.array([0, 4, 1, 1, 4] * 8)),
    "ragged_m": (37, 8, 12, 4, np.array([3] * 20 + [0] * 10 + [1] * 7)),
    "single_expert_g1": (19, 8, 12, 1, np.zeros(19, int)),
    "empty_experts": (50, 8, 12, 6, np.array([5] * 30 + [1] * 20)),
}


def _inputs(M, K, N, G, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((M, K)),
        rng.standard_normal((G, K, N)) / np.sqrt(K),
        rng.standard_normal((M, N)),
    )


def _through_layout(x_MK, w_GKN, dy_MN, expert_M, G):
    """Loss, y and grads computed by scattering assignments into the layout and gathering back."""
    layout, row_M, valid_M = core_layout.plan(jnp.asarray(expert_M, jnp.int32), G)
    R = G * core_layout.core_capacity(len(expert_M), G)

    def loss(x_MK, w_GKN):
        # Unused layout rows get zeros; invalid assignments are written nowhere (index R is dropped).
        x_RK = (
            jnp.zeros((R, x_MK.shape[1]), x_MK.dtype).at[jnp.where(valid_M, row_M, R)].set(x_MK, mode="drop")
        )
        y_MN = jnp.where(valid_M[:, None], core_layout.gmm(x_RK, w_GKN, layout)[row_M], 0)
        return jnp.vdot(y_MN, dy_MN), y_MN

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        jnp.asarray(x_MK, jnp.float32), jnp.asarray(w_GKN, jnp.float32)
    )
    return y, dx, dw


def _reference(x_MK, w_GKN, dy_MN, expert_M, G):
    y, dx, dw = np.zeros_like(dy_MN), np.zeros_like(x_MK), np.zeros_like(w_GKN)
    for m, e in enumerate(expert_M):
        if 0 <= e < G:
            y[m] = x_MK[m] @ w_GKN[e]
            dx[m] = dy_MN[m] @ w_GKN[e].T
            dw[e] += np.outer(x_MK[m], dy_MN[m])
    return y, dx, dw


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(case):
    M, K, N, G, expert_M = CASES[case]
    x, w, dy = _inputs(M, K, N, G)
    got = _through_layout(x, w, dy, expert_M, G)
    want = _reference(x, w, dy, expert_M, G)
    for g, r, tol in zip(got, want, (1e-5, 1e-4, 1e-4)):
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_rows_are_distinct_and_cores_first(case):
    M, _, _, G, expert_M = CASES[case]
    C = core_layout.core_capacity(M, G)
    layout, row_M, valid_M = core_layout.plan(jnp.asarray(expert_M, jnp.int32), G)
    rows = np.asarray(row_M)[np.asarray(valid_M)]
    assert len(set(rows.tolist())) == len(rows), "two assignments share a layout row"
    assert np.all(rows < G * C)
    sizes = np.bincount(expert_M[expert_M < G], minlength=G)
    np.testing.assert_array_equal(layout.group_sizes_G, sizes)
    np.testing.assert_array_equal(layout.overflow_G, np.maximum(sizes - C, 0))
    # Each expert's first C assignments (in order) sit in its own core, in order.
    for g in range(G):
        mine = np.flatnonzero(expert_M == g)[:C]
        np.testing.assert_array_equal(np.asarray(row_M)[mine], g * C + np.arange(len(mine)))
    np.testing.assert_array_equal(np.asarray(valid_M), (expert_M >= 0) & (expert_M < G))


def test_bfloat16_close_to_reference():
    M, K, N, _, expert_M = CASES["overflow"]
    x, w, dy = _inputs(M, K, N, 4)
    x16, w16 = (jnp.asarray(a, jnp.bfloat16) for a in (x, w))
    layout, row_M, valid_M = core_layout.plan(jnp.asarray(expert_M, jnp.int32), 4)
    R = 4 * core_layout.core_capacity(M, 4)
    x_RK = jnp.zeros((R, K), jnp.bfloat16).at[row_M].set(x16)
    y = core_layout.gmm(x_RK, w16, layout)[row_M]
    assert y.dtype == jnp.bfloat16
    want = _reference(np.asarray(x16, np.float64), np.asarray(w16, np.float64), dy, expert_M, 4)[0]
    assert np.max(np.abs(np.asarray(y, np.float64) - want)) / np.max(np.abs(want)) < 1e-2


def test_shape_error_names_the_shapes():
    layout, _, _ = core_layout.plan(jnp.zeros((8,), jnp.int32), 4)
    with pytest.raises(ValueError, match=r"x\[G\*C, K\]"):
        core_layout.gmm(jnp.zeros((7, 3)), jnp.zeros((4, 3, 5)), layout)
