"""Expert-parallel transports: bytes each device moves per MoE layer, against the analytic minimum.

One dropless MoE layer (token choice, top-K) on an ``expert`` mesh of n devices, each holding T tokens (one
sequence) and E/n experts. For every ``model.moe.ep_transport`` the layer's forward pass and its gradient are
compiled, and every collective of the compiled HLO is read: its result bytes per device
(``moe_jax.hlo_stats``) and the bytes one device receives with a bandwidth-optimal algorithm
(``moe_jax.planner.collective_ici_bytes``; balanced routing for ragged-all-to-all, whose result is a
worst-case receive buffer). The analytic figures, per device and direction:

    ragged   T·K·D values (each assignment row exactly once), of which (n−1)/n arrive from other devices;
    ring     the gathered tokens n·T·D (all-gather; (n−1)/n of them received) and the float32 outputs
             reduce-scattered back to T·D;
    capacity E·C·D values with C = S = T (dropless), i.e. E/K times the ragged figure.

On the CPU host the 8 devices are simulated and XLA:CPU has no ragged-all-to-all, so the ragged row there is
the exact all-gather emulation (n times the rows); with ``--topology`` the same layer is compiled by XLA:TPU
for that pod slice and the ragged row holds the real collective.

    python benchmarks/bench_ep_transport.py [--tokens 512] [--d_model 512] [--topology v5e:4x2] [--out FILE]

Writes JSON (default ``benchmarks/results/ep_transport.json``).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_jax import MoeLayer, hlo_stats, planner, sharding  # noqa: E402

TRANSPORTS = ("capacity", "ring", "ragged")


def layer_programs(
    transport: str, devices, tokens: int, d_model: int, d_ff: int, experts: int, top_k: int, dtype
):
    """HLO text of the forward pass and of the gradient, on an ``expert`` mesh over ``devices``."""
    n = len(devices)
    layer = nnx.eval_shape(
        lambda: MoeLayer(
            d_model,
            d_ff,
            experts,
            top_k,
            capacity_factor=None,
            expert_parallel="shard_map",
            ep_transport=transport,
            dtype=dtype,
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    mesh = jax.sharding.Mesh(np.array(devices, dtype=object), ("expert",))
    rules = sharding.preset_rules("ep")
    param_shardings = sharding.state_shardings(params, mesh, rules)
    abstract_params = planner.abstract_like(params, param_shardings)
    x = jax.ShapeDtypeStruct(
        (n, tokens, d_model), dtype, sharding=NamedSharding(mesh, PartitionSpec("expert"))
    )

    def forward(params, x):
        return nnx.merge(graphdef, params, rest)(x)[0]

    def gradient(params, x):
        return jax.grad(lambda p, x: jnp.sum(forward(p, x).astype(jnp.float32) ** 2), argnums=(0, 1))(
            params, x
        )

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return {
            name: jax.jit(fn).lower(abstract_params, x).compile().as_text()
            for name, fn in (("forward", forward), ("gradient", gradient))
        }


def read_collectives(hlo: str, n: int) -> dict:
    """``{kind: {count, result_bytes, received_bytes}}`` per device."""
    table = {
        kind: {"count": row["count"], "result_bytes": row["bytes"]}
        for kind, row in hlo_stats.summary(hlo).items()
    }
    for kind, received in planner.ici_bytes_by_kind(hlo, n).items():
        table[kind]["received_bytes"] = received
    return table


def analytic_received(
    transport: str, n: int, tokens: int, d_model: int, experts: int, top_k: int, itemsize: int
):
    """Bytes one device must receive in the forward pass, there and back (module docstring)."""
    remote = (n - 1) / n
    if transport == "ragged":
        there = back = remote * tokens * top_k * d_model * itemsize
    elif transport == "ring":
        there = remote * n * tokens * d_model * itemsize
        back = remote * n * tokens * d_model * 4  # the reduce-scatter of float32 partial outputs
    else:
        there = back = remote * experts * tokens * d_model * itemsize
    return {"there": int(there), "back": int(back), "total": int(there + back)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512, help="tokens per device")
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--d_ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--topology", default="", help="also compile for this TPU slice (8 chips), e.g. v5e:4x2")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "ep_transport.json"))
    args = p.parse_args(argv)
    platforms = [("cpu", jax.devices()[:8], jnp.float32)]
    if args.topology:
        topology, _ = planner.load_topology(args.topology)
        platforms.append((f"tpu {args.topology}", list(topology.devices), jnp.bfloat16))
    results = []
    for name, devices, dtype in platforms:
        n = len(devices)
        itemsize = jnp.dtype(dtype).itemsize
        for transport in TRANSPORTS:
            programs = layer_programs(
                transport, devices, args.tokens, args.d_model, args.d_ff, args.experts, args.top_k, dtype
            )
            row = {
                "platform": name,
                "devices": n,
                "dtype": jnp.dtype(dtype).name,
                "transport": transport,
                "emulated": transport == "ragged" and name == "cpu",
                "analytic_received": analytic_received(
                    transport, n, args.tokens, args.d_model, args.experts, args.top_k, itemsize
                ),
                **{prog: read_collectives(hlo, n) for prog, hlo in programs.items()},
            }
            results.append(row)
            fwd = row["forward"]
            moved = sum(v["result_bytes"] for v in fwd.values())
            received = sum(v["received_bytes"] for v in fwd.values())
            minimum = row["analytic_received"]["total"]
            print(
                f"{name:>14} {transport:>8}{' (emulated)' if row['emulated'] else '':11}: forward pass "
                f"received {received / 2**20:8.3f} MiB vs analytic {minimum / 2**20:8.3f} MiB "
                f"({received / minimum:5.2f}x); collective results {moved / 2**20:8.3f} MiB",
                flush=True,
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "args": vars(args) | {"out": os.path.relpath(args.out, ROOT)},
                "host": platform.machine(),
                "jax": jax.__version__,
                "rows": results,
            },
            f,
            indent=1,
        )
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
