"""Does a sparse MoE decoder help a small vision-language model at equal active FLOPs?

Two arms on the shape-scene captioning + VQA task (``configs/vlm.py`` default), same data order, same steps,
same V-MoE vision tower:

* ``moe``: decoder FFNs in blocks 1 and 3 are MoE, 8 experts, top-2, expert width 128;
* ``dense``: every decoder FFN is a dense SwiGLU of width 256 = 2 × 128, so a token's FFN FLOPs match.

Writes into ``--workdir``: ``results.md`` (table), ``curves.png`` (validation loss and VQA exact match vs
step), ``modality_heatmap.png`` (MoE arm: decoder expert load of image vs text tokens) and each arm's run
directory. Run (CPU, a few minutes at the default 300 steps)::

    python experiments/vlm_moe_vs_dense.py --steps 300 --workdir experiments/results/vlm_moe_vs_dense
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _vlm_config():
    spec = importlib.util.spec_from_file_location("_vlm_config", os.path.join(ROOT, "configs", "vlm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("default")


def arm_config(arm: str, steps: int, eval_every: int, data_dir: str):
    c = _vlm_config()
    if data_dir:
        c.data_dir = data_dir
    if arm == "dense":
        c.model.moe.layers = ()  # dense SwiGLU of width d_ff = top_k · moe.d_ff: equal active FLOPs
        assert c.model.d_ff == c.model.moe.top_k * c.model.moe.d_ff
    c.train.update(
        num_train_steps=steps, eval_every=eval_every, checkpoint_every=0, log_every=max(steps // 10, 1)
    )
    c.optim.warmup_steps = min(c.optim.warmup_steps, max(steps // 10, 1))
    c.eval.update(max_eval_examples=100, max_decode_examples=100, decode_in_validation=True, num_samples=2)
    return c


def param_counts(config, vocab_size: int) -> tuple[int, int]:
    """(total parameters, parameters a token touches in the decoder FFNs)."""
    import jax
    from flax import nnx

    from moe_jax.models import VisionLanguageModel, VLMConfig

    cfg = VLMConfig.from_mapping(config.model.to_dict(), vocab_size=vocab_size)
    model = nnx.eval_shape(lambda: VisionLanguageModel(cfg, rngs=nnx.Rngs(params=0)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    m = config.model
    ffn_active = m.num_layers * 3 * m.d_model * m.d_ff  # SwiGLU: gate, up, down; top-2 of half width = same
    return int(total), int(ffn_active)


def _rows(workdir: str, kind: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


def plot_curves(runs: dict[str, str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, workdir in runs.items():
        evals = _rows(workdir, "eval")
        final = _rows(workdir, "final")[-1]
        steps = [r["step"] for r in evals] + [final["step"]]
        ax1.plot(steps, [r["validation_loss"] for r in evals] + [final["test_loss"]], marker="o", label=arm)
        ax2.plot(
            steps,
            [r.get("vqa_accuracy", np.nan) for r in evals] + [final["vqa_accuracy"]],
            marker="o",
            label=arm,
        )
    ax1.set(xlabel="step", ylabel="text loss (last point: test)", title="validation loss")
    ax2.set(xlabel="step", ylabel="exact match (%)", title="VQA accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval_every", type=int, default=0, help="0: steps // 4")
    parser.add_argument("--workdir", default=os.path.join("experiments", "results", "vlm_moe_vs_dense"))
    parser.add_argument("--data_dir", default="", help="default: $MOE_JAX_DATA_DIR or ~/.cache/moe_jax/data")
    args = parser.parse_args(argv)

    from moe_jax.tasks import get_task
    from moe_jax.tasks.vlm import plot_modality_load
    from moe_jax.train import loop

    eval_every = args.eval_every or max(args.steps // 4, 1)
    os.makedirs(args.workdir, exist_ok=True)
    moe_config = arm_config("moe", args.steps, eval_every, args.data_dir)
    data = get_task(moe_config).load_data(moe_config)
    runs, results = {}, {}
    for arm in ("moe", "dense"):
        config = arm_config(arm, args.steps, eval_every, args.data_dir)
        workdir = os.path.join(args.workdir, arm)
        shutil.rmtree(workdir, ignore_errors=True)  # each run of the experiment starts fresh (no resume)
        print(f"=== {arm}", flush=True)
        final = loop.train_and_evaluate(config, workdir, data=data)
        runs[arm] = workdir
        results[arm] = (final, *param_counts(config, data.tokenizer.vocab_size))

    lines = [
        f"VLM on shape scenes, {args.steps} steps, batch 64, same data order and vision tower.",
        "",
        "| decoder | params (total) | active FFN params / token | test text loss | VQA exact match (%) | "
        "caption BLEU | train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, (final, total, active) in results.items():
        lines.append(
            f"| {arm} | {total:,} | {active:,} | {final['test_loss']:.4f} | {final['vqa_accuracy']:.1f} | "
            f"{final['caption_bleu']:.1f} | {final['train_seconds']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    plot_curves(runs, os.path.join(args.workdir, "curves.png"))
    plot_modality_load(results["moe"][0], os.path.join(args.workdir, "modality_heatmap.png"))
    print(f"wrote {args.workdir}/results.md, curves.png, modality_heatmap.png", flush=True)


if __name__ == "__main__":
    main()
