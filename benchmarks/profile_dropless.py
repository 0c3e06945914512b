"""Where the time of the dropless (grouped) MoE layer goes: routing, permutation, grouped matmuls.

Run:
    python benchmarks/profile_dropless.py --preset fine_grained

Times forward+backward, in one process on the same inputs, of:
    dense      the SwiGLU FFN of equal active FLOPs (the baseline of bench_moe_layer.py);
    layer      the whole dropless MoeLayer (dispatch="grouped", grouped_backend=auto);
    routing    router matmul + softmax/top-K routing + aux statistics only;
    permute    sort, gather of token rows, un-permute and weighted combine, with identity experts;
    kernels    the expert FFN on pre-laid-out rows only (gate, up and down grouped matmuls of the backend
               ``auto`` resolves to: the core + overflow layout on CPU).
Imports only jax/flax/numpy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_moe_layer import PRESETS, dense_case, measure, moe_case  # noqa: E402
from moe_jax.moe import core_layout, dispatch, experts, routing  # noqa: E402
from moe_jax.moe.layer import MoeLayer  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    B, L, D, F, E, K = PRESETS[args.preset]
    platform = jax.default_backend()
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    x = jax.random.normal(jax.random.key(0), (B, L, D)).astype(dtype)

    rows = {}
    fn, fargs = dense_case(x, D, K * F, dtype, jax.random.key(1))
    rows["dense"] = measure(fn, fargs, args.repeats)
    fn, fargs = moe_case(x, D, F, E, K, dtype, dict(dispatch="grouped"))
    rows["layer"] = measure(fn, fargs, args.repeats)

    layer = MoeLayer(D, F, E, K, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    router = layer.router[...]
    w = (layer.w_gate[...], layer.w_up[...], layer.w_down[...])

    def route(router, x_GSD):
        logits = x_GSD.astype(jnp.float32) @ router.astype(jnp.float32)
        return routing.route_token_choice(logits, top_k=K, capacity=None, normalize_gates=True)

    def routing_loss(router, x):
        r = route(router, x)
        return jnp.sum(r.weight_GN) + r.aux["load_balancing_loss"]

    rows["routing"] = measure(jax.jit(jax.grad(routing_loss, argnums=(0, 1))), (router, x), args.repeats)

    fixed = jax.jit(route)(router, x)
    backend = dispatch.resolve_grouped_backend("auto", dtype)
    layout = "core" if backend == "core" else "sorted"

    def permute_loss(x, weight_GN):
        r = fixed.replace(weight_GN=weight_GN)
        y = dispatch.dispatch_grouped(x, r, E, lambda x_MD, grouping: x_MD, layout=layout)
        return jnp.sum(y**2)

    rows["permute"] = measure(
        jax.jit(jax.grad(permute_loss, argnums=(0, 1))), (x, fixed.weight_GN), args.repeats
    )

    expert_M = fixed.expert_GN.reshape(-1)
    x_MD = jnp.repeat(x.reshape(-1, D), K, axis=0)  # T·K rows, as after the gather
    if layout == "core":
        grouping, rows_M, _ = core_layout.plan(expert_M, E)
        x_MD = jnp.zeros((grouping.hole_rows_R.shape[0], D), x.dtype).at[rows_M].set(x_MD)
    else:
        grouping = jnp.bincount(expert_M, length=E).astype(jnp.int32)

    def kernels_loss(w, x_MD):
        y = experts.expert_ffn_grouped(x_MD, grouping, *w, "swiglu", backend=backend)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    rows["kernels"] = measure(jax.jit(jax.grad(kernels_loss, argnums=(0, 1))), (w, x_MD), args.repeats)

    dense_ms = rows["dense"][0]
    print(
        f"\npreset={args.preset} T={B * L} D={D} F={F} E={E} K={K} {jnp.dtype(dtype).name} backend={backend}"
        f" device={jax.devices()[0].device_kind} jax={jax.__version__}"
    )
    print(f"| {'part':8s} | {'ms':>8s} | {'x dense':>7s} | {'share of layer':>14s} | {'temp MiB':>9s} |")
    print("|----------|----------|---------|----------------|-----------|")
    for name, (ms, temp) in rows.items():
        print(
            f"| {name:8s} | {ms:8.2f} | {ms / dense_ms:7.2f} | {ms / rows['layer'][0]:14.2f} | "
            f"{temp / 2**20:9.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
