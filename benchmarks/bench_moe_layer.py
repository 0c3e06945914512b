"""Forward+backward time and temp memory of each MoE dispatch backend vs a dense SwiGLU FFN of equal FLOPs.

Run:
    python benchmarks/bench_moe_layer.py --preset small --json /tmp/small.json

Everything runs in one process on the same random inputs. The baseline is a dense SwiGLU FFN of width K·F
(the same active FLOPs per token as K experts of width F). For each implementation the table shows the
median fwd+bwd wall time, its ratio to the baseline, the compiled program's temp memory (XLA memory
analysis) and its ratio, and the useful TFLOP/s (active FLOPs only: 3 matmuls x 2 FLOPs x 3 for fwd+bwd).

Imports only jax/flax/numpy (and moe_jax.moe), so it runs on a GPU/TPU host with just JAX installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moe_jax.moe import MoeLayer, dispatch, experts, grouped_matmul  # noqa: E402

# name: (batch, length, d_model, d_ff, num_experts, top_k)
PRESETS = {
    "tiny": (2, 128, 64, 128, 4, 2),
    "small": (4, 512, 256, 512, 8, 2),
    "mixtral_like": (4, 2048, 4096, 14336, 8, 2),
    "fine_grained": (8, 2048, 2048, 1024, 64, 8),
    "switch_like": (8, 2048, 1024, 4096, 32, 1),
}
CAPACITY_FACTOR = 1.25


def implementations(platform: str) -> list[tuple[str, dict, bool]]:
    """(row name, MoeLayer kwargs, dropless) for every backend that runs on this platform."""
    rows = [
        (f"einsum cf={CAPACITY_FACTOR}", dict(dispatch="einsum", capacity_factor=CAPACITY_FACTOR), False),
        (f"indices cf={CAPACITY_FACTOR}", dict(dispatch="indices", capacity_factor=CAPACITY_FACTOR), False),
        ("auto dropless", dict(dispatch="auto", capacity_factor=None), True),
    ]
    for backend in dispatch.GROUPED_BACKENDS:
        if backend != "auto" and _backend_runs(backend, platform):
            rows.append(
                (f"grouped[{backend}] dropless", dict(dispatch="grouped", grouped_backend=backend), True)
            )
    return rows


def _backend_runs(backend: str, platform: str) -> bool:
    # "core" is a batched dot plus gathers: runs anywhere.
    return platform in grouped_matmul.PLATFORMS.get(backend, (platform,))


def compile_case(fn, args) -> tuple:
    """(compiled program, its temp bytes), after one warm-up call."""
    compiled = fn.lower(*args).compile()
    analysis = compiled.memory_analysis()
    temp = int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1
    jax.block_until_ready(compiled(*args))
    return compiled, temp


def median_ms(cases: dict, repeats: int) -> dict:
    """Median wall ms per case, rounds interleaved so background load hits every case alike."""
    samples = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (compiled, args) in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def measure(fn, args, repeats: int) -> tuple[float, int]:
    """(median wall ms, temp bytes) of one program on its own."""
    compiled, temp = compile_case(fn, args)
    return median_ms({"one": (compiled, args)}, repeats)["one"], temp


def dense_case(x, D, width, dtype, key):
    k1, k2, k3 = jax.random.split(key, 3)
    scale = lambda n: 1.0 / np.sqrt(n)
    w = (
        (jax.random.normal(k1, (D, width)) * scale(D)).astype(dtype),
        (jax.random.normal(k2, (D, width)) * scale(D)).astype(dtype),
        (jax.random.normal(k3, (width, D)) * scale(width)).astype(dtype),
    )

    def loss(w, x):
        y = experts.dense_ffn(x.reshape(-1, D), *w, "swiglu")
        return jnp.sum(y.astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (w, x)


def moe_case(x, D, F, E, K, dtype, kwargs):
    layer = MoeLayer(D, F, E, K, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0), **kwargs)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def run(preset: str, dtype_name: str | None, repeats: int, only: list[str] | None) -> list[dict]:
    B, L, D, F, E, K = PRESETS[preset]
    platform = jax.default_backend()
    dtype = jnp.dtype(dtype_name or ("float32" if platform == "cpu" else "bfloat16"))
    x = jax.random.normal(jax.random.key(0), (B, L, D)).astype(dtype)
    T = B * L
    useful_flops = 3 * 2 * T * 3 * D * K * F  # fwd+bwd of the K active SwiGLU experts

    dense_name = f"dense swiglu (width K·F={K * F})"
    fn, args = dense_case(x, D, K * F, dtype, jax.random.key(1))
    compiled, temp = compile_case(fn, args)
    cases, temps, flags, errors = {dense_name: (compiled, args)}, {dense_name: temp}, {dense_name: True}, {}
    for name, kwargs, dropless in implementations(platform):
        if only and not any(o in name for o in only):
            continue
        flags[name] = dropless
        try:
            fn, args = moe_case(x, D, F, E, K, dtype, kwargs)
            compiled, temps[name] = compile_case(fn, args)
            cases[name] = (compiled, args)
        except Exception as e:  # one backend failing (e.g. out of memory) must not hide the others
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    times = median_ms(cases, repeats)
    dense_ms, dense_temp = times[dense_name], temps[dense_name]
    rows = []
    for name, dropless in flags.items():
        row = dict(
            impl=name, ms=times.get(name, float("nan")), temp_bytes=temps.get(name, -1), dropless=dropless
        )
        if name in errors:
            row["error"] = errors[name]
        rows.append(row)
    for row in rows:
        row.update(
            preset=preset,
            platform=platform,
            device=jax.devices()[0].device_kind,
            dtype=dtype.name,
            jax=jax.__version__,
            tokens=T,
            d_model=D,
            d_ff=F,
            num_experts=E,
            top_k=K,
            ratio_to_dense=row["ms"] / dense_ms,
            temp_ratio_to_dense=(row["temp_bytes"] / dense_temp) if dense_temp > 0 else float("nan"),
            useful_tflops=useful_flops / (row["ms"] * 1e-3) / 1e12,
        )
    return rows


def print_table(rows: list[dict]) -> None:
    r0 = rows[0]
    print(
        f"\npreset={r0['preset']} tokens={r0['tokens']} d={r0['d_model']} f={r0['d_ff']} "
        f"E={r0['num_experts']} K={r0['top_k']} dtype={r0['dtype']} device={r0['device']} jax={r0['jax']}"
    )
    head = ("impl", "ms", "x dense", "temp MiB", "x dense", "TFLOP/s")
    print(f"| {head[0]:34s} | " + " | ".join(f"{h:>9s}" for h in head[1:]) + " |")
    print(f"|{'-' * 36}|" + "|".join("-" * 11 for _ in head[1:]) + "|")
    for r in rows:
        mib = r["temp_bytes"] / 2**20
        cells = (r["ms"], r["ratio_to_dense"], mib, r["temp_ratio_to_dense"], r["useful_tflops"])
        line = f"| {r['impl']:34s} | " + " | ".join(f"{c:9.3g}" for c in cells) + " |"
        print(line + (f" {r['error']}" if "error" in r else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default: float32 on CPU, bfloat16 on accelerators",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default=None, help="comma-separated substrings of impl names to run")
    parser.add_argument("--json", default=None, help="write the rows as a JSON list here")
    args = parser.parse_args(argv)
    rows = run(args.preset, args.dtype, args.repeats, args.only.split(",") if args.only else None)
    print_table(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
