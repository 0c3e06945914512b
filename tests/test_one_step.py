"""The one train step for every task family: skip keeps the exact old state; router jitter advances."""

import functools
import types

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax.tasks import classification, get_task
from moe_jax.train import step as step_lib
from moe_jax.train.checkpoint import Checkpointer
from tests.test_trainer import load_config


def _family(name):
    """(task, model, batch) of a smoke config, on synthetic arrays of the task's shapes."""
    rng = np.random.default_rng(0)
    if name == "features":
        from moe_jax.models import ModelConfig, MoeConfig
        from moe_jax.models.feature_classifier import FeatureClassifier

        cfg = ModelConfig(
            vocab_size=1,
            d_model=16,
            num_heads=2,
            d_ff=32,
            num_encoder_layers=2,
            num_decoder_layers=0,
            positions="learned",
            moe=MoeConfig(num_experts=4, top_k=2),
        )
        model = FeatureClassifier(cfg, token_dim=3, num_tokens=2, num_classes=3, rngs=nnx.Rngs(0))
        x = rng.normal(size=(8, 2, 3)).astype(np.float32)
        batch = {"x": x, "y": rng.integers(0, 3, 8).astype(np.int32)}
        return types.SimpleNamespace(loss_sums=classification.feature_loss_sums), model, batch
    config = load_config(
        *{
            "seq2seq": ("translation", "smoke"),
            "image": ("image_classification", "smoke"),
            "vlm": ("vlm", "smoke"),
        }[name]
    )
    config.unlock()
    task = get_task(config)
    vocab = 40
    data = types.SimpleNamespace(tokenizer=types.SimpleNamespace(vocab_size=vocab, bos_id=2, eos_id=3))
    model = task.build_model(config, data)
    if name == "seq2seq":
        tokens = rng.integers(4, vocab, (8, 8)).astype(np.int32)
        batch = {"inputs": tokens, "targets": tokens[:, ::-1].copy()}
    elif name == "image":
        s, c = config.data.image_size, config.data.channels
        batch = {
            "image": rng.random((8, s, s, c)).astype(np.float32),
            "label": rng.integers(0, 10, 8).astype(np.int32),
        }
    else:
        s, c, t = config.data.image_size, config.data.channels, config.data.max_text_len
        text = rng.integers(4, vocab, (8, t)).astype(np.int32)
        batch = {
            "image": rng.random((8, s, s, c)).astype(np.float32),
            "text": text,
            "targets": np.roll(text, -1, axis=1),
            "token_weight": np.ones((8, t), np.float32),
        }
    return task, model, batch


# One family in the default suite; the others (20-40 s each) in the slow set.
@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) for f in ("seq2seq", "image", "vlm")] + ["features"]
)
def test_nonfinite_skip_keeps_the_exact_old_state(family):
    """A NaN loss (here through the load-balancing weight) returns the incoming state bit for bit."""
    task, model, batch = _family(family)
    graphdef, state = step_lib.create_train_state(model, optax.adam(1e-2))
    before = [np.array(x) for x in jax.tree.leaves(state)]
    kwargs = dict(loss_sums=task.loss_sums, schedule=lambda s: 1e-2, seed=0, z_weight=0.0)
    good_state, good = jax.jit(functools.partial(step_lib.train_step, graphdef, lb_weight=0.01, **kwargs))(
        state, batch
    )
    assert bool(good["finite"])
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(good_state))]
    assert any(changed), "a finite step must change the state (else this test proves nothing)"
    step = jax.jit(functools.partial(step_lib.train_step, graphdef, lb_weight=float("nan"), **kwargs))
    new_state, metrics = step(state, batch)
    assert not bool(metrics["finite"]) and not bool(metrics["loss_finite"])
    after = [np.asarray(x) for x in jax.tree.leaves(new_state)]
    assert len(after) == len(before)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_image_nan_pixels_are_skipped_too():
    task, model, batch = _family("image")
    batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    graphdef, state = step_lib.create_train_state(model, optax.adam(1e-2))
    before = [np.array(x) for x in jax.tree.leaves(state)]
    step = functools.partial(
        step_lib.train_step, graphdef, loss_sums=task.loss_sums, schedule=lambda s: 0.0, seed=0
    )
    new_state, metrics = jax.jit(step)(state, batch)
    assert not bool(metrics["finite"])
    for a, b in zip(before, jax.tree.leaves(new_state)):
        np.testing.assert_array_equal(a, np.asarray(b))


def _jitter_model():
    config = load_config("translation", "smoke")
    config.unlock()
    config.model.moe.jitter_noise = 0.3
    task = get_task(config)
    data = types.SimpleNamespace(tokenizer=types.SimpleNamespace(vocab_size=40, bos_id=2, eos_id=3))
    tokens = np.random.default_rng(0).integers(4, 40, (8, 8)).astype(np.int32)
    return task, task.build_model(config, data), {"inputs": tokens, "targets": tokens[:, ::-1].copy()}


@pytest.mark.slow
def test_router_jitter_draws_new_noise_every_step_and_resumes_exactly(tmp_path):
    """With the parameters frozen (SGD, learning rate 0) only the jitter noise can change the loss."""
    task, model, batch = _jitter_model()
    graphdef, state = step_lib.create_train_state(model, optax.sgd(0.0))
    step = jax.jit(
        functools.partial(
            step_lib.train_step,
            graphdef,
            loss_sums=task.loss_sums,
            schedule=lambda s: 0.0,
            seed=0,
            lb_weight=0.0,
        )
    )
    s1, m1 = step(state, batch)
    s2, m2 = step(s1, batch)
    assert float(m1["loss"]) != float(m2["loss"]), "the same jitter noise was drawn twice"
    # The noise is a function of the state (the jitter stream's key and count live in it): the state saved
    # after step 1 and restored through a checkpoint draws step 2's noise again.
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(1, s1, config={}, meta={})
    _, template = step_lib.create_train_state(_jitter_model()[1], optax.sgd(0.0))
    restored = ckpt.restore_latest(template, None)[1]
    ckpt.close()
    _, again = step(restored, batch)
    assert float(again["loss"]) == float(m2["loss"])
