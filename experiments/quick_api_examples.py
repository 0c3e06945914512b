"""Runs the README's "## Quick API" examples as written and records what they measure.

Three examples, the calls copied from README.md (the script first checks that README.md still shows each
of them, so the two cannot drift apart silently):

* translation: ``SparseMoeModel(task="translation", num_experts=8, top_k=2)`` on the README's two pairs,
  20 epochs; its greedy prediction for "good morning", then ``save("runs/quick")`` / ``load`` (in a
  temporary working directory: the relative path as typed) and the loaded model's prediction;
* feature classifier on scikit-learn's digits, shuffled with ``default_rng(0)``, 1,400 train / 397 test,
  4 epochs at learning rate 1e-2: once exactly as the README calls it (default ``batch_size=32``) and once
  as ``tests/test_api.py`` does (``batch_size=64``), the run the README's accuracy sentence cites;
* ViT image classifier on the same shuffled digits as ``[N, 8, 8, 1]`` images, 15 epochs, batch 64.

Writes ``results.json`` (test accuracies, train seconds, per-epoch losses, predictions, the README's stated
numbers next to the measured ones, environment) and ``log.txt`` (everything printed) into ``--out``. Run
(CPU; a minute or two)::

    python experiments/quick_api_examples.py --out experiments/results/quick_api
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The README lines this script runs (whitespace-normalised); checked against README.md before running.
README_CALLS = (
    'm = SparseMoeModel(task="translation", num_experts=8, top_k=2)',
    'history = m.train(["good morning", "thank you"], ["guten Morgen", "danke"], epochs=20, '
    "learning_rate=1e-3)",
    'm.predict(["good morning"])',
    'm.save("runs/quick"); m = SparseMoeModel.load("runs/quick")',
    'clf = SparseMoeModel(task="classification", num_experts=4, top_k=2, d_model=32, num_layers=1)',
    "clf.train(X, y, epochs=4, learning_rate=1e-2)",
    "perm = np.random.default_rng(0).permutation(len(digits.target))",
    "images, labels = digits.images[perm][..., None], digits.target[perm]",
    'vit = SparseMoeModel(task="image_classification", num_experts=4, top_k=2, d_model=32, num_layers=1)',
    "vit.train(images[:1400], labels[:1400], epochs=15, learning_rate=1e-2, batch_size=64)",
    "vit.predict(images[1400:])",
)


class _Tee:
    """Writes to the terminal and to the log file."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()

    def flush(self):
        for s in self.streams:
            s.flush()


def quick_api_section(readme_path: str) -> str:
    with open(readme_path, encoding="utf-8") as f:
        text = f.read()
    start = text.index("## Quick API")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def readme_claims(section: str) -> dict:
    """The test accuracies the section states, in order: the feature classifier's, then the ViT's."""
    stated = [float(v) / 100 for v in re.findall(r"reaches (\d+(?:\.\d+)?)% test accuracy", section)]
    if len(stated) < 2:
        raise SystemExit(
            "README.md's Quick API section no longer states two test accuracies; update this script"
        )
    return {"feature_classifier_accuracy": stated[0], "vit_accuracy": stated[1]}


def check_readme(section: str) -> None:
    """Fails unless the README's Quick API section still shows every call this script runs."""

    def norm(s: str) -> str:
        return " ".join(s.split())

    lines = {norm(line.split("  #")[0]) for line in section.splitlines()}
    missing = [call for call in README_CALLS if norm(call) not in lines]
    if missing:
        raise SystemExit(f"README.md's Quick API section no longer shows {missing}; update this script")


def translation_example() -> dict:
    from moe_jax import SparseMoeModel

    print("== translation (README example) ==", flush=True)
    m = SparseMoeModel(task="translation", num_experts=8, top_k=2)
    t0 = time.perf_counter()
    history = m.train(
        ["good morning", "thank you"], ["guten Morgen", "danke"], epochs=20, learning_rate=1e-3, verbose=True
    )
    seconds = time.perf_counter() - t0
    prediction = m.predict(["good morning"])
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as cwd:
        os.chdir(cwd)  # the README's relative path, as typed
        try:
            m.save("runs/quick")
            files = sorted(os.listdir("runs/quick"))
            m = SparseMoeModel.load("runs/quick")
            loaded_prediction = m.predict(["good morning"])
        finally:
            os.chdir(here)
    print(f"predict(['good morning']) -> {prediction}; after save/load -> {loaded_prediction}")
    print(f"train seconds {seconds:.1f}; saved files {files}", flush=True)
    return {
        "train_seconds": round(seconds, 2),
        "epochs": 20,
        "loss_first_last": [history["loss"][0], history["loss"][-1]],
        "token_accuracy_last_epoch": history["accuracy"][-1],
        "prediction_good_morning": prediction,
        "prediction_after_save_load": loaded_prediction,
        "save_load_identical": prediction == loaded_prediction,
        "saved_files": files,
    }


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    perm = np.random.default_rng(0).permutation(len(digits.target))
    return digits, perm


def feature_classifier_example(batch_size: int | None) -> dict:
    from moe_jax import SparseMoeModel

    digits, perm = _digits()
    X, y = digits.data[perm], digits.target[perm]
    label = "README call (batch_size default 32)" if batch_size is None else f"batch_size={batch_size}"
    print(f"== feature classifier on digits, 1,400 / 397, 4 epochs, {label} ==", flush=True)
    clf = SparseMoeModel(task="classification", num_experts=4, top_k=2, d_model=32, num_layers=1)
    kwargs = {} if batch_size is None else {"batch_size": batch_size}
    t0 = time.perf_counter()
    history = clf.train(X[:1400], y[:1400], epochs=4, learning_rate=1e-2, verbose=True, **kwargs)
    seconds = time.perf_counter() - t0
    accuracy = float(np.mean(clf.predict(X[1400:]) == y[1400:]))
    print(f"test accuracy {accuracy:.4f} on {len(y) - 1400}; train seconds {seconds:.1f}", flush=True)
    return {
        "batch_size": batch_size or 32,
        "epochs": 4,
        "train_seconds": round(seconds, 2),
        "test_accuracy": accuracy,
        "test_examples": int(len(y) - 1400),
        "loss_per_epoch": history["loss"],
    }


def vit_example() -> dict:
    from moe_jax import SparseMoeModel

    digits, perm = _digits()
    images, labels = digits.images[perm][..., None], digits.target[perm]
    print("== ViT image classifier on shuffled digits, 1,400 / 397, 15 epochs, batch 64 ==", flush=True)
    vit = SparseMoeModel(task="image_classification", num_experts=4, top_k=2, d_model=32, num_layers=1)
    t0 = time.perf_counter()
    history = vit.train(
        images[:1400], labels[:1400], epochs=15, learning_rate=1e-2, batch_size=64, verbose=True
    )
    seconds = time.perf_counter() - t0
    accuracy = float(np.mean(vit.predict(images[1400:]) == labels[1400:]))
    print(f"test accuracy {accuracy:.4f} on {len(labels) - 1400}; train seconds {seconds:.1f}", flush=True)
    return {
        "batch_size": 64,
        "epochs": 15,
        "train_seconds": round(seconds, 2),
        "test_accuracy": accuracy,
        "test_examples": int(len(labels) - 1400),
        "patch_size": vit._meta["patch_size"],
        "loss_per_epoch": history["loss"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "quick_api"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    section = quick_api_section(os.path.join(ROOT, "README.md"))
    check_readme(section)
    claims = readme_claims(section)
    with (
        open(os.path.join(args.out, "log.txt"), "w") as log,
        contextlib.redirect_stdout(_Tee(sys.stdout, log)),
    ):
        import jax

        env = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "devices": len(jax.devices()),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        }
        print(f"environment {env}", flush=True)
        results = {
            "translation": translation_example(),
            "feature_classifier": {
                "readme_call": feature_classifier_example(None),
                "tests_test_api_call": feature_classifier_example(64),
            },
            "vit": vit_example(),
            "readme_claims": claims,
            "environment": env,
        }
        fc = results["feature_classifier"]["tests_test_api_call"]["test_accuracy"]
        vit = results["vit"]["test_accuracy"]
        print(
            f"summary: feature classifier {fc:.1%} (README {claims['feature_classifier_accuracy']:.1%}), "
            f"README call {results['feature_classifier']['readme_call']['test_accuracy']:.1%}; "
            f"ViT {vit:.1%} (README {claims['vit_accuracy']:.1%})",
            flush=True,
        )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
