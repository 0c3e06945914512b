"""End-to-end trainer tests on the synthetic reversal task (no files needed)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moe_jax.errors import ConfigError, NonFiniteLossError
from moe_jax.tasks import get_task
from moe_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, variant):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def smoke_config(**train):
    c = load_config("translation", "smoke")
    c.data.source = "synthetic"
    c.train.update(train)
    return c


def read_metrics(workdir, kind="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One 4-step smoke run shared by the tests below (compiling dominates its cost); steps 2-3 traced."""
    workdir = tmp_path_factory.mktemp("smoke")
    config = smoke_config(num_train_steps=4, profile_steps=(2, 3))
    return workdir, loop.train_and_evaluate(config, str(workdir))


def test_profile_steps_write_a_trace(smoke_run):
    workdir, _ = smoke_run
    traces = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "profile") for f in fs]
    assert any(t.endswith(".xplane.pb") for t in traces) and any(t.endswith(".trace.json.gz") for t in traces)


@pytest.mark.parametrize("value", [(3, 2), (0, 1), (1,), "2-3", (1.0, 2)])
def test_bad_profile_steps_are_refused(value):
    config = smoke_config(profile_steps=value)
    with pytest.raises(ConfigError, match="config.train.profile_steps="):
        loop.validate_config(config)


def test_smoke_run_writes_everything(smoke_run):
    workdir, final = smoke_run
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in (
        "loss",
        "learning_rate",
        "load_balancing_loss",
        "router_z_loss",
        "tokens_per_sec",
        "moe/encoder/layer_1/expert_load",
        "moe/decoder/layer_1/dropped_fraction",
        "moe/decoder/layer_1/router_entropy",
    ):
        assert key in rows[-1], key
    assert len(rows[-1]["moe/encoder/layer_1/expert_load"]) == 4
    assert [r["step"] for r in read_metrics(workdir, "eval")] == [2]
    for key in ("val_loss", "val_accuracy", "greedy_bleu", "beam_bleu"):
        assert key in final
    assert os.path.exists(workdir / "routing.png")
    assert os.listdir(workdir / "tensorboard")
    with open(workdir / "final_metrics.json") as f:
        assert json.load(f)["val_loss"] == pytest.approx(final["val_loss"])
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_different_model_in_workdir_is_refused(smoke_run):
    workdir, _ = smoke_run
    before = sorted(os.listdir(workdir / "checkpoints"))
    c = smoke_config(num_train_steps=6)
    c.model.d_model = 48
    with pytest.raises(ConfigError, match="different model.*model.d_model: 32 in the checkpoint vs 48"):
        loop.train_and_evaluate(c, str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    c = smoke_config(num_train_steps=4, checkpoint_every=1, eval_every=0)
    c.eval.max_decode_examples = 0
    c.optim.update(learning_rate=1e30, clip_norm=0.0, warmup_steps=0, schedule="constant")
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite gradient at step 2 .*last good checkpoint is step 1"
    ):
        loop.train_and_evaluate(c, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def moe_section(c):
    return c.model.moe if "moe" in c.model else c.model


def test_validation_errors():
    c = smoke_config()
    moe_section(c).top_k = moe_section(c).num_experts + 1
    with pytest.raises(ConfigError, match="top_k"):
        get_task(c).build_model(c, get_task(c).load_data(c))
    c = smoke_config()
    c.optim.learning_rate = -1.0
    with pytest.raises(ConfigError, match="learning_rate"):
        loop.validate_config(c)
    c = smoke_config(batch_size=12)  # 8 simulated devices
    with pytest.raises(ConfigError, match="batch_size=12 must be a positive multiple of the 8"):
        loop.validate_config(c)


def _cli(workdir, steps, env):
    cmd = [
        sys.executable,
        "-m",
        "moe_jax.main",
        "--config=configs/translation.py:smoke",
        f"--workdir={workdir}",
        "--config.data.source=synthetic",
        f"--config.train.num_train_steps={steps}",
        "--config.train.checkpoint_every=10",
        "--config.train.eval_every=0",
        "--config.eval.max_decode_examples=0",
        "--config.train.batch_size=4",
        "--config.eval.batch_size=4",
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


STEPS = 60


def _env(cache_dir):
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    full = _cli(root / "full", STEPS, _env(root / "jax_cache"))
    out = full.communicate(timeout=300)[0]
    assert full.returncode == 0, out[-3000:]
    return root, {r["step"]: r["loss"] for r in read_metrics(root / "full")}


@pytest.mark.slow  # two subprocess runs per signal (+ one shared): ~2 min on a shared 2-core machine
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_then_resume_matches_uninterrupted_run(sig, uninterrupted):
    """SIGKILL, SIGINT (Ctrl-C) and SIGTERM (preemption) mid-run, then a re-run: per-step losses equal an
    uninterrupted run's bit for bit. SIGINT / SIGTERM first checkpoint the current step and exit 130 / 143
    with one line; the re-run resumes from exactly that step."""
    root, expected = uninterrupted
    env = _env(root / "jax_cache")
    stopped = root / sig.name
    proc = _cli(stopped, STEPS, env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        rows = read_metrics(stopped) if (stopped / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= 25:
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    out = proc.communicate(timeout=120)[0]
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    else:
        assert proc.returncode == 128 + sig, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"interrupted by {sig.name}" in errors[0], out[-2000:]
        assert "Traceback" not in out
        saved = int(errors[0].split("checkpoint saved at step ")[1].split(";")[0])
        assert saved >= 25 and str(saved) in os.listdir(stopped / "checkpoints")
    rerun = _cli(stopped, STEPS, env)
    out = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, out[-3000:]
    assert "resumed from checkpoint step" in out
    if sig != signal.SIGKILL:
        assert f"resumed from checkpoint step {saved} " in out
    got = {r["step"]: r["loss"] for r in read_metrics(stopped)}
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected
