"""permute: expert sort, inverse permutation, row gathers and their custom VJPs, against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import grouped_matmul, permute


def test_sort_by_expert_is_stable_and_counts_groups():
    expert_M = np.array([2, 0, 4, 2, 1, 0, 4, 2, 3, 0], np.int32)  # 4 = sentinel for "dropped" (E = 4)
    order_M, sizes_E = permute.sort_by_expert(jnp.asarray(expert_M), num_experts=4)
    np.testing.assert_array_equal(order_M, np.argsort(expert_M, kind="stable"))
    np.testing.assert_array_equal(sizes_E, [3, 1, 3, 1])  # the two sentinel rows are in no group
    assert order_M.dtype == sizes_E.dtype == jnp.int32


def test_inverse_permutation():
    perm = np.random.default_rng(0).permutation(37).astype(np.int32)
    inv = permute.inverse_permutation(jnp.asarray(perm))
    np.testing.assert_array_equal(inv, np.argsort(perm))
    np.testing.assert_array_equal(np.asarray(inv)[perm], np.arange(37))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gather_rows_value_and_scatter_add_gradient(dtype):
    rng = np.random.default_rng(1)
    x_TD = rng.standard_normal((6, 5))
    rows_M = np.array([3, 0, 3, 5, 3, 1, 0], np.int32)  # repeats: their gradients must add up
    dy_MD = rng.standard_normal((7, 5))
    x, dy = jnp.asarray(x_TD, dtype), jnp.asarray(dy_MD, dtype)

    y, vjp = jax.vjp(lambda x: permute.gather_rows(x, jnp.asarray(rows_M)), x)
    (dx,) = vjp(dy)
    want_dx = np.zeros_like(x_TD)
    np.add.at(want_dx, rows_M, np.asarray(dy, np.float64))
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(y, np.asarray(x)[rows_M])
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=tol, atol=tol)


def test_permute_rows_gradient_is_the_inverse_gather():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((9, 4)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((9, 4)), jnp.float32)
    perm = jnp.asarray(rng.permutation(9), jnp.int32)
    inv = permute.inverse_permutation(perm)
    y, vjp = jax.vjp(lambda x: permute.permute_rows(x, perm, inv), x)
    np.testing.assert_array_equal(y, np.asarray(x)[np.asarray(perm)])
    # Same as autodiff of a plain gather (a scatter-add), which it replaces.
    np.testing.assert_array_equal(vjp(dy)[0], jax.vjp(lambda x: x[perm], x)[1](dy)[0])
    # Round trip with the inverse is the identity.
    np.testing.assert_array_equal(permute.permute_rows(y, inv, perm), x)


def test_sort_gather_gmm_roundtrip_matches_per_assignment_reference():
    """The dispatch recipe: sort by expert, gather token rows, grouped matmul, back to assignment order."""
    T, D, F, E, K = 12, 8, 6, 4, 2
    rng = np.random.default_rng(3)
    x_TD = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    w_EDF = jnp.asarray(rng.standard_normal((E, D, F)), jnp.float32)
    expert_M = rng.integers(0, E, T * K).astype(np.int32)
    expert_M[[1, 6]] = E  # two dropped assignments (sentinel expert)
    token_M = np.repeat(np.arange(T), K).astype(np.int32)  # token-major assignments
    dy_MF = jnp.asarray(rng.standard_normal((T * K, F)), jnp.float32)

    def grouped(x_TD, w_EDF):
        order_M, sizes_E = permute.sort_by_expert(jnp.asarray(expert_M), E)
        x_MD = permute.gather_rows(x_TD, jnp.asarray(token_M)[order_M])
        y_MF = grouped_matmul.gmm(x_MD, w_EDF, sizes_E, backend="xla")  # quick to compile
        return permute.permute_rows(y_MF, permute.inverse_permutation(order_M), order_M)

    def reference(x_TD, w_EDF):  # plain autodiff; dropped assignments give zero
        kept_M = jnp.asarray(expert_M < E)[:, None]
        w_MDF = w_EDF[jnp.minimum(jnp.asarray(expert_M), E - 1)]
        return jnp.where(kept_M, jnp.einsum("md,mdf->mf", x_TD[jnp.asarray(token_M)], w_MDF), 0)

    for fn in (grouped, jax.jit(grouped)):
        y, vjp = jax.vjp(fn, x_TD, w_EDF)
        want_y, want_vjp = jax.vjp(reference, x_TD, w_EDF)
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
        for got, want in zip(vjp(dy_MF), want_vjp(dy_MF)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
