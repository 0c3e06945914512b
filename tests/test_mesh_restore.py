"""Restore onto another mesh from the command line: 8 devices → 4 → 1 (and back) continue one run."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir, steps, devices, mesh):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    args = [
        "--config=configs/translation.py:smoke",
        "--config.data.source=synthetic",
        f"--workdir={workdir}",
        f"--config.train.num_train_steps={steps}",
        "--config.train.checkpoint_every=100",
        "--config.train.eval_every=0",
        "--config.train.batch_size=8",
        "--config.eval.batch_size=8",
        "--config.eval.max_decode_examples=0",
        # A constant learning rate, so that extending num_train_steps does not reshape the schedule.
        "--config.optim.schedule=constant",
        "--config.optim.warmup_steps=0",
        *[f"--config.sharding.mesh.{axis}={size}" for axis, size in mesh.items()],
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "moe_jax.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r.get("kind") == "train"}


@pytest.mark.slow  # five subprocess runs, ~2 min
def test_resume_on_another_mesh_continues_the_run(tmp_path):
    one = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    _cli(tmp_path / "uninterrupted", 8, 1, one)
    want = _losses(tmp_path / "uninterrupted")

    moved = tmp_path / "moved"
    _cli(moved, 2, 8, {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1})  # expert-parallel on 8 devices
    assert "resumed from checkpoint step 2" in _cli(
        moved, 4, 4, {"data": 1, "fsdp": 1, "expert": 4, "tensor": 1}
    )
    assert "resumed from checkpoint step 4" in _cli(moved, 6, 1, one)
    assert "resumed from checkpoint step 6" in _cli(
        moved, 8, 8, {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    )
    got = _losses(moved)
    assert sorted(got) == list(range(1, 9))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
