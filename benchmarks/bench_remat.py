"""Scanned layers and rematerialisation: compile time and compiled memory of a 32-block MoE LM gradient.

One model shape (``configs/lm.py`` default widths, 32 blocks, MoE on blocks 1..31, dropless), one batch;
for the unrolled and the scanned stack (``model.scan_layers``) and every policy of
``moe_jax.models.blocks.REMAT_POLICIES`` it lowers and compiles ``jax.grad`` of the next-token loss and
reads the compile wall time, XLA's memory analysis (temporary buffers: the activations kept for the
backward pass live there), and the program's size (HLO text lines and matmul instructions; a scan's body
counts once, however many layers it runs). Ratios are against the unrolled stack without remat, compiled
in the same process.

    python benchmarks/bench_remat.py [--layers 32] [--batch 16] [--seq 256] [--out FILE]

Writes the raw numbers as JSON (default ``benchmarks/results/scan_remat_cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_jax.models import DecoderLM, ModelConfig  # noqa: E402
from moe_jax.models.blocks import REMAT_POLICIES  # noqa: E402


def measure(policy: str, layers: int, batch: int, seq: int, dense: bool = False, scan: bool = False) -> dict:
    cfg = ModelConfig.from_mapping(
        dict(
            vocab_size=2048,
            d_model=128,
            num_heads=4,
            num_kv_heads=2,
            d_ff=512,
            num_encoder_layers=0,
            num_decoder_layers=layers,
            remat_policy=policy,
            scan_layers=scan,
            moe=dict(
                num_experts=8,
                top_k=2,
                d_ff=256,
                layers=() if dense else tuple(range(1, layers)),
                capacity_factor=None,
            ),
        )
    )
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def loss(state, tokens_BL):
        logits, aux = nnx.merge(graphdef, state)(tokens_BL, deterministic=False)
        logp = jax.nn.log_softmax(logits[:, :-1])
        ce = -jnp.mean(jnp.take_along_axis(logp, tokens_BL[:, 1:, None], -1))
        return ce + sum(a["load_balancing_loss"] for a in aux.values())

    t0 = time.perf_counter()
    lowered = jax.jit(jax.grad(loss)).lower(state, tokens)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    return {
        "scan_layers": scan,
        "policy": policy,
        "compile_seconds": seconds,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "dots": text.count(" dot("),
        "hlo_lines": text.count("\n"),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dense", action="store_true", help="every block dense (no MoE layers)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "scan_remat_cpu.json"))
    args = p.parse_args(argv)
    rows = [
        measure(policy, args.layers, args.batch, args.seq, args.dense, scan)
        for scan in (False, True)
        for policy in REMAT_POLICIES
    ]
    base = rows[0]
    print(
        f"{'dense' if args.dense else 'MoE'}, {args.layers} blocks, batch {args.batch} x {args.seq}, "
        f"{jax.devices()[0].platform}"
    )
    print(
        "| layers | policy | compile s | vs unrolled none | temp memory (MiB) | vs unrolled none | "
        "matmuls in program | HLO lines |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["compile_ratio"] = r["compile_seconds"] / base["compile_seconds"]
        r["temp_ratio"] = r["temp_bytes"] / base["temp_bytes"]
        r["dots_ratio"] = r["dots"] / base["dots"]
        print(
            f"| {'scanned' if r['scan_layers'] else 'unrolled'} | {r['policy']} | "
            f"{r['compile_seconds']:.1f} | {r['compile_ratio']:.2f} | {r['temp_bytes'] / 2**20:.1f} | "
            f"{r['temp_ratio']:.2f} | {r['dots']} | {r['hlo_lines']} |"
        )
    out = {
        "args": vars(args),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "rows": rows,
        "note": "compile seconds are wall time on a shared 2-core host; memory and matmul counts are exact",
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
