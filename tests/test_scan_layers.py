"""Scanned layers (``model.scan_layers``) compute the unrolled model's function: losses, gradients, aux,
generation and sharded runs agree to 1e-5 (f32), and checkpoints convert both ways bit for bit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import sharding
from moe_jax.models import DecoderLM, ModelConfig, Seq2SeqTransformer, scan
from moe_jax.tasks import seq2seq as seq2seq_task
from moe_jax.tasks.lm import lm_loss_sums
from moe_jax.train import decode, step


@pytest.mark.parametrize(
    "is_moe, layout",
    [
        ([True] * 4, (0, 1)),  # Mixtral: every block MoE
        ([False, True] * 3, (0, 2)),  # alternating dense, MoE
        ([False] * 3 + [True] * 5, (3, 1)),  # DeepSeek: first three dense
        ([False, True, True, True], (1, 1)),  # the LM default
        ([True, False, False], (1, 1)),
        ([True], (1, 0)),  # nothing repeats
    ],
)
def test_scan_layout(is_moe, layout):
    assert scan.scan_layout(is_moe) == layout


def _lm_config(**extra):
    fields = dict(
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        d_ff=64,
        num_decoder_layers=4,
        qk_norm="head",
        tie_embeddings=False,
        dropout_rate=0.1,
        moe=dict(
            num_experts=4,
            top_k=2,
            d_ff=32,
            layers=(1, 2, 3),  # one leading dense block, then three MoE blocks
            capacity_factor=None,
            selection_bias=True,
            jitter_noise=0.1,
        ),
    )
    return ModelConfig.from_mapping({**fields, **extra}, vocab_size=64)


def _lm_batch(B=4, L=16):
    rng = np.random.default_rng(0)
    seg_BL = np.repeat(np.array([[1] * 10 + [2] * 4 + [0] * 2]), B, axis=0).astype(np.int32)
    return {
        "inputs": jnp.asarray(rng.integers(1, 64, (B, L), dtype=np.int32)),
        "targets": jnp.asarray(rng.integers(1, 64, (B, L), dtype=np.int32)),
        "segment_ids": jnp.asarray(seg_BL),
        "positions": jnp.asarray(
            np.concatenate([np.arange(10), np.arange(4), np.zeros(2)])[None].repeat(B, 0)
        ),
        "token_weight": jnp.asarray((seg_BL > 0).astype(np.float32)),
    }


def _two_sgd_steps(model, batch, loss_sums):
    """Two trainer steps (SGD, lr 1: the first update is minus the gradient); returns (model, losses)."""
    graphdef, state = step.create_train_state(model, optax.sgd(1.0))
    train = jax.jit(
        functools.partial(
            step.train_step, graphdef, loss_sums=loss_sums, schedule=lambda s: 1.0, seed=3, z_weight=1e-3
        )
    )
    losses = []
    for _ in range(2):
        state, metrics = train(state, batch)
        losses.append(metrics)
    return nnx.merge(graphdef, state)[0], losses


def _assert_same_model(a, b, atol):
    flat_a, flat_b = dict(nnx.to_flat_state(nnx.state(a))), dict(nnx.to_flat_state(nnx.state(b)))
    assert flat_a.keys() == flat_b.keys()
    as_array = lambda v: np.asarray(
        jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v, np.float64
    )
    for key in flat_a:
        np.testing.assert_allclose(
            as_array(flat_a[key].get_value()),
            as_array(flat_b[key].get_value()),
            atol=atol,
            rtol=0,
            err_msg=str(key),
        )


@pytest.mark.parametrize("remat_policy", ["none", pytest.param("full", marks=pytest.mark.slow)])
def test_lm_training_steps_match_the_unrolled_model(remat_policy):
    """Dropout, router jitter, selection-bias updates and remat included: same losses, same weights."""
    unrolled = DecoderLM(_lm_config(remat_policy=remat_policy), rngs=nnx.Rngs(params=0))
    scanned = scan.to_scanned(unrolled)
    assert scanned.decoder.scanned.units == 3 and len(scanned.decoder.layers) == 1
    batch = _lm_batch()
    loss_sums = functools.partial(lm_loss_sums)
    after_unrolled, metrics_u = _two_sgd_steps(unrolled, batch, loss_sums)
    after_scanned, metrics_s = _two_sgd_steps(scanned, batch, loss_sums)
    for mu, ms in zip(metrics_u, metrics_s):
        assert mu.keys() == ms.keys()  # the same per-layer routing metrics
        for key in mu:
            np.testing.assert_allclose(
                np.asarray(ms[key]), np.asarray(mu[key]), atol=1e-5, rtol=1e-5, err_msg=key
            )
    # Weights after two updates (the gradients), selection biases and RNG counts, in the unrolled layout.
    _assert_same_model(scan.to_unscanned(after_scanned), after_unrolled, atol=1e-5)


def test_conversion_round_trip_is_exact_and_outputs_agree():
    cfg = _lm_config()
    unrolled = DecoderLM(cfg, rngs=nnx.Rngs(params=0))
    scanned = scan.to_scanned(unrolled)
    assert scanned.cfg.scan_layers and not scan.to_unscanned(scanned).cfg.scan_layers
    _assert_same_model(scan.to_unscanned(scanned), unrolled, atol=0)
    router = scanned.decoder.scanned.unit[0].ffn.router
    assert router.shape == (3, 32, 4)
    assert router.get_metadata()["out_sharding"][0] == "layers"
    batch = _lm_batch()
    forward = nnx.jit(lambda m, ids, seg: m(ids, segment_ids_BL=seg))
    logits_u, aux_u = forward(unrolled, batch["inputs"], batch["segment_ids"])
    logits_s, aux_s = forward(scanned, batch["inputs"], batch["segment_ids"])
    np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits_u), atol=1e-5, rtol=0)
    assert sorted(aux_s) == sorted(aux_u) == [f"decoder/layer_{i}" for i in range(1, 4)]


def test_a_model_built_scanned_has_the_stacked_layout():
    model = DecoderLM(_lm_config(scan_layers=True), rngs=nnx.Rngs(params=0))
    shapes = {k: v.get_value().shape for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert shapes[("decoder", "scanned", "unit", 0, "ffn", "w_up")][0] == 3
    assert not any(k[:2] == ("decoder", "layers") and k[2] > 0 for k in shapes)
    unrolled = scan.to_unscanned(model)
    assert len(unrolled.decoder.layers) == 4 and unrolled.decoder.scanned is None


def test_cached_generation_matches_the_unrolled_model():
    cfg = _lm_config(dropout_rate=0.0)
    unrolled = DecoderLM(cfg, rngs=nnx.Rngs(params=1))
    unrolled.eval()
    scanned = scan.to_scanned(unrolled)
    scanned.eval()
    prompt_BL = jnp.asarray(np.random.default_rng(1).integers(4, 64, (3, 6), dtype=np.int32))
    lengths_B = jnp.asarray([6, 3, 5], jnp.int32)

    def generate(model, use_cache):
        graphdef, state = nnx.split(model)
        fn = lambda s: decode.generate(
            nnx.merge(graphdef, s), prompt_BL, lengths_B, max_new_tokens=12, eos_id=3, use_cache=use_cache
        )
        return np.asarray(jax.jit(fn)(state))

    reference = generate(unrolled, True)
    np.testing.assert_array_equal(generate(scanned, True), reference)
    np.testing.assert_array_equal(generate(scanned, False), reference)
    cache = scanned.init_cache(3, 20)
    assert len(cache) == 2 and cache[1]["k"].shape == (3, 3, 20, 2, 8)  # one unrolled, one stacked
    logits_u, _ = unrolled.prefill(prompt_BL, lengths_B, unrolled.init_cache(3, 20))
    logits_s, _ = scanned.prefill(prompt_BL, lengths_B, cache)
    np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits_u), atol=1e-5, rtol=0)


def test_seq2seq_alternating_layers_match():
    cfg = ModelConfig.from_mapping(
        dict(
            d_model=32,
            num_heads=4,
            d_ff=64,
            num_encoder_layers=4,
            num_decoder_layers=4,
            moe=dict(num_experts=4, top_k=2, d_ff=32, layers=None),  # blocks 1 and 3: period 2
        ),
        vocab_size=40,
    )
    unrolled = Seq2SeqTransformer(cfg, bos_id=2, rngs=nnx.Rngs(params=0))
    scanned = scan.to_scanned(unrolled)
    assert scanned.encoder.scanned.period == 2 and scanned.decoder.scanned.units == 2
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.integers(3, 40, (4, 8), dtype=np.int32)) for k in ("inputs", "targets")}
    after_u, metrics_u = _two_sgd_steps(unrolled, batch, seq2seq_task.loss_sums)
    after_s, metrics_s = _two_sgd_steps(scanned, batch, seq2seq_task.loss_sums)
    for mu, ms in zip(metrics_u, metrics_s):
        np.testing.assert_allclose(float(ms["loss"]), float(mu["loss"]), atol=1e-5, rtol=1e-5)
    _assert_same_model(scan.to_unscanned(after_s), after_u, atol=1e-5)


@pytest.mark.parametrize("preset, mesh_shape", [("ep", {"data": 2, "expert": 4}), ("fsdp", {"fsdp": 8})])
def test_sharded_scanned_model_matches_one_device(preset, mesh_shape):
    cfg = _lm_config(dropout_rate=0.0, scan_layers=True)
    batch = _lm_batch(B=8)
    model = DecoderLM(cfg, rngs=nnx.Rngs(params=0))
    model.eval()
    graphdef, state = nnx.split(model)
    forward = lambda s, ids, seg: nnx.merge(graphdef, s)(ids, segment_ids_BL=seg)[0]
    reference = np.asarray(jax.jit(forward)(state, batch["inputs"], batch["segment_ids"]))
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.preset_rules(preset)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state_sh = sharding.state_shardings(state, mesh, rules)
        sharded = jax.device_put(state, state_sh)
        logits = jax.jit(forward)(sharded, batch["inputs"], batch["segment_ids"])
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5, rtol=0)


def test_scanned_model_exports_to_hugging_face_per_layer(tmp_path):
    """A scanned model writes the same per-layer tensors as the unrolled one it came from."""
    import os

    from safetensors.numpy import load_file

    from moe_jax.interop import hf

    src = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "mixtral")
    model, config = hf.load(src)
    scanned = scan.to_scanned(model)
    assert scanned.decoder.scanned is not None
    hf.save(scanned, config, str(tmp_path / "out"))
    written, original = (
        load_file(str(tmp_path / "out" / "model.safetensors")),
        load_file(os.path.join(src, "model.safetensors")),
    )
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
