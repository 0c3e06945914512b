"""Workdirs as users type them (relative, ``~``, spaces, non-ASCII) and failed background saves."""

import errno
import json
import os

import pytest
from orbax.checkpoint._src.serialization import tensorstore_utils

from moe_jax.errors import CheckpointWriteError, ConfigError
from moe_jax.train import loop
from moe_jax.train.workdir import resolve_workdir
from tests.test_trainer import read_metrics, smoke_config


@pytest.mark.parametrize("typed", ["runs/translation", "~/runs/x", "a dir/with spaces", "läufe/übersetzung"])
def test_resolve_workdir_makes_any_typed_path_absolute(typed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    resolved = resolve_workdir(typed)
    assert os.path.isabs(resolved) and os.path.isdir(resolved)
    assert resolved.startswith(str(tmp_path))
    assert resolve_workdir(resolved) == resolved  # idempotent


def test_resolve_workdir_refuses_a_file_and_an_uncreatable_parent(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        resolve_workdir(tmp_path / "f")
    with pytest.raises(ConfigError, match="cannot create"):
        resolve_workdir(tmp_path / "f" / "sub")
    with pytest.raises(ConfigError, match="empty"):
        resolve_workdir("  ")


@pytest.mark.slow
def test_relative_workdir_trains_resumes_and_evaluates(tmp_path, monkeypatch):
    """The README's failure: a relative workdir (Orbax wants absolute paths) from the current directory."""
    monkeypatch.chdir(tmp_path)

    def config(steps):
        c = smoke_config(num_train_steps=steps, checkpoint_every=1, eval_every=0)
        c.eval.max_decode_examples = 0  # decoding is tested elsewhere; this is about paths
        return c

    loop.train_and_evaluate(config(2), "runs/relative ü")
    workdir = tmp_path / "runs" / "relative ü"
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    loop.train_and_evaluate(config(3), "runs/relative ü")
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3]
    loop.train_and_evaluate(config(3), "runs/relative ü", mode="eval")
    assert os.path.exists(workdir / "eval_metrics.json")


@pytest.mark.slow
def test_failed_background_save_stops_the_run_at_once(tmp_path, monkeypatch):
    """A save that fails in Orbax's writer thread ends the run at the next step with the cause named."""
    real = tensorstore_utils._build_ocdbt_kvstore_tspec

    def disk_full_at_step_4(directory, *args, **kwargs):
        if "/4.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(tensorstore_utils, "_build_ocdbt_kvstore_tspec", disk_full_at_step_4)
    workdir = tmp_path / "w"
    config = smoke_config(num_train_steps=12, checkpoint_every=2, log_every=1)
    with pytest.raises(CheckpointWriteError, match="disk full") as info:
        loop.train_and_evaluate(config, str(workdir))
    assert "last good checkpoint is step 2" in str(info.value)
    steps = [r["step"] for r in read_metrics(workdir)]
    assert steps[-1] < 8, steps  # stopped within a step or two of the failure, not at the next save
    assert "2" in os.listdir(workdir / "checkpoints")
    assert not os.path.exists(workdir / "final_metrics.json")
    with open(workdir / "metrics.jsonl") as f:
        assert all(json.loads(line) for line in f)
