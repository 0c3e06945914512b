"""The report of a TPU pod plan: ``results.json``, ``results.md`` (table and how to read it), ``results.png``.

Rows come from :func:`moe_jax.planner.plan_strategy`; :func:`report_setup` records what they were computed
for (pod, chip numbers with their source, versions, models).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
from collections.abc import Sequence

import jax

from moe_jax import tpu_specs
from moe_jax.planner import LM_TASK, token_lengths

_KIND_ABBREV = {
    "all-to-all": "A2A",
    "all-gather": "AG",
    "all-reduce": "AR",
    "reduce-scatter": "RS",
    "collective-permute": "CP",
}


def report_setup(
    name: str, topology, spec: tpu_specs.TpuSpec, configs, overrides: Sequence[str] = ()
) -> dict:
    """What a plan was computed for: pod, chip numbers with their source, versions, models.

    Args:
        name: the topology name (``v5p:4x4x4``).
        topology: from :func:`load_topology`.
        spec: the chip's peak numbers.
        configs: ``(name, config)`` pairs.
        overrides: the ``KEY=VALUE`` config overrides applied to every config.
    """
    try:
        libtpu_version = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        libtpu_version = "unknown"
    models = {config_name: _model_summary(c) for config_name, c in configs}
    return {
        "topology": name,
        "chips": len(topology.devices),
        "device_kind": topology.devices[0].device_kind,
        "spec": dataclasses.asdict(spec),
        "jax": jax.__version__,
        "libtpu": libtpu_version,
        "overrides": list(overrides),
        "models": models,
    }


def _model_summary(c) -> dict:
    Li, Lt = token_lengths(c)
    layers = (
        f"{c.model.num_decoder_layers}"
        if c.task == LM_TASK
        else (f"{c.model.num_encoder_layers}+{c.model.num_decoder_layers}")
    )
    return {
        "task": c.task,
        "d_model": int(c.model.d_model),
        "layers": layers + (" scanned" if c.model.get("scan_layers") else ""),
        "experts": f"{c.model.moe.num_experts} top-{c.model.moe.top_k}",
        "d_ff": int(c.model.d_ff),
        "expert_d_ff": int(c.model.moe.get("d_ff") or c.model.d_ff),
        "batch": int(c.train.batch_size),
        "tokens": f"{Lt}" if c.task == LM_TASK else f"{Li}+{Lt}",
        "vocab": int(c.data.vocab_size),
        "dtype": f"{c.model.dtype} compute, {c.model.param_dtype} params",
        "remat_policy": c.model.get("remat_policy", "none"),
    }


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def _table_row(r: dict) -> str:
    mesh = "×".join(f"{k}{v}" for k, v in r["mesh"].items())
    cells = [r["config"], r["strategy"], mesh]
    if "flops_per_chip" not in r:  # could not shard, or the compiler ran out of HBM
        peak = _gib(r["peak_bytes_per_chip"]) if "peak_bytes_per_chip" in r else "—"
        state = _gib(r["state_bytes_per_chip"]) if "state_bytes_per_chip" in r else "—"
        cells += [peak, f"✗ {r['error']}", state] + ["—"] * 7
        return "| " + " | ".join(cells) + " |"
    collectives = " · ".join(
        f"{_KIND_ABBREV.get(k, k)} {v['count']}, {v['bytes'] / 2**20:.1f}"
        for k, v in r["collectives"].items()
    )
    ms = lambda s: f"{s * 1e3:.1f}"
    at_least = "≥ " if r.get("loop_body_counted_once") else ""
    cells += [
        _gib(r["peak_bytes_per_chip"]),
        "✓" if r["fits"] else "✗",
        _gib(r["state_bytes_per_chip"]),
        f"{r['flops_per_chip'] / 1e12:.2f} ({r['model_flops_per_chip'] / 1e12:.2f})",
        f"{at_least}{r['hbm_bytes_accessed_per_chip'] / 1e9:.1f}",
        (at_least + collectives) if collectives else "—",
        f"{at_least}{r['ici_bytes_per_chip'] / 2**20:.1f}",
        f"{at_least}{ms(r['step_s'])} ({ms(r['compute_s'])} / {ms(r['memory_s'])} / {ms(r['ici_s'])})",
        r["bound"],
        f"{'≤ ' if at_least else ''}{100 * r['mfu']:.1f}%",
    ]
    return "| " + " | ".join(cells) + " |"


def _model_line(name: str, m: dict, rows: list[dict]) -> str:
    counted = next((r for r in rows if r["config"] == name and "params" in r), None)
    size = ""
    if counted:
        size = f", {counted['params'] / 1e9:.2f} B parameters ({counted['active_params'] / 1e9:.2f} B active)"
    return (
        f"`{name}`: d_model {m['d_model']}, {m['layers']} layers, {m['experts']}, d_ff {m['d_ff']} "
        f"(experts {m.get('expert_d_ff', m['d_ff'])}), remat {m.get('remat_policy', 'none')}, "
        f"batch {m['batch']} × {m['tokens']} tokens, vocab {m['vocab']}, {m['dtype']}{size}"
    )


_HOW_TO_READ = (
    "Per chip: HBM = compiled arguments + outputs + temporaries − donated (✗: over the chip's HBM, or "
    "the compiler ran out of it); params+opt = the train state's shards; TFLOP and HBM GB from the "
    "compiled program's cost analysis, model TFLOP = 3 × forward of the active parameters and attention; "
    "collectives = count and result MiB per kind (A2A all-to-all, AG all-gather, AR all-reduce, "
    "RS reduce-scatter, CP collective-permute); ICI MiB = bytes the chip receives (ring factors, "
    "`moe_jax/planner.py`). Estimated step = max(FLOPs / peak, HBM bytes / HBM bandwidth) + ICI bytes / "
    "(ICI bandwidth / 2): no overlap of collectives with compute, peak rates everywhere "
    "(`moe_jax/tpu_specs.py`); MFU = model FLOPs / (step × peak). Use it to rank strategies and find the "
    "bottleneck, not as a prediction. With scanned layers XLA counts the loop body once: ≥ marks columns "
    "that cover one repeating unit (the compute term uses the model FLOPs where they are larger)."
)


def write_report(rows: list[dict], out: str, setup: dict) -> None:
    """``results.json``, ``results.md`` (table + how to read it) and ``results.png`` of a pod plan."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"setup": setup, "rows": rows}, f, indent=1)
    spec = setup["spec"]
    overrides = f" Config overrides: {', '.join(setup['overrides'])}." if setup["overrides"] else ""
    lines = [
        f"# Plan for {setup['topology']}: {setup['chips']} × {setup['device_kind']}\n",
        f"Compiled ahead of time on a CPU host (jax {setup['jax']}, libtpu {setup['libtpu']}); "
        f"nothing ran on a TPU.{overrides}",
        f"Chip: {spec['name']}, {spec['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
        f"{spec['hbm_bytes'] / 2**30:.1f} GiB HBM at {spec['hbm_bw'] / 1e9:.0f} GB/s, ICI "
        f"{spec['ici_bw_bidirectional'] / 1e9:.0f} GB/s per chip both ways ({spec['source']}).",
        "Models: " + "; ".join(_model_line(n, m, rows) for n, m in setup["models"].items()) + ".\n",
        _HOW_TO_READ + "\n",
        f"| config | strategy | mesh | HBM GiB/chip (of {spec['hbm_bytes'] / 2**30:.0f}) | fits | "
        "params+opt GiB/chip | TFLOP/chip HLO (model) | HBM GB/chip | collectives (n, MiB) | ICI MiB/chip | "
        "est. step ms (compute / HBM / ICI) | bound | est. MFU |",
        "|" + "---|" * 13,
        *(_table_row(r) for r in rows),
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(rows, setup, os.path.join(out, "results.png"))


def _plot(rows: list[dict], setup: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["config"] for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))

    def value(name, strategy, key, scale):
        row = next((r for r in rows if r["config"] == name and r["strategy"] == strategy), {})
        return row[key] * scale if key in row else float("nan")

    panels = [  # title, row key, scale, log axis
        ("HBM / chip (GiB); dashed: capacity", "peak_bytes_per_chip", 2**-30, False),
        ("est. step time (ms)", "step_s", 1e3, True),
        ("est. MFU (%)", "mfu", 100.0, False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
    width = 0.8 / max(len(names), 1)
    for ax, (title, key, scale, log) in zip(axes, panels):
        heights = []
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(strategies))]
            heights += [value(name, s, key, scale) for s in strategies]
            ax.bar(xs, heights[-len(strategies) :], width, label=name)
        ax.set_xticks(range(len(strategies)), strategies, rotation=30, fontsize=8)
        finite = [h for h in heights if h > 0 and math.isfinite(h)]
        if log and finite and max(finite) > 20 * min(finite):  # one slow row would flatten the rest
            ax.set_yscale("log")
            title += ", log scale"
        ax.set_title(title, fontsize=9)
    axes[0].axhline(setup["spec"]["hbm_bytes"] / 2**30, color="k", linestyle="--", linewidth=1)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{setup['topology']} ({setup['chips']} chips): estimates from AOT compiles", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
