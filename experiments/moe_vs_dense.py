"""Does the sparse MoE reach a dense model's quality with less compute? Same data order, seed and steps.

Arms, all derived from one config (``--config=configs/<task>.py[:variant]``; any task with
``config.model.moe``):

* ``moe``: the config as it is;
* ``dense_active``: every MoE FFN replaced by a dense FFN of the width a token uses, K × expert width +
  shared experts: equal active FLOPs per token. When the config's dense blocks already have that width the
  model is a plain dense model (``moe.layers=()``); otherwise (e.g. the translation default, whose dense
  blocks are narrower) each MoE layer becomes a one-expert layer of that width, which is exactly a dense FFN
  (its gate is softmax over one logit, 1.0, and no token is dropped), so every other block stays as it is;
* ``dense_total`` (``--arms``): the same with the width of all experts together: equal total parameters.

For each arm it records validation loss every ``steps / --eval_points`` steps, the final validation and test
metrics, parameter counts and training FLOPs ≈ 6 · N · tokens (N = active parameters doing matmuls, the
embedding lookup excluded; attention scores are the same in every arm and left out), and reports how many
steps the MoE needed to reach the ``dense_active`` arm's final validation loss. Writes ``results.json``
(everything), ``results.md`` (table), ``curves.png`` (validation loss against steps and against training
FLOPs) and each arm's ``metrics.jsonl`` / ``final_metrics.json`` into ``--out``. Run (2 CPU cores)::

    python experiments/moe_vs_dense.py --config=configs/lm.py --steps 1500
    python experiments/moe_vs_dense.py --config=configs/translation.py --steps 2000

``--budgets=0.7[,0.8]`` adds MoE arms trained for those fractions of the steps, each with a complete
learning-rate schedule of its own length (warmup, then decay to the end). Under a decaying schedule a point
70% into the full run has not annealed yet, so "reaches the dense final at 70% of the steps" read off the
full run's curve understates an MoE that is given 70% of the steps to train; the budget arms measure that.

``--reuse=DIR`` takes an arm from an earlier run's ``DIR/results.json`` instead of training it again when
that arm's config is exactly the one this run builds (training is deterministic for a given config, data and
seed, so the result would be the same); e.g. a sweep over expert counts trains the dense arm once. The
reused arm's files stay in ``DIR/<arm>/``; ``results.json`` names that run (``reused_from``).
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARMS = ("moe", "dense_active", "dense_total")
# Task scores shown beside the losses when every arm reports them (translation BLEU, speech WER).
HEADLINE_METRICS = ("test_bleu", "test_beam_wer", "test_voice_beam_wer")


def load_config(spec: str, overrides=()):
    """``path.py[:variant]`` → its ConfigDict, with ``KEY=VALUE`` overrides (Python literals) applied."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant or "default")
    for item in overrides:
        key, _, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        section = config
        for p in parents:
            section = section[p]
        section[leaf] = value
    return config


def ffn_widths(config) -> dict[str, int]:
    """The FFN width a token uses in an MoE layer (``active``) and that of all its experts (``total``)."""
    m, moe = config.model, config.model.moe
    expert = moe.d_ff or m.d_ff
    shared = (moe.num_shared_experts or 0) * (moe.shared_d_ff or expert)
    return {"active": moe.top_k * expert + shared, "total": moe.num_experts * expert + shared}


def arm_config(base, arm: str, steps: int, eval_every: int):
    """The config of one arm (see the module docstring)."""
    c = copy.deepcopy(base)
    c.train.update(num_train_steps=steps, eval_every=eval_every, checkpoint_every=0)
    c.train.log_every = max(min(c.train.log_every, steps // 10), 1)
    c.optim.warmup_steps = min(c.optim.warmup_steps, max(steps // 10, 1))
    if arm == "moe":
        return c
    width = ffn_widths(base)["active" if arm == "dense_active" else "total"]
    moe = c.model.moe
    num_layers = max(c.model.get("num_encoder_layers", 0) or 0, c.model.get("num_decoder_layers", 0) or 0)
    moe_layers = set(range(1, num_layers, 2) if moe.layers is None else moe.layers)
    all_moe = moe_layers >= set(range(num_layers))
    if all_moe or c.model.d_ff == width:
        c.model.d_ff = width
        moe.layers = ()
    else:
        # One expert, top-1, dropless: its gate is 1.0 for every token, so the layer is a dense FFN.
        moe.update(num_experts=1, top_k=1, d_ff=width, num_shared_experts=0, capacity_factor=None)
        moe.eval_capacity_factor = None
        moe.selection_bias = False
        c.loss.update(lb_weight=0.0, z_weight=0.0)  # constant for one expert: nothing to balance
    return c


def canonical(config) -> dict:
    """A config as ``results.json`` stores it (tuples become lists), for comparing configs."""
    return json.loads(json.dumps(config if isinstance(config, dict) else config.to_dict(), default=str))


def same_training(a: dict, b: dict) -> bool:
    """Whether two canonical configs train the same model the same way.

    A model without MoE layers (``moe.layers=()``) never reads the rest of its ``moe`` section, so e.g. the
    dense arms of ``--set model.moe.num_experts=16`` and ``=32`` are the same run.
    """

    def used(c: dict) -> dict:
        c = copy.deepcopy(c)
        if c["model"]["moe"].get("layers") == []:
            c["model"]["moe"] = {"layers": []}
        return c

    return used(a) == used(b)


def budget_arm_name(fraction: float) -> str:
    """The name of the MoE arm trained for ``fraction`` of the steps (``--budgets``), e.g. ``moe_70pct``."""
    return f"moe_{100 * fraction:g}pct"


def stored_arm_config(results: dict, arm: str) -> dict | None:
    """The config an earlier run (its ``results.json`` contents) trained ``arm`` with, or None."""
    r = results["arms"].get(arm)
    if r is None or ("config" not in r and arm not in ARMS):
        return None
    if "config" in r:
        return canonical(r["config"])
    # Runs written before arms stored their config: rebuild it from the command (its first evaluation step
    # is the evaluation interval).
    s = results["summary"]
    base = load_config(s["config"], s["overrides"])
    return canonical(arm_config(base, arm, s["steps"], r["curve_steps"][0]))


def data_fingerprint(batch: dict) -> str:
    """SHA-256 of a batch's arrays (the first training batch: same tokenizer, corpus and order)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for key in sorted(batch):
        array = np.ascontiguousarray(np.asarray(batch[key]))
        digest.update(f"{key}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def reusable_arm(reuse_dir: str, arm: str, config, fingerprint: str) -> dict | None:
    """The arm's results from ``reuse_dir`` if it was trained with exactly ``config`` on the same data."""
    path = os.path.join(reuse_dir, "results.json")
    if not reuse_dir or not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    stored = stored_arm_config(results, arm)
    if stored is None or not same_training(stored, canonical(config)):
        return None
    if results["summary"].get("data_fingerprint", fingerprint) != fingerprint:
        return None
    return results["arms"][arm]


def model_size(task, config, data) -> dict[str, int]:
    """Total and active parameters, and the active ones that do matmuls (``matmul``, for FLOPs)."""
    from flax import nnx

    from moe_jax.models.counting import parameter_counts

    model = task.build_model(config, data)
    counts = parameter_counts(model)
    lookup = 0
    if not config.model.get("tie_embeddings", True):
        lookup = sum(
            v.get_value().size
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if "embed" in [str(getattr(k, "key", k)) for k in path]
        )
    counts["matmul"] = counts["active"] - lookup
    return counts


def _eval_curve(workdir: str) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            if "val_loss" in row and row.get("kind") in ("eval", "final"):
                if steps and row["step"] == steps[-1]:
                    continue
                steps.append(int(row["step"]))
                losses.append(float(row["val_loss"]))
    return steps, losses


def steps_to_reach(steps: list[int], losses: list[float], target: float) -> float | None:
    """First step at which the curve reaches ``target`` (linear between evaluations); None if never."""
    for i, (s, loss) in enumerate(zip(steps, losses)):
        if loss <= target:
            if i == 0:
                return float(s)
            s0, l0 = steps[i - 1], losses[i - 1]
            return s0 + (s - s0) * (l0 - target) / (l0 - loss)
    return None


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, r in results.items():
        steps, losses = r["curve_steps"], r["curve_val_loss"]
        flops = [s * r["train_flops_per_step"] for s in steps]
        ax1.plot(steps, losses, marker="o", ms=3, label=arm)
        ax2.plot(flops, losses, marker="o", ms=3, label=arm)
    ax1.set(xlabel="training step", ylabel="validation loss (nats/token)", title=title)
    ax2.set(
        xlabel="training FLOPs (6 · active matmul params · tokens)", ylabel="validation loss", xscale="log"
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict, summary: dict) -> str:
    has_bpb = any("val_bits_per_byte" in r["final"] for r in results.values())
    head = "| arm | params (total) | active / token | FFN width | val loss | val ppl |"
    head += " val bits/byte |" if has_bpb else ""
    head += " test loss |"
    headline = [k for k in HEADLINE_METRICS if all(k in r["final"] for r in results.values())]
    head += "".join(f" {k} |" for k in headline)
    head += " train s | s/step |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm, r in results.items():
        f = r["final"]
        row = (
            f"| {arm} | {r['params']['total']:,} | {r['params']['active']:,} | {r['ffn_width']} | "
            f"{f['val_loss']:.4f} | {f.get('val_perplexity', float('nan')):.2f} |"
        )
        row += f" {f['val_bits_per_byte']:.4f} |" if has_bpb else ""
        row += f" {f['test_loss']:.4f} |" + "".join(f" {f[k]:.2f} |" for k in headline)
        row += f" {f['train_seconds']:.0f} | {f['train_seconds'] / r['steps']:.3f} |"
        lines.append(row)
    lines.append("")
    for arm, r in results.items():
        if r.get("reused_from"):
            lines.append(
                f"The {arm} arm is the one in {r['reused_from']} (same config and data, not trained again; "
                "its train s are those of that run)."
            )
    reach = summary.get("moe_steps_to_dense_active_final")
    if reach is None:
        lines.append(
            f"The MoE did not reach the dense_active arm's final validation loss "
            f"({summary['dense_active_final_val_loss']:.4f}) within {summary['steps']} steps."
        )
    else:
        lines.append(
            f"The MoE reached the dense_active arm's final validation loss "
            f"({summary['dense_active_final_val_loss']:.4f}) at step {reach:.0f} of {summary['steps']} "
            f"({100 * reach / summary['steps']:.0f}% of the steps; the goal is <= 70%)."
        )
    for arm, budget in summary.get("budgets", {}).items():
        verdict = "reaches" if budget["reaches_dense_active_final"] else "does not reach"
        lines.append(
            f"Trained for {budget['steps']} steps with a schedule of that length ({arm}), the MoE {verdict} "
            f"the dense_active final: validation loss {budget['final_val_loss']:.4f} vs "
            f"{summary['dense_active_final_val_loss']:.4f}."
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/lm.py", help="path.py[:variant]")
    parser.add_argument("--steps", type=int, default=0, help="0: the config's num_train_steps")
    parser.add_argument("--eval_points", type=int, default=15, help="validation evaluations per arm")
    parser.add_argument("--arms", default="moe,dense_active", help=f"comma-separated, from {ARMS}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default="", help="default: experiments/results/moe_vs_dense_<config>")
    parser.add_argument("--reuse", default="", metavar="DIR", help="reuse arms of DIR/results.json")
    parser.add_argument(
        "--budgets",
        default="",
        metavar="F,...",
        help="extra MoE arms trained for these fractions of --steps, each with its own complete schedule",
    )
    args = parser.parse_args(argv)
    try:
        budgets = [float(f) for f in args.budgets.split(",") if f.strip()]
    except ValueError:
        budgets = [-1.0]
    if any(not 0.0 < f < 1.0 for f in budgets):
        parser.error(f"--budgets={args.budgets}: comma-separated fractions of --steps in (0, 1), e.g. 0.7")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or "dense_active" not in arms or "moe" not in arms:
        parser.error(f"--arms={args.arms}: needs moe and dense_active, optionally dense_total; unknown {bad}")

    from moe_jax.tasks import get_task
    from moe_jax.train import loop

    base = load_config(args.config, args.set)
    steps = args.steps or int(base.train.num_train_steps)
    eval_every = max(steps // max(args.eval_points, 1), 1)
    name = os.path.splitext(os.path.basename(args.config.partition(":")[0]))[0]
    variant = args.config.partition(":")[2]
    suffix = f"_{variant}" if variant else ""
    out = args.out or os.path.join("experiments", "results", f"moe_vs_dense_{name}{suffix}")
    os.makedirs(out, exist_ok=True)
    task = get_task(base)
    data = task.load_data(base)
    first_batch = next(data.train_iter(int(base.train.batch_size), seed=int(base.seed)))
    tokens_per_step = task.count_tokens(first_batch)
    fingerprint = data_fingerprint(first_batch)

    # (name, kind, steps): the requested arms, then one MoE arm per budget with its own complete schedule.
    budget_arms = [budget_arm_name(f) for f in budgets]
    runs = [(arm, arm, steps) for arm in arms]
    runs += [(name, "moe", round(f * steps)) for name, f in zip(budget_arms, budgets)]
    results = {}
    for arm, kind, arm_steps in runs:
        config = arm_config(base, kind, arm_steps, eval_every)
        workdir = os.path.join(out, arm)
        previous = reusable_arm(args.reuse, arm, config, fingerprint)
        if previous is not None:  # its metrics.jsonl etc. stay where they are, in the run it came from
            results[arm] = {
                **previous,
                "config": canonical(config),
                "reused_from": previous.get("reused_from") or args.reuse,
            }
            print(f"=== {arm}: the same config as in {args.reuse}; its results reused", flush=True)
            continue
        shutil.rmtree(workdir, ignore_errors=True)  # every run of the experiment starts fresh
        print(f"=== {arm}", flush=True)
        t0 = time.time()
        final = loop.train_and_evaluate(config, workdir, data=data)
        shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)  # outputs are the metrics
        params = model_size(get_task(config), config, data)
        curve_steps, curve_loss = _eval_curve(workdir)
        results[arm] = {
            "steps": arm_steps,
            "params": params,
            "ffn_width": ffn_widths(base)["active"] if kind != "dense_total" else ffn_widths(base)["total"],
            "tokens_per_step": tokens_per_step,
            "train_flops_per_step": 6.0 * params["matmul"] * tokens_per_step,
            "final": final,
            "wall_seconds": time.time() - t0,
            "curve_steps": curve_steps,
            "curve_val_loss": curve_loss,
            "config": canonical(config),
        }
        if kind == "moe":
            results[arm]["ffn_width"] = f"{base.model.moe.top_k}x{base.model.moe.d_ff or base.model.d_ff}"
    target = results["dense_active"]["final"]["val_loss"]
    reach = steps_to_reach(results["moe"]["curve_steps"], results["moe"]["curve_val_loss"], target)
    summary = {
        "config": args.config,
        "overrides": args.set,
        "steps": steps,
        "data_fingerprint": fingerprint,
        "dense_active_final_val_loss": target,
        "moe_steps_to_dense_active_final": reach,
        "moe_step_fraction": None if reach is None else reach / steps,
        "moe_minus_dense_active_final_val_loss": results["moe"]["final"]["val_loss"] - target,
        "budgets": {
            name: {
                "steps": results[name]["steps"],
                "final_val_loss": results[name]["final"]["val_loss"],
                "reaches_dense_active_final": results[name]["final"]["val_loss"] <= target,
            }
            for name in budget_arms
        },
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"summary": summary, "arms": results}, f, indent=1, default=float)
    text = table(results, summary)
    with open(os.path.join(out, "results.md"), "w") as f:
        flags = "".join(f" --set {kv}" for kv in args.set)
        flags += f" --reuse={args.reuse}" if args.reuse else ""
        flags += f" --budgets={args.budgets}" if budgets else ""
        command = f"python experiments/moe_vs_dense.py --config={args.config} --steps {steps}{flags}"
        f.write(f"`{command}`\n\n" + text)
    print(text, flush=True)
    plot(results, os.path.join(out, "curves.png"), f"{args.config}, {steps} steps")
    print(f"wrote {out}/results.json, results.md, curves.png", flush=True)
    return {"summary": summary, "arms": results}


if __name__ == "__main__":
    main()
