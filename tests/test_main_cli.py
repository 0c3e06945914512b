"""The command line: bad input gives one line on stderr and exit code 2, and nothing is deleted."""

import importlib.util
import os
import subprocess
import sys

import optax
import pytest
from flax import nnx

from moe_jax import sharding
from moe_jax.tasks.base import plain
from moe_jax.train import step as step_lib
from moe_jax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config=configs/translation.py:smoke", "--config.data.source=synthetic"]


def _run(args, tmp_path, devices=1):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        MOE_JAX_DATA_DIR=str(tmp_path / "data"),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    return subprocess.run(
        [sys.executable, "-m", "moe_jax.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "override,needles",
    [
        ("--config.model.num_expertz=4", ["num_expertz"]),
        ("--config.model.moe.top_k=9", ["config.model.moe.top_k=9", "num_experts=4"]),
        ("--config.optim.learning_rate=-0.1", ["config.optim.learning_rate=-0.1", "must be > 0"]),
    ],
)
def test_bad_config_values(override, needles, tmp_path):
    _assert_one_line_error(_run([*SMOKE, f"--workdir={tmp_path / 'w'}", override], tmp_path), *needles)


def test_batch_not_divisible_by_devices(tmp_path):
    proc = _run([*SMOKE, f"--workdir={tmp_path / 'w'}", "--config.train.batch_size=6"], tmp_path, devices=4)
    _assert_one_line_error(proc, "config.train.batch_size=6", "4 data-parallel devices")


def test_missing_dataset(tmp_path):
    proc = _run(["--config=configs/translation.py:wmt14_de_en", f"--workdir={tmp_path / 'w'}"], tmp_path)
    _assert_one_line_error(proc, "wmt14_translate/de-en")


def _smoke_model_dict():
    spec = importlib.util.spec_from_file_location("tr", os.path.join(ROOT, "configs", "translation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return plain(module.get_config("smoke").model)


class _Tiny(nnx.Module):
    def __init__(self):
        self.w = sharding.param(nnx.initializers.ones(None, (2, 2)), ("embed", "mlp"))


def _write_checkpoint(directory, model):
    ck = Checkpointer(str(directory))
    ck.save(4, step_lib.create_train_state(_Tiny(), optax.sgd(0.1))[1], config={}, meta={"model": model})
    ck.wait()
    ck.close()


def test_workdir_with_another_model_is_refused(tmp_path):
    model = {**_smoke_model_dict(), "d_model": 999}
    _write_checkpoint(tmp_path / "w" / "checkpoints", model)
    proc = _run([*SMOKE, f"--workdir={tmp_path / 'w'}"], tmp_path)
    _assert_one_line_error(
        proc, "different model", "model.d_model: 999 in the checkpoint vs 32 now", "--workdir"
    )
    assert os.listdir(tmp_path / "w" / "checkpoints") == ["4"]


@pytest.mark.slow
def test_unreadable_checkpoint(tmp_path):
    # Same model fields, but the saved state does not match the model: it cannot be restored.
    _write_checkpoint(tmp_path / "w" / "checkpoints", _smoke_model_dict())
    proc = _run([*SMOKE, f"--workdir={tmp_path / 'w'}"], tmp_path)
    _assert_one_line_error(proc, "no readable checkpoint")
    assert os.listdir(tmp_path / "w" / "checkpoints") == ["4"]


def test_vision_configs_go_through_the_same_command(tmp_path):
    """``moe_jax.main`` dispatches vision tasks to the vision loop, with the same one-line errors."""
    proc = _run(
        ["--config=configs/vlm.py:smoke", f"--workdir={tmp_path / 'w'}", "--config.optim.learning_rate=-1.0"],
        tmp_path,
    )
    _assert_one_line_error(proc, "config.optim.learning_rate=-1.0")
