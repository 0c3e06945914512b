"""Checks every grouped-matmul backend runnable here inside the full MoE layer against an f32 reference.

Run on a GPU/TPU host (imports only jax/flax/numpy):
    python benchmarks/check_backends.py

The reference is the layer's ``einsum`` dispatcher in float32 (dropless, same parameters and inputs);
each grouped backend runs in the compute dtype (bfloat16 off CPU) and must agree in output and in every
gradient to a relative error (norm of difference / norm of reference) below 1e-2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_jax.moe import MoeLayer, grouped_matmul  # noqa: E402

REL_TOL = 1e-2


def grads(layer, x):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y.astype(jnp.float32) ** 2) + aux["load_balancing_loss"], y

    (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, g


def main() -> int:
    platform = jax.default_backend()
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    B, L, D, F, E, K = 4, 512, 512, 1024, 8, 2
    # The reference sees the same (compute-dtype rounded) input, so routing decisions agree; otherwise
    # near-tied tokens route differently and dominate the error.
    x = jax.random.normal(jax.random.key(0), (B, L, D), jnp.float32).astype(dtype).astype(jnp.float32)
    ref_layer = MoeLayer(D, F, E, K, dispatch="einsum", rngs=nnx.Rngs(0))
    with jax.default_matmul_precision("highest"):  # no TF32 in the reference on GPU
        y_ref, g_ref = grads(ref_layer, x)
    ok = True
    for backend in grouped_matmul.BACKENDS:
        if platform not in grouped_matmul.PLATFORMS.get(backend, ()):
            continue
        layer = MoeLayer(
            D, F, E, K, dispatch="grouped", grouped_backend=backend, dtype=dtype, rngs=nnx.Rngs(0)
        )
        y, g = grads(layer, x.astype(dtype))
        pairs = [("y", y, y_ref)] + [
            (jax.tree_util.keystr(p), a, b)
            for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref))
        ]
        worst = 0.0
        for name, a, b in pairs:
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
            worst = max(worst, err)
            if not err < REL_TOL:
                print(f"  {backend}: {name} relative error {err:.3e} > {REL_TOL}")
        ok &= worst < REL_TOL
        print(
            f"{backend:12s} ({jnp.dtype(dtype).name}) worst relative error {worst:.3e} ->",
            "OK" if worst < REL_TOL else "FAIL",
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
