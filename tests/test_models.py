"""Transformer models: shapes, MoE placement, masking, causality, positions, dtypes, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import sharding
from moe_jax.errors import ConfigError
from moe_jax.models import DecoderLM, ModelConfig, MoeConfig, Seq2SeqTransformer, shift_right
from moe_jax.models.layers import rope

TINY_MOE = MoeConfig(num_experts=4, top_k=2, capacity_factor=None, dispatch="indices")
TINY = dict(
    vocab_size=50,
    d_model=16,
    num_heads=2,
    d_ff=32,
    num_encoder_layers=2,
    num_decoder_layers=2,
    moe=TINY_MOE,
)


def _moe(**kw) -> MoeConfig:
    return dataclasses.replace(TINY_MOE, **kw)


def run(model, *args, **kwargs):
    """Applies ``model`` under ``jax.jit`` (eager NNX calls are slow on CPU)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kwargs))(state, *args)


def _ids(key, shape, lo=4, hi=50):
    return jax.random.randint(jax.random.key(key), shape, lo, hi)


def test_seq2seq_shapes_and_moe_pattern():
    model = Seq2SeqTransformer(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    logits, aux = run(model, _ids(0, (3, 7)), _ids(1, (3, 5)))
    assert logits.shape == (3, 5, 50) and logits.dtype == jnp.float32
    # Default pattern: every other layer (the second of each pair) is MoE, the rest dense.
    assert sorted(aux) == ["decoder/layer_1", "encoder/layer_1"]
    assert aux["encoder/layer_1"]["expert_load"].shape == (4,)
    assert model.decoder.layers[1].ffn.num_experts == 4
    cfg = ModelConfig(**{**TINY, "moe": _moe(layers=(0, 1))})
    assert len(run(Seq2SeqTransformer(cfg, rngs=nnx.Rngs(0)), _ids(0, (1, 4)), _ids(1, (1, 4)))[1]) == 4
    # A dense model, and the first block dense in a deeper stack ("first N layers dense").
    dense = Seq2SeqTransformer(ModelConfig(**{**TINY, "moe": _moe(layers=())}), rngs=nnx.Rngs(0))
    assert run(dense, _ids(0, (1, 4)), _ids(1, (1, 4)))[1] == {}
    lm = DecoderLM(
        ModelConfig(**{**TINY, "num_decoder_layers": 3, "moe": _moe(layers=(1, 2))}), rngs=nnx.Rngs(0)
    )
    assert [b.use_moe for b in lm.decoder.layers] == [False, True, True]


def test_decoder_is_causal_and_padding_is_ignored():
    model = Seq2SeqTransformer(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    inputs, targets = _ids(0, (2, 6)), _ids(1, (2, 5))
    logits, _ = run(model, inputs, targets)
    # Changing the last target changes no logits (position i sees targets < i only).
    logits2, _ = run(model, inputs, targets.at[:, -1].set(7))
    np.testing.assert_allclose(logits, logits2, atol=1e-6)
    # Extra encoder padding does not change the output.
    padded = jnp.concatenate([inputs, jnp.zeros((2, 3), inputs.dtype)], axis=1)
    np.testing.assert_allclose(run(model, padded, targets)[0], logits, atol=1e-5)


def test_padding_is_not_routed():
    model = Seq2SeqTransformer(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    targets = _ids(1, (2, 6)).at[:, 3:].set(0)
    _, aux = run(model, _ids(0, (2, 6)), targets)
    # 2 rows × 3 real positions × top-2: loads are multiples of 1/12.
    load = np.asarray(aux["decoder/layer_1"]["expert_load"]) * 12
    np.testing.assert_allclose(load, np.round(load), atol=1e-5)


def test_decoder_lm_causal_and_learned_positions():
    cfg = ModelConfig(
        **{**TINY, "positions": "learned", "max_len": 16, "tie_embeddings": False, "norm": "layernorm"}
    )
    lm = DecoderLM(cfg, rngs=nnx.Rngs(0))
    tokens = _ids(2, (2, 8))
    logits, aux = run(lm, tokens)
    assert logits.shape == (2, 8, 50) and list(aux) == ["decoder/layer_1"]
    assert lm.decoder.layers[1].ffn is not None
    logits2, _ = run(lm, tokens.at[:, -1].set(5))
    np.testing.assert_allclose(logits[:, :-1], logits2[:, :-1], atol=1e-6)


def test_expert_choice_in_decoder_is_rejected():
    with pytest.raises(ConfigError, match="causal"):
        Seq2SeqTransformer(ModelConfig(**{**TINY, "moe": _moe(router="expert_choice")}), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="moe.batch_prioritized=True .*causal"):
        ModelConfig(**{**TINY, "moe": _moe(batch_prioritized=True)})
    # A decoder without MoE blocks (or an explicit opt-in) accepts them.
    ModelConfig(**{**TINY, "num_decoder_layers": 0, "moe": _moe(router="expert_choice", capacity_factor=1.0)})
    ModelConfig(**{**TINY, "moe": _moe(batch_prioritized=True, allow_noncausal_routing=True)})


def test_rope_is_relative():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
    dot = lambda a, b: float(jnp.sum(rope(q, jnp.array([[a]])) * rope(k, jnp.array([[b]]))))
    assert dot(3, 1) == pytest.approx(dot(10, 8), rel=1e-4)


def test_bfloat16_compute_float32_params():
    model = Seq2SeqTransformer(ModelConfig(**{**TINY, "dtype": "bfloat16"}), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    logits, _ = run(model, _ids(0, (2, 5)), _ids(1, (2, 5)))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_shift_right():
    np.testing.assert_array_equal(shift_right(jnp.array([[5, 6, 3, 0]]), 2), [[2, 5, 6, 3]])


def test_sharded_forward_matches_single_device():
    """Experts over a 4-way expert axis and batch over data: same logits as unsharded."""
    cfg = ModelConfig(**TINY)
    model = Seq2SeqTransformer(cfg, rngs=nnx.Rngs(0))
    inputs, targets = _ids(0, (4, 6)), _ids(1, (4, 5))
    want, _ = run(model, inputs, targets)
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    rules = sharding.preset_rules("ep")
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = sharding.shard_state(state, mesh, rules)
        w = state["decoder"]["layers"][1]["ffn"]["w_up"].get_value()
        assert w.sharding.spec[0] == "expert"
        got = jax.jit(lambda s, x, y: nnx.merge(graphdef, s)(x, y)[0])(state, inputs, targets)
    np.testing.assert_allclose(got, want, atol=1e-4)
