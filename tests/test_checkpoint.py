"""Checkpointer: exact round trip with the Grain iterator, best-by-validation kept, corrupt steps skipped."""

import logging
import os
import shutil

import grain
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import sharding
from moe_jax.errors import ConfigError
from moe_jax.train import step as step_lib
from moe_jax.train.checkpoint import Checkpointer

MODEL = {"d_model": 4, "num_experts": 2}


class Tiny(nnx.Module):
    def __init__(self, seed):
        self.w = sharding.param(jax.random.normal(jax.random.key(seed), (4, 8)), ("embed", "mlp"))
        self.b = sharding.param(jax.numpy.zeros((8,)), ("mlp",))


def _state(seed=0):
    return step_lib.create_train_state(Tiny(seed), optax.adamw(1e-3))[1]


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=1).batch(2).to_iter_dataset())


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_data_iterator(tmp_path):
    state, it = _state(0), _iterator()
    for _ in range(3):
        next(it)
    ck = Checkpointer(str(tmp_path), keep=2)
    ck.save(3, state, config={"a": 1}, meta={"step": 3, "model": MODEL}, data_iter=it)
    ck.wait()
    expected_next = next(it)
    it2 = _iterator()
    step, restored, meta = ck.restore_latest(_state(1), None, model_config=MODEL, data_iter=it2)
    assert step == 3 and meta["step"] == 3
    _assert_same(restored, state)
    np.testing.assert_array_equal(next(it2), expected_next)
    ck.close()


def test_keeps_latest_and_best(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=2)
    for step, val in [(1, 0.5), (2, 0.9), (3, 0.8), (4, 0.7), (5, None)]:
        ck.save(step, _state(step), config={}, meta={"model": MODEL}, val_loss=val)
        ck.wait()
    assert ck.steps() == [1, 4, 5]
    ck.close()


def _corrupt(directory, step):
    step_dir = os.path.join(directory, str(step), "state")
    for name in os.listdir(step_dir):
        path = os.path.join(step_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def test_corrupt_latest_is_skipped_not_deleted(tmp_path, caplog):
    ck = Checkpointer(str(tmp_path), keep=3)
    for step in (1, 2):
        ck.save(step, _state(step), config={}, meta={"model": MODEL})
        ck.wait()
    _corrupt(str(tmp_path), 2)
    with caplog.at_level(logging.WARNING):
        step, restored, _ = ck.restore_latest(_state(0), None, model_config=MODEL)
    assert step == 1
    _assert_same(restored, _state(1))
    assert "step 2" in caplog.text and "skipping it (not deleted)" in caplog.text
    assert os.path.isdir(tmp_path / "2")
    # Saving over the unreadable step leaves it alone.
    assert not ck.save(2, _state(5), config={}, meta={"model": MODEL})
    _corrupt(str(tmp_path), 1)
    with pytest.raises(ConfigError, match="no readable checkpoint"):
        ck.restore_latest(_state(0), None, model_config=MODEL)
    ck.close()


def test_different_model_is_refused(tmp_path):
    ck = Checkpointer(str(tmp_path))
    ck.save(1, _state(), config={}, meta={"model": MODEL})
    ck.wait()
    with pytest.raises(ConfigError, match=r"different model \(model.d_model: 4 in the checkpoint vs 8 now\)"):
        ck.restore_latest(_state(), None, model_config={**MODEL, "d_model": 8})
    assert ck.steps() == [1]
    ck.close()


def test_restore_onto_a_mesh(tmp_path):
    state = _state(0)
    ck = Checkpointer(str(tmp_path))
    ck.save(1, state, config={}, meta={"model": MODEL})
    ck.wait()
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    shardings = sharding.state_shardings(state, mesh, sharding.preset_rules("ep_tp"))
    _, restored, _ = ck.restore_latest(_state(1), shardings, model_config=MODEL)
    w = restored[0]["w"].get_value()
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    # Optimizer moments follow their parameter's layout.
    mu = [v for v in jax.tree.leaves(restored[1]) if getattr(v, "shape", None) == (4, 8)]
    assert mu and all(m.sharding.spec == jax.sharding.PartitionSpec(None, "tensor") for m in mu)
    _assert_same(restored, state)
    ck.close()
