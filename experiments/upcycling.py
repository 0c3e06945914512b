"""Sparse upcycling: does a dense model turned into an MoE halfway train better than staying dense?

Same data, model sizes and total steps as the MoE-vs-dense study (``configs/lm.py``; ``--steps`` total,
default 1500). Arms:

* ``dense_phase1``: ``configs/lm.py:dense`` (FFN 512 in every block) for the first half of the steps;
* ``dense_continued``: that model, trained for the second half as a dense model (a new run from its
  parameters: fresh optimizer, warm-up and decay);
* ``upcycled``: that model upcycled (``moe_jax.interop.upcycle``: 4 copies × 2 slices of width 256 on
  blocks 1-3, top-2; exactly the shape of ``configs/lm.py:default``, so active FLOPs per token are the dense
  model's) and trained for the second half with the same new-run settings;
* ``moe_scratch`` (``--arms``): ``configs/lm.py:default`` from random initialisation for all the steps.

The two second-half arms use seed + 1 for their data order (the same for both), so they do not repeat
the first half's batches. The upcycled model's step-0 validation loss equals the dense model's (checked
and recorded: ``upcycled_step0_val_loss``). Writes ``results.json``, ``results.md`` and ``curves.png``
(validation loss against total steps) into ``--out``. Run (2 CPU cores, ~35 minutes with moe_scratch)::

    python experiments/upcycling.py --steps 1500
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.moe_vs_dense import _eval_curve, arm_config, load_config, steps_to_reach  # noqa: E402

ARMS = ("dense_continued", "upcycled", "moe_scratch")
UPCYCLE = dict(num_experts=4, top_k=1, granularity=2, layers=(1, 2, 3))


def _run(config, workdir, data, keep_checkpoints=False):
    from moe_jax.train import loop

    t0 = time.time()
    final = loop.train_and_evaluate(config, workdir, data=data)
    if not keep_checkpoints:
        shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    steps, losses = _eval_curve(workdir)
    return {"final": final, "wall_seconds": time.time() - t0, "curve_steps": steps, "curve_val_loss": losses}


def _val_loss(model, config, data) -> float:
    """Validation loss of ``model`` on the run's validation batches (what the loop's evaluation reports)."""
    from flax import nnx

    from moe_jax.tasks.lm import lm_loss_sums

    total = weight = 0.0
    max_examples = int(config.eval.get("max_eval_examples", 0) or 0) or None
    forward = nnx.jit(lambda m, b: lm_loss_sums(m, b, dropout_key=None, deterministic=True)[0])
    for batch in data.eval_batches("validation", int(config.eval.batch_size), max_examples=max_examples):
        sums = forward(model, {k: v for k, v in batch.items() if not isinstance(v, list)})
        total += float(sums["loss_sum"])
        weight += float(sums["weight_sum"])
    return total / weight


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="total steps (each phase gets half)")
    parser.add_argument("--eval_points", type=int, default=15, help="validation evaluations per full run")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {ARMS}")
    parser.add_argument("--out", default=os.path.join("experiments", "results", "upcycling_lm"))
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if any(a not in ARMS for a in arms):
        parser.error(f"--arms={args.arms}: choose from {ARMS}")

    from moe_jax.interop.upcycle import upcycle
    from moe_jax.models import ModelConfig
    from moe_jax.tasks import get_task
    from moe_jax.train import init_params
    from moe_jax.train.trained import load_trained

    dense_base = load_config("configs/lm.py:dense")
    moe_base = load_config("configs/lm.py:default")
    task = get_task(dense_base)
    data = task.load_data(dense_base)
    half = args.steps // 2
    eval_every = max(args.steps // max(args.eval_points, 1), 1)
    os.makedirs(args.out, exist_ok=True)
    results = {}

    print("=== dense_phase1", flush=True)
    phase1_dir = os.path.join(args.out, "dense_phase1")
    shutil.rmtree(phase1_dir, ignore_errors=True)  # every run of the experiment starts fresh
    results["dense_phase1"] = _run(arm_config(dense_base, "moe", half, eval_every), phase1_dir, data, True)
    trained = load_trained(phase1_dir)
    shutil.rmtree(os.path.join(phase1_dir, "checkpoints"), ignore_errors=True)

    def second_half(base):
        c = arm_config(base, "moe", args.steps - half, eval_every)
        c.seed = int(base.seed) + 1
        return c

    dense_model, dense_config = trained.model, second_half(dense_base)
    up_model, _ = upcycle(dense_model, copy.deepcopy(trained.config), **UPCYCLE)
    up_config = second_half(moe_base)
    # The upcycled model has exactly configs/lm.py:default's architecture.
    want = ModelConfig.from_mapping(up_config.model.to_dict(), vocab_size=up_model.cfg.vocab_size)
    assert want == up_model.cfg, (want, up_model.cfg)
    dense_step0 = _val_loss(dense_model, dense_config, data)
    up_step0 = _val_loss(up_model, up_config, data)
    print(f"step-0 validation loss: dense {dense_step0:.6f}, upcycled {up_step0:.6f}", flush=True)

    for arm, model, config in (
        ("dense_continued", dense_model, dense_config),
        ("upcycled", up_model, up_config),
    ):
        if arm not in arms:
            continue
        print(f"=== {arm}", flush=True)
        workdir = os.path.join(args.out, arm)
        shutil.rmtree(workdir, ignore_errors=True)
        init_params.write_init_params(model, config, workdir)
        results[arm] = _run(config, workdir, data)
        results[arm]["started_from_init_params"] = True
        os.remove(os.path.join(workdir, init_params.INIT_PARAMS))
        results[arm]["curve_steps"] = [s + half for s in results[arm]["curve_steps"]]
    if "moe_scratch" in arms:
        print("=== moe_scratch", flush=True)
        scratch = arm_config(moe_base, "moe", args.steps, eval_every)
        shutil.rmtree(os.path.join(args.out, "moe_scratch"), ignore_errors=True)
        results["moe_scratch"] = _run(scratch, os.path.join(args.out, "moe_scratch"), data)

    summary = {
        "steps": args.steps,
        "phase1_steps": half,
        "upcycle": UPCYCLE,
        "dense_step0_val_loss": dense_step0,
        "upcycled_step0_val_loss": up_step0,
    }
    if "dense_continued" in results and "upcycled" in results:
        target = results["dense_continued"]["final"]["val_loss"]
        reach = steps_to_reach(
            results["upcycled"]["curve_steps"], results["upcycled"]["curve_val_loss"], target
        )
        summary["upcycled_steps_to_dense_continued_final"] = reach
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"summary": summary, "arms": results}, f, indent=1, default=float)
    lines = [
        f"`python experiments/upcycling.py --steps {args.steps}`",
        "",
        "| arm | steps (total) | val loss | val ppl | val bits/byte | test loss | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in results.items():
        f = r["final"]
        total = half if arm == "dense_phase1" else args.steps
        lines.append(
            f"| {arm} | {total} | {f['val_loss']:.4f} | {f['val_perplexity']:.2f} | "
            f"{f['val_bits_per_byte']:.4f} | {f['test_loss']:.4f} | {f['train_seconds']:.0f} |"
        )
    lines += [
        "",
        f"Step-0 validation loss of the upcycled model {up_step0:.6f} vs the dense model {dense_step0:.6f}.",
    ]
    if summary.get("upcycled_steps_to_dense_continued_final") is not None:
        lines.append(
            f"The upcycled model reached dense_continued's final validation loss at total step "
            f"{summary['upcycled_steps_to_dense_continued_final']:.0f} of {args.steps}."
        )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    _plot(results, os.path.join(args.out, "curves.png"), half)
    return {"summary": summary, "arms": results}


def _plot(results, path, half):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, r in results.items():
        ax.plot(r["curve_steps"], r["curve_val_loss"], marker="o", ms=3, label=arm)
    ax.axvline(half, color="gray", ls=":", lw=1)
    ax.set(
        xlabel="total training step", ylabel="validation loss (nats/token)", title="configs/lm.py: upcycling"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
