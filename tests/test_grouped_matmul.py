"""grouped_matmul.gmm against an independent float64 NumPy loop over groups: values and gradients."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import grouped_matmul

# Backends that run on CPU ("auto" is "ladder" here; megablox runs in Pallas interpret mode, slow, so it
# gets one case of its own).
CPU_BACKENDS = ("ladder", "xla")

# (M, K, N, group_sizes): empty groups, one full group, a tail past sum(group_sizes), G=1, sizes that
# exercise several ladder chunks plus a masked remainder at the very end of the rows.
CASES = {
    "mixed": (96, 24, 40, [30, 0, 50, 16]),
    "ladder_chunks": (150, 16, 24, [1, 37, 0, 65, 17, 30]),
    "one_group_full": (37, 8, 12, [0, 37, 0]),
    "g1_tail": (45, 8, 12, [29]),
    "all_empty": (32, 8, 8, [0, 0, 0]),
    "tiny_tail_at_end": (20, 8, 8, [3, 14]),
}


def reference(x_MK, w_GKN, group_sizes, dy_MN):
    """float64 forward and gradients of sum(gmm(x, w) * dy), one group at a time."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x_MK, w_GKN, dy_MN))
    y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        rows = slice(start, start + size)
        y[rows] = x[rows] @ w[g]
        dx[rows] = dy[rows] @ w[g].T
        dw[g] = x[rows].T @ dy[rows]
        start += size
    return y, dx, dw


def make_inputs(M, K, N, group_sizes, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    G = len(group_sizes)
    x = rng.standard_normal((M, K)) / np.sqrt(K)
    w = rng.standard_normal((G, K, N))
    dy = rng.standard_normal((M, N))
    return (
        jnp.asarray(x, dtype),
        jnp.asarray(w, dtype),
        jnp.asarray(group_sizes, jnp.int32),
        jnp.asarray(dy, dtype),
    )


def value_and_grads(x, w, gs, dy, backend, jit=True):
    def loss(x, w):
        y = grouped_matmul.gmm(x, w, gs, backend=backend)
        return jnp.vdot(y.astype(jnp.float32), dy.astype(jnp.float32)), y

    f = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, y), (dx, dw) = (jax.jit(f) if jit else f)(x, w)
    return y, dx, dw


def check_f32(x, w, gs, dy, backend, jit=True):
    y, dx, dw = value_and_grads(x, w, gs, dy, backend, jit)
    ry, rdx, rdw = reference(x, w, gs, dy)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
    np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-4)
    total = int(np.sum(np.asarray(gs)))
    # Rows past sum(group_sizes): exactly zero output and zero gradient.
    assert not np.any(np.asarray(y[total:])) and not np.any(np.asarray(dx[total:]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_f32(backend, case):
    check_f32(*make_inputs(*CASES[case]), backend)


@pytest.mark.parametrize("backend", ("ladder", "xla"))
def test_bf16_close_to_reference(backend):
    x, w, gs, dy = make_inputs(*CASES["mixed"], dtype=jnp.bfloat16)
    y, dx, dw = value_and_grads(x, w, gs, dy, backend)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    # Reference from the same bf16-rounded inputs: the only error left is bf16 output rounding.
    ry, rdx, rdw = reference(x.astype(jnp.float32), w.astype(jnp.float32), gs, dy.astype(jnp.float32))
    for got, want in ((y, ry), (dx, rdx), (dw, rdw)):
        got = np.asarray(got, np.float64)
        assert np.max(np.abs(got - want)) <= 1e-2 * np.max(np.abs(want))


def test_jit_and_eager_agree():
    x, w, gs, dy = make_inputs(*CASES["one_group_full"])
    for a, b in zip(
        value_and_grads(x, w, gs, dy, "ladder", jit=True), value_and_grads(x, w, gs, dy, "ladder", jit=False)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_group_sizes_are_traced_not_static():
    """One compiled function serves every routing outcome (group sizes are data, not shapes)."""
    f = jax.jit(lambda x, w, gs: grouped_matmul.gmm(x, w, gs, backend="ladder"))
    x, w, _, _ = make_inputs(*CASES["ladder_chunks"])
    for sizes in ([150, 0, 0, 0, 0, 0], [25] * 6, [0, 0, 0, 0, 0, 17]):
        gs = jnp.asarray(sizes, jnp.int32)
        np.testing.assert_allclose(
            f(x, w, gs), reference(x, w, gs, jnp.zeros((150, 24)))[0], rtol=1e-5, atol=1e-5
        )
    assert f._cache_size() == 1


def test_megablox_interpret_mode_on_cpu():
    # Pallas interpret mode is slow: one case with empty groups and a tail, M not a multiple of 8.
    check_f32(*make_inputs(45, 24, 40, [20, 0, 17]), "megablox")


def test_bad_backend_names_the_choices():
    x, w, gs, _ = make_inputs(*CASES["mixed"])
    with pytest.raises(ValueError, match=r"backend='nope'.*ladder"):
        grouped_matmul.gmm(x, w, gs, backend="nope")


def test_shape_errors():
    x, w, gs, _ = make_inputs(*CASES["mixed"])
    with pytest.raises(ValueError, match="rhs"):
        grouped_matmul.gmm(x, w[:, :5], gs)
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul.gmm(x, w, gs[:2])


def test_auto_on_cpu_is_ladder():
    assert grouped_matmul.resolve_backend("auto") == "ladder"
    assert grouped_matmul.resolve_backend("xla") == "xla"
    x, w, gs, _ = make_inputs(*CASES["one_group_full"])
    np.testing.assert_array_equal(
        grouped_matmul.gmm(x, w, gs, backend="auto"), grouped_matmul.gmm(x, w, gs, backend="ladder")
    )


def test_mosaic_gpu_rejects_float32():
    x, w, gs, _ = make_inputs(*CASES["mixed"])
    with pytest.raises(ValueError, match="mosaic_gpu"):
        grouped_matmul.gmm(x, w, gs, backend="mosaic_gpu")


# ---- mosaic_gpu wrapper logic (padding, slicing, masking), with stand-ins for the Hopper kernels ----------


def _fake_ragged_dot(
    lhs,
    rhs,
    *,
    group_sizes,
    block_m,
    block_n,
    block_k,
    max_concurrent_steps,
    grid_block_n,
    transpose_rhs=False,
):
    """Checks the real kernel's input rules and leaves rows outside groups as garbage, as the kernel does."""
    assert lhs.dtype == rhs.dtype
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    assert k % block_k == 0 and n % block_n == 0 and m % block_m == 0
    assert (n // block_n) % grid_block_n == 0
    w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    out = jax.lax.ragged_dot(lhs, w, group_sizes, preferred_element_type=jnp.float32).astype(lhs.dtype)
    return jnp.where((jnp.arange(m) < jnp.sum(group_sizes))[:, None], out, jnp.nan)


def _fake_transposed_ragged_dot(
    lhs, rhs, *, group_sizes, block_m, block_n, block_k, max_concurrent_steps, grid_block_n
):
    assert lhs.dtype == rhs.dtype
    (r, m), (r2, n) = lhs.shape, rhs.shape
    assert r == r2 and m % block_m == 0 and n % block_n == 0
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
    )
    out = jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def _fake_ragged_dot_without_transpose(
    lhs, rhs, *, group_sizes, block_m, block_n, block_k, max_concurrent_steps, grid_block_n
):
    """The kernel's signature before it grew ``transpose_rhs``."""
    return _fake_ragged_dot(
        lhs,
        rhs,
        group_sizes=group_sizes,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        max_concurrent_steps=max_concurrent_steps,
        grid_block_n=grid_block_n,
    )


@pytest.fixture(params=["with_transpose_rhs", "older_signature"])
def fake_mosaic_kernels(monkeypatch, request):
    import jax.experimental.pallas.ops.gpu as gpu_ops

    forward = (
        _fake_ragged_dot if request.param == "with_transpose_rhs" else _fake_ragged_dot_without_transpose
    )
    fakes = {
        "ragged_dot_mgpu": types.SimpleNamespace(ragged_dot=forward),
        "transposed_ragged_dot_mgpu": types.SimpleNamespace(
            transposed_ragged_dot=_fake_transposed_ragged_dot
        ),
    }
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, f"{gpu_ops.__name__}.{name}", module)
        monkeypatch.setattr(gpu_ops, name, module, raising=False)


def test_mosaic_gpu_wrapper_pads_and_masks(fake_mosaic_kernels):
    # Dims that are multiples of no tile: every padding path is taken.
    x, w, gs, dy = make_inputs(200, 40, 72, [70, 0, 90], dtype=jnp.bfloat16)
    y, dx, dw = value_and_grads(x, w, gs, dy, "mosaic_gpu")
    ry, rdx, rdw = reference(x.astype(jnp.float32), w.astype(jnp.float32), gs, dy.astype(jnp.float32))
    for got, want in ((y, ry), (dx, rdx), (dw, rdw)):
        got = np.asarray(got, np.float64)
        assert np.all(np.isfinite(got))
        assert np.max(np.abs(got - want)) <= 1e-2 * np.max(np.abs(want))
    assert not np.any(np.asarray(y[160:], np.float32))


def test_megablox_interpret_mode_over_several_tiles_with_ragged_k_and_n():
    """M spans three 128-row tiles with groups crossing tile edges, K = 200 and N = 260 are not multiples
    of the 128 tile (the kernels mask the ragged last tile), an empty group and a tail past the groups."""
    check_f32(*make_inputs(300, 200, 260, [100, 0, 130, 55]), "megablox")
