"""Decoder-only LM speed: MoE train step ÷ dense train step of equal active FLOPs, and KV-cache generation.

Both models come from one config (``configs/lm.py`` ``default`` and its ``dense`` arm: every MoE FFN
replaced by a dense FFN of width K × expert width, as ``experiments/moe_vs_dense.py`` builds it) and run
THE train step (``moe_jax.train.step.train_step``) on the same random packed batches in one process;
times are medians over repeats after compilation. Generation: tokens/s of ``decode.generate`` with the
KV cache and with the recompute-the-prefix reference, 256 new tokens after a 32-token prompt.

    python benchmarks/bench_lm.py [--config configs/lm.py] [--set model.d_model=128 ...] [--out FILE]

Prints the ratios and writes the raw numbers as JSON (default ``benchmarks/results/lm_cpu.json``).
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

from experiments.moe_vs_dense import arm_config, load_config  # noqa: E402
from moe_jax.models.counting import parameter_counts  # noqa: E402
from moe_jax.tasks.lm import build_decoder, lm_loss_sums  # noqa: E402
from moe_jax.train import decode, optim  # noqa: E402
from moe_jax.train import step as step_lib  # noqa: E402


def packed_batch(rng, batch_size: int, seq_len: int, vocab: int, docs_per_row: int = 3) -> dict:
    """Random tokens in rows of ``docs_per_row`` documents (segment ids, per-document positions)."""
    bounds = np.sort(rng.choice(np.arange(1, seq_len), docs_per_row - 1, replace=False))
    seg_L = np.searchsorted(bounds, np.arange(seq_len), side="right") + 1
    starts = np.concatenate([[0], bounds])
    pos_L = np.arange(seq_len) - starts[seg_L - 1]
    tokens = rng.integers(4, vocab, (batch_size, seq_len + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.broadcast_to(seg_L, (batch_size, seq_len)).astype(np.int32),
        "positions": np.broadcast_to(pos_L, (batch_size, seq_len)).astype(np.int32),
        "token_weight": np.ones((batch_size, seq_len), np.float32),
    }


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_train_step(config, vocab: int, repeats: int) -> dict:
    model = build_decoder(config, vocab)
    counts = parameter_counts(model)
    tx, schedule = optim.make_optimizer(config.optim, 1000)
    graphdef, state = step_lib.create_train_state(model, tx)
    fn = jax.jit(
        lambda state, batch: step_lib.train_step(
            graphdef,
            state,
            batch,
            loss_sums=lm_loss_sums,
            schedule=schedule,
            seed=0,
            lb_weight=float(config.loss.lb_weight),
            z_weight=float(config.loss.z_weight),
        )
    )
    rng = np.random.default_rng(0)
    batch = {
        k: jnp.asarray(v)
        for k, v in packed_batch(rng, int(config.train.batch_size), int(config.data.seq_len), vocab).items()
    }
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(fn(state, batch))
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def one():
        holder["state"], metrics = fn(holder["state"], batch)
        return metrics["loss"]

    return {"step_seconds": _median_seconds(one, repeats), "compile_seconds": compile_s, **counts}


def time_generation(config, vocab: int, new_tokens: int, repeats: int) -> dict:
    model = build_decoder(config, vocab)
    model.eval()
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(1)
    prompt_BL = jnp.asarray(rng.integers(4, vocab, (4, 32)).astype(np.int32)).at[:, 0].set(2)
    lengths_B = jnp.full((4,), 32, jnp.int32)
    out = {}
    for use_cache in (True, False):
        fn = jax.jit(
            lambda state, use_cache=use_cache: decode.generate(
                nnx.merge(graphdef, state),
                prompt_BL,
                lengths_B,
                max_new_tokens=new_tokens,
                eos_id=-1,  # never stop: every row makes all the tokens
                use_cache=use_cache,
            )
        )
        jax.block_until_ready(fn(state))
        seconds = _median_seconds(lambda fn=fn: fn(state), repeats)
        out["cache" if use_cache else "no_cache"] = {
            "seconds": seconds,
            "tokens_per_s": 4 * new_tokens / seconds,
        }
    out["speedup"] = out["cache"]["tokens_per_s"] / out["no_cache"]["tokens_per_s"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/lm.py", help="path.py[:variant] (repository-relative)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--skip_generation", action="store_true")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "lm_cpu.json"))
    args = parser.parse_args(argv)
    spec = args.config if os.path.isabs(args.config) else os.path.join(ROOT, args.config)
    base = load_config(spec, args.set)
    vocab = int(base.data.vocab_size)
    steps = int(base.train.num_train_steps)
    result = {
        "config": args.config,
        "overrides": args.set,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
    }
    for arm in ("moe", "dense_active"):
        result[arm] = time_train_step(arm_config(base, arm, steps, 0), vocab, args.repeats)
        print(f"{arm}: {result[arm]['step_seconds'] * 1e3:.1f} ms/step ({result[arm]['active']:,} active)")
    result["moe_over_dense"] = result["moe"]["step_seconds"] / result["dense_active"]["step_seconds"]
    print(f"MoE train step / dense train step of equal active FLOPs: {result['moe_over_dense']:.2f}x")
    if not args.skip_generation:
        result["generation"] = time_generation(base, vocab, args.new_tokens, max(args.repeats // 2, 1))
        g = result["generation"]
        print(
            f"generation, {args.new_tokens} new tokens x 4 rows: "
            f"KV cache {g['cache']['tokens_per_s']:.0f} tok/s, "
            f"no cache {g['no_cache']['tokens_per_s']:.0f} tok/s: {g['speedup']:.1f}x"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
