"""Compares sharding strategies on the real train step: step time, memory, parameters and collectives.

    python experiments/compare_sharding.py --config=configs/translation.py:smoke \
        --strategies=dp,fsdp,ep,ep_fsdp,ep_tp --out=runs/compare_sharding

For each strategy (a preset of ``moe_jax/sharding.py`` on its mesh) it builds the config's model, compiles the
trainer's train step with that strategy's shardings, runs ``--steps`` steps on random token batches (the
data pipeline is not what is compared), and records: median step time, per-device memory from the compiled
program's memory analysis (arguments + outputs + temporaries − aliased donations), parameter and optimizer
bytes held per device, and every collective of the HLO by kind (count and bytes per device). It writes
``results.json``, ``results.md`` and ``results.png`` (bar charts) to ``--out``.

Without real accelerators, run it on simulated CPU devices (the default here: 8): the memory, parameter and
collective columns are what a real mesh of that shape would hold and send; the step times are CPU times
(collectives are memcpys), so they rank strategies by compute overhead only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import jax

# Simulated CPU devices must be set before JAX initialises (only the CPU backend reads it). When imported
# into a process that already initialised JAX (the tests), its device count stands.
with contextlib.suppress(RuntimeError):
    jax.config.update(
        "jax_num_cpu_devices",
        int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), 8)),
    )

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import hlo_stats, sharding  # noqa: E402
from moe_jax.train import optim, step, trainer  # noqa: E402

# A mesh per strategy for 8 devices (-1 takes the rest): each strategy on the layout it is meant for.
DEFAULT_MESHES = {
    "dp": {"data": -1},
    "fsdp": {"fsdp": -1},
    "ep": {"data": 2, "expert": -1},
    "ep_fsdp": {"fsdp": 2, "expert": -1},
    "ep_tp": {"data": 2, "expert": 2, "tensor": -1},
}


def load_config(spec: str):
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_compare_cfg", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or "default")


def bytes_on_first_device(tree) -> int:
    return sum(
        x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "addressable_shards")
    )


def measure_strategy(config, strategy: str, mesh_shape: dict, steps: int) -> dict:
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.preset_rules(strategy)
    vocab = int(config.data.vocab_size)
    B = int(config.train.batch_size)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = trainer.build_model(config, vocab_size=vocab, bos_id=2, seed=0)
        tx, schedule = optim.make_optimizer(config.optim, max(steps, 1))
        graphdef, state = step.create_train_state(model, tx)
        state_sh = sharding.state_shardings(state, mesh, rules)
        state = jax.device_put(state, state_sh)
        model_state, opt_state = state[0], state[1]
        batch_sh = jax.sharding.NamedSharding(
            mesh, sharding.logical_to_spec(("act_batch",), rules, mesh.axis_names)
        )

        def batch():
            ids = lambda n: rng.integers(4, vocab, size=(B, n), dtype=np.int32)
            return {
                "inputs": jax.device_put(ids(int(config.data.max_input_len)), batch_sh),
                "targets": jax.device_put(ids(int(config.data.max_target_len)), batch_sh),
            }

        train_fn = step.jit_train_step(
            graphdef,
            state_sh,
            batch_sh,
            schedule=schedule,
            seed=0,
            lb_weight=float(config.loss.lb_weight),
            z_weight=float(config.loss.z_weight),
        )
        param_bytes = bytes_on_first_device(model_state)
        opt_bytes = bytes_on_first_device(opt_state)
        example = batch()
        compiled = train_fn.lower(state, example).compile()
        mem = compiled.memory_analysis()
        peak = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
        collectives = hlo_stats.summary(compiled.as_text())
        state, metrics = compiled(state, example)  # warm-up
        times, losses = [], []
        for _ in range(steps):
            b = batch()
            jax.block_until_ready(b)
            start = time.perf_counter()
            state, metrics = compiled(state, b)
            jax.block_until_ready(metrics["loss"])
            times.append((time.perf_counter() - start) * 1e3)
            losses.append(float(metrics["loss"]))
    return {
        "strategy": strategy,
        "mesh": {k: v for k, v in zip(mesh.axis_names, mesh.devices.shape) if v > 1} or {"data": 1},
        "step_ms": statistics.median(times),
        "peak_bytes_per_device": int(peak),
        "temp_bytes_per_device": int(mem.temp_size_in_bytes),
        "param_bytes_per_device": int(param_bytes),
        "opt_state_bytes_per_device": int(opt_bytes),
        "collectives": collectives,
        "final_loss": losses[-1] if losses else float("nan"),
    }


def write_outputs(rows: list[dict], out: str, header: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"setup": header, "rows": rows}, f, indent=1)
    kinds = sorted({k for r in rows for k in r["collectives"]})
    lines = [
        f"{header}\n",
        "| strategy | mesh | step ms | peak MiB/dev | params MiB/dev | opt state MiB/dev | "
        + " | ".join(f"{k} (n, KiB)" for k in kinds)
        + " |",
        "|" + "---|" * (6 + len(kinds)),
    ]
    mib = lambda b: f"{b / 2**20:.2f}"
    for r in rows:
        cells = [
            f"{r['collectives'][k]['count']}, {r['collectives'][k]['bytes'] / 1024:.1f}"
            if k in r["collectives"]
            else "0"
            for k in kinds
        ]
        mesh = "×".join(f"{k}{v}" for k, v in r["mesh"].items())
        lines.append(
            f"| {r['strategy']} | {mesh} | {r['step_ms']:.1f} | {mib(r['peak_bytes_per_device'])} | "
            f"{mib(r['param_bytes_per_device'])} | {mib(r['opt_state_bytes_per_device'])} | "
            + " | ".join(cells)
            + " |"
        )
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["strategy"] for r in rows]
    panels = [
        ("step time (ms)", [r["step_ms"] for r in rows]),
        ("peak memory / device (MiB)", [r["peak_bytes_per_device"] / 2**20 for r in rows]),
        (
            "params + opt state / device (MiB)",
            [(r["param_bytes_per_device"] + r["opt_state_bytes_per_device"]) / 2**20 for r in rows],
        ),
        (
            "collective bytes / device / step (KiB)",
            [sum(c["bytes"] for c in r["collectives"].values()) / 1024 for r in rows],
        ),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (title, values) in zip(axes, panels):
        ax.bar(names, values, color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(header, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "results.png"), dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="configs/<task>.py[:variant]")
    parser.add_argument("--strategies", default="dp,fsdp,ep,ep_fsdp,ep_tp")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (CPU only)")
    args = parser.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in strategies if s not in sharding.PRESETS]
    if unknown:
        print(
            f"error: --strategies: {unknown} unknown; choose from {sorted(sharding.PRESETS)}", file=sys.stderr
        )
        return 2
    config = load_config(args.config)
    header = (
        f"{args.config} · {jax.device_count()} × {jax.devices()[0].device_kind} · jax {jax.__version__} · "
        f"median of {args.steps} steps"
    )
    rows = []
    for i, s in enumerate(strategies, 1):
        print(f"[{i}/{len(strategies)}] {s} on {DEFAULT_MESHES[s]} ...", flush=True)
        try:
            rows.append(measure_strategy(config, s, DEFAULT_MESHES[s], args.steps))
        except ValueError as e:
            print(f"error: strategy {s}: {e}", file=sys.stderr)
            return 2
    write_outputs(rows, args.out, header)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    print(f"wrote {args.out}/results.md, results.json, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
