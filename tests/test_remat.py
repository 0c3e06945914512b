"""Rematerialisation (``model.remat_policy``) changes memory and compute, never the loss or the gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.models import DecoderLM, ModelConfig
from moe_jax.models.blocks import REMAT_POLICIES


def _model(policy):
    cfg = ModelConfig.from_mapping(
        dict(
            vocab_size=64,
            d_model=32,
            num_heads=4,
            num_kv_heads=2,
            d_ff=48,
            num_encoder_layers=0,
            num_decoder_layers=3,
            dropout_rate=0.1,
            remat_policy=policy,
            moe=dict(num_experts=4, top_k=2, layers=(1, 2), capacity_factor=1.0, num_shared_experts=1),
        )
    )
    return DecoderLM(cfg, rngs=nnx.Rngs(0))


@functools.cache
def _loss_and_grads(policy):
    model = _model(policy)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 12)), jnp.int32)

    def loss_fn(model):
        logits, aux = model(tokens, dropout_key=jax.random.key(1), deterministic=False)
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))
        return ce + sum(a["load_balancing_loss"] for a in aux.values())

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    return float(loss), {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}


# "full" in the default suite; the other policies (~15 s each) in the slow set.
@pytest.mark.parametrize(
    "policy",
    [p if p == "full" else pytest.param(p, marks=pytest.mark.slow) for p in REMAT_POLICIES if p != "none"],
)
def test_remat_gives_the_same_loss_and_gradients(policy):
    loss0, grads0 = _loss_and_grads("none")
    loss, grads = _loss_and_grads(policy)
    assert abs(loss - loss0) <= 1e-6 * abs(loss0)
    assert sorted(grads) == sorted(grads0)
    for key, g0 in grads0.items():
        np.testing.assert_allclose(grads[key], g0, rtol=1e-5, atol=1e-7, err_msg=str(key))


@pytest.mark.slow
def test_remat_recomputes_in_the_backward_pass():
    """The compiled backward pass of 'full' holds more matmuls than 'none' (the forward is re-run)."""
    model = _model("none")
    tokens = jnp.ones((2, 12), jnp.int32)

    def dots(policy):
        m = _model(policy)
        graphdef, state = nnx.split(m)

        def loss(state):
            logits, _ = nnx.merge(graphdef, state)(tokens, dropout_key=jax.random.key(1), deterministic=False)
            return logits.sum()

        return jax.jit(jax.grad(loss)).lower(state).compile().as_text().count(" dot(")

    assert model is not None and dots("full") > dots("none")


def test_unknown_policy_is_refused():
    with pytest.raises(ConfigError, match="remat_policy='offload_everything' is unknown"):
        ModelConfig.from_mapping(dict(vocab_size=8, remat_policy="offload_everything"))


def test_remat_policy_is_settable_and_not_part_of_the_checkpoint_identity():
    """A run may resume with another policy: it changes the computation, not the model."""
    from moe_jax import config_lib
    from moe_jax.tasks.base import model_identity

    for config in (config_lib.lm_config(), config_lib.seq2seq_config()):
        assert config.model.remat_policy == "none"  # present, so --config.model.remat_policy=... parses
        config.model.remat_policy = "full"
        assert "remat_policy" not in model_identity(config.model)


def test_checkpoints_that_record_remat_policy_still_resume():
    """Checkpoints written while the policy was part of the identity record it; a run with another
    policy (or one that leaves it out) must not be refused for it, while a real model change still is."""
    from moe_jax.train.checkpoint import identity_differences

    saved = {"model": {"d_model": 32, "remat_policy": "none"}}
    assert identity_differences(saved, {"model": {"d_model": 32}}) == []
    assert identity_differences(saved, {"model": {"d_model": 32, "remat_policy": "full"}}) == []
    assert identity_differences(saved, {"model": {"d_model": 64}}) == [
        "model.d_model: 32 in the checkpoint vs 64 now"
    ]
