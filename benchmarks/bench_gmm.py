"""Grouped matmul fwd+bwd time per backend ÷ a dense matmul of equal FLOPs, measured in one process.

    python benchmarks/bench_gmm.py                 # default shapes, backends runnable on this platform
    python benchmarks/bench_gmm.py --dtype bfloat16 --backends ladder,xla --repeats 9

For each shape (M rows, K, N, G groups) it times jit(value_and_grad) of ``sum(gmm(x, w, sizes) * dy)``
w.r.t. ``x`` and ``w`` (so: forward, input gradient, weight gradient) against the same for a dense
``x[M, K] @ w[K, N]``.
Group sizes are a random imbalanced split of M (Dirichlet α=4) with a fixed seed. Imports only jax/numpy
(and the package's grouped_matmul module), so it runs on the GPU machine too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_jax.moe import core_layout, grouped_matmul  # noqa: E402

# (name, M, K, N, G): rows = tokens × top-k.
SHAPES = {
    "cpu": [
        ("8e_top2_fused_gate_up", 4096, 256, 1024, 8),
        ("8e_top2_down", 4096, 512, 256, 8),
        ("64e_fine_grained", 4096, 512, 256, 64),
    ],
    "gpu": [
        ("mixtral_like_gate_up", 16384, 4096, 28672, 8),
        ("mixtral_like_down", 16384, 14336, 4096, 8),
        ("fine_grained_gate_up", 131072, 2048, 2048, 64),
        ("fine_grained_down", 131072, 1024, 2048, 64),
        ("switch_like_gate_up", 16384, 1024, 8192, 32),
        ("switch_like_down", 16384, 4096, 1024, 32),
    ],
}


def runnable_backends(platform: str) -> list[str]:
    """Backends worth timing here (megablox off TPU is Pallas interpret mode: correct, far too slow)."""
    names = ["core", "ladder", "xla"]
    if platform == "tpu":
        names.append("megablox")
    if platform == "gpu":
        names.append("mosaic_gpu")
    return names


def median_ms(fns: dict, args: dict, repeats: int) -> dict:
    """Median wall time per function; runs are interleaved so load from other processes hits all alike."""
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))  # compile
        jax.block_until_ready(fn(*args[name]))  # warm up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def group_sizes_for(M: int, G: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.bincount(rng.choice(G, M, p=rng.dirichlet(np.full(G, 4.0))), minlength=G).astype(np.int32)


def bench_shape(M, K, N, G, backends, dtype, repeats, seed=0):
    """{name: ms} for 'dense' and each backend."""
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (M, K), dtype)
    # Scale in float32, then cast: a NumPy float64 scalar would silently promote bf16 weights to float32.
    w = (jax.random.normal(keys[1], (G, K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
    dy = jax.random.normal(keys[2], (M, N), dtype)
    sizes = jnp.asarray(group_sizes_for(M, G, seed))

    def grad_fn(matmul):
        # The loss value is returned too, so XLA cannot drop the forward matmul: as in training, where the
        # output feeds the next layer.
        # dy is an argument, not a closure: jit would embed a closed-over array as a constant (a 512 MiB
        # literal at the fine-grained shapes, whose compile never finished).
        loss = lambda x, w, dy: jnp.vdot(matmul(x, w).astype(jnp.float32), dy.astype(jnp.float32))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    fns = {"dense": grad_fn(lambda x, w: x @ w)}
    args = {"dense": (x, w[0], dy)}
    for name in backends:
        if name == "core":
            # The core + overflow layout (what the layer's dispatcher uses on CPU): the same rows laid out
            # by plan(); R = G * ceil(M / G) rows, rows no assignment uses get zero cotangent.
            plan, rows_M, _ = core_layout.plan(jnp.repeat(jnp.arange(G), sizes, total_repeat_length=M), G)
            R = plan.hole_rows_R.shape[0]
            x_R = jnp.zeros((R, K), dtype).at[rows_M].set(x)
            dy_R = jnp.zeros((R, N), dtype).at[rows_M].set(dy)
            fns[name] = grad_fn(lambda x, w, plan=plan: core_layout.gmm(x, w, plan))
            args[name] = (x_R, w, dy_R)
            continue
        fn = grad_fn(lambda x, w, name=name: grouped_matmul.gmm(x, w, sizes, backend=name))
        try:
            jax.block_until_ready(fn(x, w, dy))
        except Exception as e:  # report and go on: one backend failing must not hide the others
            print(f"    {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        fns[name], args[name] = fn, (x, w, dy)
    results = median_ms(fns, args, repeats)
    return results


def check_backends(backends, dtype) -> bool:
    """Values and gradients of each backend vs a float64 NumPy loop, on a shape no tile divides.

    Run before timing so a fast wrong kernel (e.g. an untested one on new hardware) cannot go unnoticed.
    """
    M, K, N, sizes = 700, 200, 328, np.array([150, 0, 301, 7, 200], np.int32)  # 42 rows past the groups
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, K)) / np.sqrt(K)
    w = rng.standard_normal((len(sizes), K, N))
    dy = rng.standard_normal((M, N))
    x, w, dy = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64) for a in (x, w, dy))
    want = [np.zeros((M, N)), np.zeros_like(x), np.zeros_like(w)]
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        want[0][rows], want[1][rows], want[2][g] = x[rows] @ w[g], dy[rows] @ w[g].T, x[rows].T @ dy[rows]
        start += size
    tolerance = 1e-4 if dtype == jnp.float32 else 2e-2
    ok = True
    for name in backends:

        def loss(x, w, name=name):
            y = grouped_matmul.gmm(x, w, jnp.asarray(sizes), backend=name)
            return jnp.vdot(y.astype(jnp.float32), jnp.asarray(dy, jnp.float32)), y

        try:
            args = (jnp.asarray(x, dtype), jnp.asarray(w, dtype))
            (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(*args)
        except Exception as e:
            print(f"check {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            ok = False
            continue
        errors = [
            float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))
            for got, ref in zip((y, dx, dw), want)
        ]
        verdict = "ok" if max(errors) <= tolerance else "MISMATCH"
        ok &= verdict == "ok"
        print(
            f"check {name}: max error / max |ref|: out {errors[0]:.1e} dlhs {errors[1]:.1e} "
            f"drhs {errors[2]:.1e}  {verdict}"
        )
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU/TPU default)")
    parser.add_argument("--backends", default=None, help="comma-separated; default: runnable here")
    parser.add_argument("--shapes", default=None, help="'cpu' or 'gpu' preset; default by platform")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check before timing")
    args = parser.parse_args()

    platform = jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("float32" if platform == "cpu" else "bfloat16"))
    backends = args.backends.split(",") if args.backends else runnable_backends(platform)
    preset = args.shapes or ("cpu" if platform == "cpu" else "gpu")
    print(
        f"jax {jax.__version__} · {platform} · {jax.devices()[0].device_kind} · {dtype.name} · "
        f"auto={grouped_matmul.resolve_backend('auto', dtype)} · median of {args.repeats}"
    )
    # "core" is not a gmm() backend (its own layout); tests/test_core_layout.py checks it against float64.
    if not args.no_check and not check_backends([b for b in backends if b != "core"], dtype):
        print("correctness check failed; timings below are of wrong results")
    print(f"{'shape':26} {'M':>6} {'K':>6} {'N':>6} {'G':>3}  {'backend':>10} {'ms':>9} {'÷dense':>7}")
    for name, M, K, N, G in SHAPES[preset]:
        results = bench_shape(M, K, N, G, backends, dtype, args.repeats)
        dense = results["dense"]
        for backend, ms in results.items():
            print(
                f"{name:26} {M:6d} {K:6d} {N:6d} {G:3d}  {backend:>10} {ms:9.2f} {ms / dense:7.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
