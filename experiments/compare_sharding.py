"""Compares sharding strategies on the real train step: step time, memory, parameters and collectives.

    python experiments/compare_sharding.py --config=configs/translation.py:smoke \
        --strategies=dp,fsdp,ep,ep_fsdp,ep_tp --out=runs/compare_sharding

    # Plan a TPU pod from this host (needs libtpu: pip install -e '.[tpu-plan]'):
    python experiments/compare_sharding.py --topology=v5p:4x4x4 \
        --config=configs/translation.py:large --config=configs/translation.py:xl \
        --strategies=dp,fsdp,ep,ep_fsdp,ep_tp --out=experiments/results/plan_v5p_4x4x4

For each strategy (a preset of ``moe_jax/sharding.py`` on its mesh) it builds the config's model, compiles the
trainer's train step with that strategy's shardings, runs ``--steps`` steps on random token batches (the
data pipeline is not what is compared), and records: median step time, per-device memory from the compiled
program's memory analysis (arguments + outputs + temporaries − aliased donations), parameter and optimizer
bytes held per device, and every collective of the HLO by kind (count and bytes per device). It writes
``results.json``, ``results.md`` and ``results.png`` (bar charts) to ``--out``.

Without real accelerators, run it on simulated CPU devices (the default here: 8): the memory, parameter and
collective columns are what a real mesh of that shape would hold and send; the step times are CPU times
(collectives are memcpys), so they rank strategies by compute overhead only.

With ``--topology=NAME`` (any TPU topology jax knows: ``v5p:4x4x4``, ``v5e:16x16``, ``v4:4x4x8``,
``v6e:8x8``) nothing runs: each ``--config`` (repeat it to compare model sizes) × strategy is compiled
ahead of time for that pod by :mod:`moe_jax.planner`, and the table gives per-chip memory against the
chip's HBM, FLOPs and HBM bytes per step, collectives, a roofline step time and an MFU estimate (model in
:mod:`moe_jax.tpu_specs`). Each strategy gets a mesh sized for the pod and the model
(:func:`moe_jax.planner.default_pod_mesh`); ``--mesh=ep:data=4,expert=16`` overrides one, and
``--set=train.batch_size=1024`` changes a config field of every ``--config`` (the global batch decides how
much work each chip has, which is what the estimates are most sensitive to).
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

import ast  # noqa: E402
import importlib.util  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import hlo_stats, plan_report, planner, sharding  # noqa: E402
from moe_jax.train import optim, step  # noqa: E402

# A mesh per strategy for 8 devices (-1 takes the rest): each strategy on the layout it is meant for.
DEFAULT_MESHES = {
    "dp": {"data": -1},
    "fsdp": {"fsdp": -1},
    "ep": {"data": 2, "expert": -1},
    "ep_fsdp": {"fsdp": 2, "expert": -1},
    "ep_tp": {"data": 2, "expert": 2, "tensor": -1},
}


def load_config(spec: str, overrides: Sequence[str] = ()):
    """``configs/<task>.py[:variant]`` with ``KEY=VALUE`` overrides (values parsed as Python literals)."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_compare_cfg", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant or "default")
    config.lock()  # an override of a field that does not exist is a typo, not a new field
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.batch_size=1024")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        try:
            config.update_from_flattened_dict({key: value})
        except KeyError as e:
            raise ValueError(f"--set {item!r}: {e.args[0]}") from None
    return config


def config_name(spec: str) -> str:
    """``configs/translation.py:large`` → ``translation:large`` (the table's config column)."""
    path, _, variant = spec.partition(":")
    return f"{os.path.splitext(os.path.basename(path))[0]}:{variant or 'default'}"


def parse_mesh(text: str) -> tuple[str, dict[str, int]]:
    """``'ep:data=4,expert=-1'`` → ``('ep', {'data': 4, 'expert': -1})``."""
    strategy, sep, axes = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return strategy, {k.strip(): int(v) for k, v in (a.split("=") for a in axes.split(",") if a.strip())}
    except ValueError:
        raise ValueError(
            f"--mesh {text!r}: expected STRATEGY:AXIS=N[,AXIS=N...], e.g. ep:data=4,expert=-1"
        ) from None


def bytes_on_first_device(tree) -> int:
    return sum(
        x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "addressable_shards")
    )


def measure_strategy(config, strategy: str, mesh_shape: dict, steps: int) -> dict:
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.preset_rules(strategy)
    vocab = int(config.data.vocab_size)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = planner.build_model(config, vocab)
        tx, schedule = optim.make_optimizer(config.optim, max(steps, 1))
        graphdef, state = step.create_train_state(model, tx)
        state_sh = sharding.state_shardings(state, mesh, rules)
        state = jax.device_put(state, state_sh)
        model_state, opt_state = state[0], state[1]
        batch_sh = jax.sharding.NamedSharding(
            mesh, sharding.logical_to_spec(("act_batch",), rules, mesh.axis_names)
        )

        def batch():
            return jax.device_put(planner.random_batch(config, rng), batch_sh)

        train_fn = step.jit_train_step(
            graphdef,
            state_sh,
            batch_sh,
            loss_sums=planner.loss_sums(config),
            schedule=schedule,
            seed=0,
            lb_weight=float(config.loss.lb_weight),
            z_weight=float(config.loss.z_weight),
        )
        param_bytes = bytes_on_first_device(model_state)
        opt_bytes = bytes_on_first_device(opt_state)
        example = batch()
        compiled = train_fn.lower(state, example).compile()
        peak = hlo_stats.peak_memory_bytes(compiled)
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
        "temp_bytes_per_device": int(compiled.memory_analysis().temp_size_in_bytes),
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
    parser.add_argument(
        "--config", required=True, action="append", help="configs/<task>.py[:variant]; repeat with --topology"
    )
    parser.add_argument("--strategies", default="dp,fsdp,ep,ep_fsdp,ep_tp")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (CPU only)")
    parser.add_argument("--topology", help="plan a TPU pod instead (v5p:4x4x4, v5e:16x16, ...); needs libtpu")
    parser.add_argument(
        "--mesh", action="append", default=[], help="STRATEGY:AXIS=N,... mesh of one strategy (repeatable)"
    )
    parser.add_argument(
        "--set", action="append", default=[], dest="overrides", help="KEY=VALUE config override (repeatable)"
    )
    args = parser.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in strategies if s not in sharding.PRESETS]
    if unknown:
        print(
            f"error: --strategies: {unknown} unknown; choose from {sorted(sharding.PRESETS)}", file=sys.stderr
        )
        return 2
    try:
        meshes = dict(parse_mesh(m) for m in args.mesh)
        configs = [(config_name(spec), load_config(spec, args.overrides)) for spec in args.config]
        for _, config in configs:
            planner.check_task(config)
    except (ValueError, KeyError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.topology:
        return plan_main(args, configs, strategies, meshes)
    if len(configs) > 1:
        print("error: repeat --config only with --topology (one config per CPU comparison)", file=sys.stderr)
        return 2
    config = configs[0][1]
    header = (
        f"{args.config[0]} · {jax.device_count()} × {jax.devices()[0].device_kind} · jax {jax.__version__} · "
        f"median of {args.steps} steps"
    )
    rows = []
    for i, s in enumerate(strategies, 1):
        mesh = meshes.get(s, DEFAULT_MESHES[s])
        print(f"[{i}/{len(strategies)}] {s} on {mesh} ...", flush=True)
        try:
            rows.append(measure_strategy(config, s, mesh, args.steps))
        except ValueError as e:
            print(f"error: strategy {s}: {e}", file=sys.stderr)
            return 2
    write_outputs(rows, args.out, header)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    print(f"wrote {args.out}/results.md, results.json, results.png")
    return 0


def plan_main(args, configs, strategies, meshes) -> int:
    """``--topology``: compiles every config × strategy for the pod and writes the plan."""
    # The host only traces and compiles; keep its own backend on CPU so it never opens local TPU chips.
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    try:
        topology, spec = planner.load_topology(args.topology)
    except planner.PlannerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chips = len(topology.devices)
    plans = []
    for spec_name, config in configs:
        for s in strategies:
            mesh = meshes.get(s) or planner.default_pod_mesh(s, config, chips)
            try:  # a wrong --mesh is the user's to fix before anything compiles
                sharding.make_mesh(mesh, devices=list(topology.devices))
            except ValueError as e:
                print(f"error: --mesh for {s} on {args.topology} ({chips} chips): {e}", file=sys.stderr)
                return 2
            plans.append((spec_name, config, s, mesh))
    rows = []
    for i, (spec_name, config, s, mesh) in enumerate(plans, 1):
        print(f"[{i}/{len(plans)}] {spec_name} {s} on {mesh} ...", flush=True)
        start = time.perf_counter()
        try:
            row = planner.plan_strategy(config, s, mesh, topology, spec)
        except ValueError as e:  # this model cannot be sharded this way; the other rows still count
            print(f"  cannot shard: {e}", file=sys.stderr)
            row = {"strategy": s, "mesh": {k: v for k, v in mesh.items() if v != 1}, "error": str(e)}
        row.update(config=spec_name, compile_s=round(time.perf_counter() - start, 1))
        rows.append(row)
    setup = plan_report.report_setup(args.topology, topology, spec, configs, list(args.overrides))
    plan_report.write_report(rows, args.out, setup)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    print(f"wrote {args.out}/results.md, results.json, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
