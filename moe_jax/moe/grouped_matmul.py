"""Grouped matrix multiplication: rows of ``lhs`` sorted by group, each group times its own matrix.

``gmm(lhs[M, K], rhs[G, K, N], group_sizes[G]) -> out[M, N]``: rows ``[start_g, start_g + size_g)`` of
``lhs`` (groups are contiguous and in order) are multiplied by ``rhs[g]``; rows past ``sum(group_sizes)``
come out zero and get zero gradient. Output dtype is ``lhs.dtype``; products accumulate in float32.

One ``jax.custom_vjp`` serves every backend. Each backend supplies two grouped kernels:
    ``mm(lhs[M, K], rhs, group_sizes, transpose_rhs) -> [M, N]`` (forward; with ``transpose_rhs`` the
        input gradient ``dout[M, N] @ rhs[g]^T``), and
    ``tmm(lhs[M, K], dout[M, N], group_sizes) -> [G, K, N]`` (weight gradient, ragged over the contracted
        row dim: ``drhs[g] = lhs_g^T @ dout_g``).
The backward never rewrites the weight gradient as a dense dot (that is what makes stock ``ragged_dot``
autodiff 6-64x slower than dense on GPU).

Backends (``BACKENDS``):
    ``ladder``: the CPU-fast path. A loop over groups; each group's rows are cut into power-of-two chunks
        (the binary digits of its size, down to ``_LADDER_MIN_ROWS``, plus one masked chunk for the rest), so
        every chunk is one ordinary static-shape dot and no FLOPs are spent on padding rows. Runs anywhere.
        fwd+bwd on a 2-core CPU: 1.0-1.5x a dense matmul of equal FLOPs at 8 groups of ~500 rows, 2.3-3.8x
        at 64 groups of ~64 rows (where even a perfectly balanced batched einsum is ~2x dense);
        ``benchmarks/bench_gmm.py`` measures it.
    ``xla``: ``lax.ragged_dot`` / ``lax.ragged_dot_general`` (ragged contracting dim for the weight
        gradient). Portable reference; 9-100x a dense matmul on CPU, and on GPU XLA's ragged dot is
        no faster (measured on an H200 with jax 0.11.2: 6.5x dense with a custom VJP, and a 97 GiB
        temporary at 64 experts).
    ``megablox``: TPU Pallas ``gmm`` / ``tgmm`` kernels. Off TPU they run in Pallas interpret mode
        (correct but slow; used by the tests on CPU).
    ``mosaic_gpu``: the Hopper (sm_90) Pallas Mosaic GPU kernels ``ragged_dot_mgpu.ragged_dot`` and
        ``transposed_ragged_dot_mgpu.transposed_ragged_dot``; 16-bit dtypes only. Imported on first use.
    ``auto``: ``megablox`` on TPU, ``mosaic_gpu`` on a Hopper GPU with bf16/f16 inputs, else ``ladder``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ("auto", "ladder", "xla", "megablox", "mosaic_gpu")
# Backends that are Pallas kernels: their output shapes carry no manual-axis type (see expert_parallel.py).
PALLAS_BACKENDS = ("megablox", "mosaic_gpu")

# Platforms each backend is meant to run on (benchmarks skip the rest). megablox also runs off TPU in Pallas
# interpret mode, which is for tests only.
PLATFORMS = {
    "auto": ("cpu", "gpu", "tpu"),
    "ladder": ("cpu", "gpu", "tpu"),
    "xla": ("cpu", "gpu", "tpu"),
    "megablox": ("tpu",),
    "mosaic_gpu": ("gpu",),
}

# Smallest ladder chunk. Smaller chunks cost more loop steps than their FLOPs are worth on CPU; the remainder
# of a group below this size is done as one chunk of this size with the foreign rows masked out.
_LADDER_MIN_ROWS = 16

# Mosaic GPU tiles (measured on an H200 in bf16, ~620 TFLOP/s forward): forward/input grad bm=128 bn=128
# bk=64 with 5 pipeline steps; weight grad the same tiles with 4 steps (5 exceeds shared memory there).
_MGPU_FWD = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=5)
_MGPU_WGRAD = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4)
_MGPU_GRID_BLOCK_N = 4

_MEGABLOX_TILE = 128


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, backend: str = "auto") -> jax.Array:
    """Grouped matmul: rows of group ``g`` of ``lhs`` times ``rhs[g]``; see the module docstring.

    Args:
        lhs: ``[M, K]`` rows sorted by group.
        rhs: ``[G, K, N]`` one matrix per group.
        group_sizes: ``[G]`` integer row counts, ``sum(group_sizes) <= M``.
        backend: one of ``BACKENDS``.

    Returns:
        ``[M, N]`` in ``lhs.dtype``; rows past ``sum(group_sizes)`` are zero.

    Raises:
        ValueError: unknown ``backend``, mismatched shapes, or a backend that cannot take these inputs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"grouped matmul backend={backend!r} is unknown; choose one of {BACKENDS}")
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"gmm expects lhs[M, K] and rhs[G, K, N]; got {lhs.shape} and {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes must have shape ({rhs.shape[0]},); got {group_sizes.shape}")
    resolved = resolve_backend(backend, jnp.result_type(lhs.dtype, rhs.dtype))
    if resolved == "mosaic_gpu" and jnp.result_type(lhs.dtype, rhs.dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"backend='mosaic_gpu' needs bfloat16 or float16 inputs; got {lhs.dtype}, {rhs.dtype}"
        )
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), resolved)


def resolve_backend(backend: str, dtype=jnp.float32) -> str:
    """The concrete backend ``auto`` stands for on the default platform (others are returned unchanged)."""
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "tpu":
        return "megablox"
    if platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16) and _is_hopper():
        return "mosaic_gpu"
    return "ladder"


def _is_hopper() -> bool:
    # The Mosaic GPU kernels use wgmma/TMA, i.e. sm_90 only; other GPUs take the ladder.
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


# --------------------------------------------------------------------------------------------------------
# The custom VJP shared by all backends.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, backend):
    return _gmm_fwd(lhs, rhs, group_sizes, backend)[0]


def _gmm_fwd(lhs, rhs, group_sizes, backend):
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    out = _KERNELS[backend].mm(lhs.astype(dtype), rhs.astype(dtype), group_sizes, False)
    return out.astype(lhs.dtype), (lhs, rhs, group_sizes)


def _gmm_bwd(backend, residuals, dout):
    lhs, rhs, group_sizes = residuals
    kernels = _KERNELS[backend]
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    lhs, rhs, dout = lhs.astype(dtype), rhs.astype(dtype), dout.astype(dtype)
    dlhs = kernels.mm(dout, rhs, group_sizes, True)
    drhs = kernels.tmm(lhs, dout, group_sizes, rhs.shape[0])
    # group_sizes is integer: no cotangent.
    return dlhs.astype(residuals[0].dtype), drhs.astype(residuals[1].dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


class _Kernels(NamedTuple):
    mm: object  # (lhs[M, K], rhs, group_sizes, transpose_rhs) -> [M, N or K] in lhs.dtype
    tmm: object  # (lhs[M, K], dout[M, N], group_sizes, num_groups) -> [G, K, N]


def _row_mask(num_rows: int, group_sizes: jax.Array) -> jax.Array:
    """[M] True for rows inside some group (kernels that leave the tail unwritten need this)."""
    return jnp.arange(num_rows, dtype=jnp.int32) < jnp.sum(group_sizes)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pads ``axis`` up to a multiple of ``multiple`` (no copy when it already is one)."""
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


# --------------------------------------------------------------------------------------------------------
# ladder: loop over groups, power-of-two row chunks.


def _ladder_sizes(num_rows: int) -> tuple[int, tuple[int, ...]]:
    """(masked remainder chunk size, full chunk sizes from largest to smallest)."""
    min_rows = min(_LADDER_MIN_ROWS, 1 << (num_rows.bit_length() - 1))
    sizes = [min_rows]
    while sizes[-1] * 2 <= num_rows:
        sizes.append(sizes[-1] * 2)
    return min_rows, tuple(reversed(sizes))


def zeros_varying_like(shape, dtype, *inputs) -> jax.Array:
    """Zeros typed to vary over the manual mesh axes any of ``inputs`` varies over.

    Inside ``shard_map`` a loop carry or ``cond`` branch that starts from plain zeros is typed as equal on
    every device and would clash with the per-device products written into it; outside, a no-op.
    """
    axes = set()
    for x in inputs:
        axes |= set(jax.typeof(x).manual_axis_type.varying)
    zeros = jnp.zeros(shape, dtype)
    return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def over_chunks(num_rows, size_g, offset, full_chunk, rest_chunk, carry):
    """Covers rows ``[offset, offset + size_g)`` with static-shape chunks, largest first.

    ``full_chunk(carry, start, size)`` handles ``size`` rows from ``start``;
    ``rest_chunk(carry, start, keep)`` the last ``< min_rows`` rows as one ``min_rows`` window whose rows
    outside the group have ``keep`` False
    (the window moves back when it would run past ``num_rows``, where ``dynamic_slice`` would clamp it).
    """
    min_rows, sizes = _ladder_sizes(num_rows)
    remaining = size_g
    for size in sizes:
        # The binary digits of size_g, largest first: one cond per chunk size. (A while loop with a dynamic
        # trip count here made XLA:CPU copy the [M, N] output every step: 8x slower.)
        take = remaining >= size
        carry = lax.cond(
            take, lambda c, offset=offset, size=size: full_chunk(c, offset, size), lambda c: c, carry
        )
        offset = offset + jnp.where(take, size, 0)
        remaining = remaining - jnp.where(take, size, 0)

    def rest(c):
        start = jnp.minimum(offset, num_rows - min_rows)
        row = start + jnp.arange(min_rows, dtype=jnp.int32)
        return rest_chunk(c, start, ((row >= offset) & (row < offset + remaining))[:, None])

    return lax.cond(remaining > 0, rest, lambda c: c, carry)


def _ladder_mm(lhs_MK, rhs, group_sizes_G, transpose_rhs):
    M = lhs_MK.shape[0]
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if M == 0:
        return jnp.zeros((0, N), lhs_MK.dtype)
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    starts_G = jnp.cumsum(group_sizes_G) - group_sizes_G
    min_rows = _ladder_sizes(M)[0]

    def group_body(g, out_MN):
        w = rhs[g]  # one [K, N] slice per group, shared by its chunks

        def matmul(start, size):
            rows = lax.dynamic_slice_in_dim(lhs_MK, start, size)
            return lax.dot_general(rows, w, contract, preferred_element_type=jnp.float32).astype(out_MN.dtype)

        def full_chunk(out, start, size):
            return lax.dynamic_update_slice_in_dim(out, matmul(start, size), start, 0)

        def rest_chunk(out, start, keep):
            # Keep the neighbours' rows (and the zero tail) as they are.
            old = lax.dynamic_slice_in_dim(out, start, min_rows)
            return lax.dynamic_update_slice_in_dim(
                out, jnp.where(keep, matmul(start, min_rows), old), start, 0
            )

        return over_chunks(M, group_sizes_G[g], starts_G[g], full_chunk, rest_chunk, out_MN)

    return lax.fori_loop(0, rhs.shape[0], group_body, zeros_varying_like((M, N), lhs_MK.dtype, lhs_MK, rhs))


def _ladder_tmm(lhs_MK, dout_MN, group_sizes_G, num_groups):
    M, K = lhs_MK.shape
    N = dout_MN.shape[1]
    if M == 0:
        return jnp.zeros((num_groups, K, N), jnp.float32)
    contract_rows = (((0,), (0,)), ((), ()))
    starts_G = jnp.cumsum(group_sizes_G) - group_sizes_G
    min_rows = _ladder_sizes(M)[0]

    def product(start, size, keep=None):
        x = lax.dynamic_slice_in_dim(lhs_MK, start, size)
        if keep is not None:
            x = jnp.where(keep, x, 0)
        dy = lax.dynamic_slice_in_dim(dout_MN, start, size)
        return lax.dot_general(x, dy, contract_rows, preferred_element_type=jnp.float32)

    def group_body(g, drhs_GKN):
        acc_KN = over_chunks(
            M,
            group_sizes_G[g],
            starts_G[g],
            lambda acc, start, size: acc + product(start, size),
            lambda acc, start, keep: acc + product(start, min_rows, keep),
            zeros_varying_like((K, N), jnp.float32, lhs_MK, dout_MN),
        )
        return lax.dynamic_update_index_in_dim(drhs_GKN, acc_KN, g, 0)

    return lax.fori_loop(
        0, num_groups, group_body, zeros_varying_like((num_groups, K, N), jnp.float32, lhs_MK, dout_MN)
    )


# --------------------------------------------------------------------------------------------------------
# xla: lax.ragged_dot_general.


def _xla_mm(lhs_MK, rhs, group_sizes_G, transpose_rhs):
    # rhs[G, K, N] contracts its dim 1; the input gradient contracts dim 2 of the same array (no transpose).
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2 if transpose_rhs else 1,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )
    out = lax.ragged_dot_general(lhs_MK, rhs, group_sizes_G, dims, preferred_element_type=jnp.float32)
    return out.astype(lhs_MK.dtype)


def _xla_tmm(lhs_MK, dout_MN, group_sizes_G, num_groups):
    # Ragged contracting dim: no group dim on either operand, the output gains one.
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    return lax.ragged_dot_general(lhs_MK, dout_MN, group_sizes_G, dims, preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------------------
# megablox: TPU Pallas gmm / tgmm.


def _megablox():
    # The package's __init__ rebinds ``megablox.gmm`` to the function, hiding the module of the same name.
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _megablox_tiling(M: int, K: int, N: int) -> tuple[int, int, int]:
    # Dims under one tile use the whole dim (allowed by the TPU block rules); the kernels mask ragged k/n.
    tm = min(_MEGABLOX_TILE, -(-M // 8) * 8)
    return tm, min(_MEGABLOX_TILE, K), min(_MEGABLOX_TILE, N)


def _on_tpu_or_interpreted(kernel, *args):
    """``kernel(interpret)(*args)``: the compiled Mosaic kernel where the program is lowered for TPU, Pallas
    interpret mode elsewhere.

    The choice is made at lowering time for the platform compiled for, not from the host's default
    backend: a CPU host compiling ahead of time for a TPU topology (``moe_jax/planner.py``) gets the real
    kernel, which ``interpret=jax.default_backend() != "tpu"`` would have replaced by interpreter loops.
    """
    return jax.lax.platform_dependent(*args, tpu=kernel(False), default=kernel(True))


def _megablox_mm(lhs_MK, rhs, group_sizes_G, transpose_rhs):
    M = lhs_MK.shape[0]
    if M == 0:
        return jnp.zeros((0, rhs.shape[1] if transpose_rhs else rhs.shape[2]), lhs_MK.dtype)
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiling = _megablox_tiling(M, lhs_MK.shape[1], N)
    # gmm needs M to be a multiple of the row tile; padding rows fall outside every group.
    kernel = lambda interpret: (
        lambda lhs, rhs, sizes: _megablox().gmm(
            lhs,
            rhs,
            sizes,
            preferred_element_type=lhs_MK.dtype,
            tiling=tiling,
            transpose_rhs=transpose_rhs,
            interpret=interpret,
        )
    )
    out = _on_tpu_or_interpreted(kernel, _pad_to(lhs_MK, 0, tiling[0]), rhs, group_sizes_G)[:M]
    # Rows past sum(group_sizes) are never written by the kernel (uninitialised memory).
    return jnp.where(_row_mask(M, group_sizes_G)[:, None], out, 0)


def _megablox_tmm(lhs_MK, dout_MN, group_sizes_G, num_groups):
    M, K = lhs_MK.shape
    N = dout_MN.shape[1]
    if M == 0:
        return jnp.zeros((num_groups, K, N), jnp.float32)
    tm, tk, tn = _megablox_tiling(M, K, N)
    kernel = lambda interpret: (
        lambda lhs_KM, dout, sizes: _megablox().tgmm(
            lhs_KM,
            dout,
            sizes,
            preferred_element_type=jnp.float32,
            tiling=(tm, tk, tn),
            interpret=interpret,
        )
    )
    return _on_tpu_or_interpreted(kernel, _pad_to(lhs_MK, 0, tm).T, _pad_to(dout_MN, 0, tm), group_sizes_G)


# --------------------------------------------------------------------------------------------------------
# mosaic_gpu: Hopper Pallas kernels (imported on first use: they pull in the Mosaic GPU toolchain).


def _grid_block_n(n: int, block_n: int) -> int:
    grid_n = n // block_n
    return next(b for b in (_MGPU_GRID_BLOCK_N, 2, 1) if grid_n % b == 0)


def _mosaic_gpu_mm(lhs_MK, rhs, group_sizes_G, transpose_rhs):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    M = lhs_MK.shape[0]
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if M == 0:
        return jnp.zeros((0, N), lhs_MK.dtype)
    tiles = _MGPU_FWD
    kwargs = {}
    if transpose_rhs:
        if "transpose_rhs" in inspect.signature(ragged_dot_mgpu.ragged_dot).parameters:
            kwargs["transpose_rhs"] = True  # the kernel reads rhs[g] transposed from shared memory
        else:
            # Older kernels (before transpose_rhs): materialise rhs^T, one weight-sized copy.
            rhs, transpose_rhs = jnp.swapaxes(rhs, 1, 2), False
    # The kernel needs the contracted dim to be a multiple of block_k and stores whole block_n columns;
    # rows are padded to whole block_m tiles. Zero padding changes no product; the padding is sliced off.
    contract_axis, out_axis = (2, 1) if transpose_rhs else (1, 2)
    lhs = _pad_to(_pad_to(lhs_MK, 1, tiles["block_k"]), 0, tiles["block_m"])
    rhs = _pad_to(_pad_to(rhs, contract_axis, tiles["block_k"]), out_axis, tiles["block_n"])
    out = ragged_dot_mgpu.ragged_dot(
        lhs,
        rhs,
        group_sizes=group_sizes_G,
        grid_block_n=_grid_block_n(rhs.shape[out_axis], tiles["block_n"]),
        **tiles,
        **kwargs,
    )[:M, :N]
    # The kernel writes only rows inside groups; the rest of its output is uninitialised.
    return jnp.where(_row_mask(M, group_sizes_G)[:, None], out, 0)


def _mosaic_gpu_tmm(lhs_MK, dout_MN, group_sizes_G, num_groups):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    M, K = lhs_MK.shape
    N = dout_MN.shape[1]
    if M == 0:
        return jnp.zeros((num_groups, K, N), jnp.float32)
    tiles = _MGPU_WGRAD
    # transposed_ragged_dot(lhs[R, m], rhs[R, n]) contracts the ragged row dim R and returns [G, m, n]: our
    # lhs and dout go in as they are. It needs m % block_m == 0 and n % block_n == 0; rows are padded to
    # whole block_k tiles (padding rows are in no group; the kernel masks rows outside the group).
    lhs = _pad_to(_pad_to(lhs_MK, 1, tiles["block_m"]), 0, tiles["block_k"])
    dout = _pad_to(_pad_to(dout_MN, 1, tiles["block_n"]), 0, tiles["block_k"])
    out = transposed_ragged_dot_mgpu.transposed_ragged_dot(
        lhs,
        dout,
        group_sizes=group_sizes_G,
        grid_block_n=_grid_block_n(dout.shape[1], tiles["block_n"]),
        **tiles,
    )
    return out[:, :K, :N]


_KERNELS = {
    "ladder": _Kernels(_ladder_mm, _ladder_tmm),
    "xla": _Kernels(_xla_mm, _xla_tmm),
    "megablox": _Kernels(_megablox_mm, _megablox_tmm),
    "mosaic_gpu": _Kernels(_mosaic_gpu_mm, _mosaic_gpu_tmm),
}
