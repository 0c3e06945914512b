"""experiments/upcycling.py end to end on a few steps (slow set): the upcycled model starts where the dense
model stopped, and both second-half arms start from the converted parameters."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_upcycling_experiment_runs_and_upcycled_starts_at_the_dense_loss(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "experiments/upcycling.py", "--steps=6", "--arms=dense_continued,upcycled"]
    p = subprocess.run([*cmd, f"--out={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    s = results["summary"]
    assert abs(s["upcycled_step0_val_loss"] - s["dense_step0_val_loss"]) <= 1e-4 * s["dense_step0_val_loss"]
    assert set(results["arms"]) == {"dense_phase1", "dense_continued", "upcycled"}
    assert all(results["arms"][a]["started_from_init_params"] for a in ("dense_continued", "upcycled"))
    assert p.stdout.count("starting from the parameters in") == 2
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "results.md").is_file()
