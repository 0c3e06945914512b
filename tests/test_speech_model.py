"""The speech recognizer: SpecAugment in training only, padding independence, decoding, routing aux."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.models.speech import SpeechConfig, SpeechTransformer, spec_augment, subsampled_lengths
from moe_jax.tasks import speech as speech_task
from moe_jax.train import decode as decode_lib

MEL = 16


def _cfg(**kw):
    fields = dict(
        d_model=32,
        num_heads=2,
        d_ff=64,
        num_encoder_layers=1,
        num_decoder_layers=1,
        num_mel_bins=MEL,
        conv_channels=4,
        freq_mask_width=4,
        time_mask_width=8,
        moe=dict(num_experts=4, top_k=2, layers=(0,), capacity_factor=None, eval_capacity_factor=None),
    )
    fields.update(kw)
    return SpeechConfig.from_mapping(fields, vocab_size=20)


def _build(cfg):
    """The model initialised in one compiled program (eager initialisation compiles op by op: ~15 s)."""
    make = lambda: SpeechTransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


@pytest.fixture(scope="module")
def model():
    return _build(_cfg())


@functools.partial(jax.jit, static_argnums=(0, 6))
def _jit_forward(graphdef, state, feats, frames, targets, key, deterministic):
    return nnx.merge(graphdef, state)(feats, frames, targets, dropout_key=key, deterministic=deterministic)[0]


def forward(model, feats, frames, targets, *, dropout_key=None, deterministic=True):
    """The model's logits, compiled (eager op-by-op execution takes minutes on 2 cores)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jit_forward(graphdef, state, feats, frames, targets, dropout_key, deterministic))


def _batch():
    feats = jax.random.normal(jax.random.key(0), (2, 48, MEL))
    frames = jnp.array([48, 30], jnp.int32)
    feats = jnp.where(jnp.arange(48)[None, :, None] < frames[:, None, None], feats, 0.0)
    targets = jnp.array([[5, 6, 7, 8, 3, 0], [9, 10, 3, 0, 0, 0]], jnp.int32)
    return feats, frames, targets


def test_spec_augment_masks_bands_and_spans_within_the_utterance():
    x = jnp.ones((4, 100, 40))
    frames = jnp.array([100, 80, 50, 10], jnp.int32)
    kw = dict(freq_masks=2, freq_mask_width=8, time_masks=2, time_mask_width=20, time_mask_ratio=0.2)
    y = np.asarray(spec_augment(x, frames, jax.random.key(3), **kw))
    assert set(np.unique(y)) <= {0.0, 1.0}
    for b, n in enumerate(np.asarray(frames)):
        zero_bins = np.all(y[b] == 0, axis=0)  # whole mel bins masked (frequency masks)
        zero_frames = np.all(y[b] == 0, axis=1)  # whole frames masked (time masks)
        assert zero_bins.sum() <= 2 * 8
        masked_time = zero_frames & ~np.all(zero_bins)
        assert masked_time.sum() <= 2 * min(20, int(0.2 * n))
        assert not masked_time[n:].any()  # time masks stay inside the real frames
        # Everything else is untouched.
        keep = ~zero_bins[None, :] & ~zero_frames[:, None]
        assert np.all(y[b][keep] == 1.0)
    # Some masking happens at all, and the draw depends on the key.
    assert (y == 0).any()
    y2 = np.asarray(spec_augment(x, frames, jax.random.key(4), **kw))
    assert not np.array_equal(y, y2)


def test_spec_augment_only_in_training(model):
    feats, frames, targets = _batch()
    key = jax.random.key(1)
    eval_a = forward(model, feats, frames, targets, dropout_key=key)  # a key, but evaluation: no masks
    train = forward(model, feats, frames, targets, dropout_key=key, deterministic=False)
    assert np.abs(train - eval_a).max() > 1e-3
    # With masks and dropout off, training mode equals evaluation mode: the difference is SpecAugment.
    bare = _build(_cfg(freq_masks=0, time_masks=0, dropout_rate=0.0))
    a = forward(bare, feats, frames, targets, dropout_key=key)
    b = forward(bare, feats, frames, targets, dropout_key=key, deterministic=False)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_padding_frames_do_not_change_a_row(model):
    feats, frames, targets = _batch()
    junk = jnp.pad(feats, ((0, 0), (0, 16), (0, 0))).at[1, 30:].set(7.0)  # garbage past row 1's end
    a = forward(model, feats, frames, targets, dropout_key=jax.random.key(0))
    b = forward(model, junk, frames, targets, dropout_key=jax.random.key(0))
    real = np.asarray(targets) != 0  # padded target positions attend anywhere; they weigh nothing
    np.testing.assert_allclose(a[real], b[real], atol=1e-5)


def test_subsampled_lengths_and_routing_aux(model):
    np.testing.assert_array_equal(subsampled_lengths(jnp.array([48, 30, 1, 0]), 2), [12, 8, 1, 0])
    feats, frames, targets = _batch()
    out = jax.eval_shape(lambda f, n, t: model(f, n, t)[1], feats, frames, targets)
    assert set(out) == {"encoder/layer_0", "decoder/layer_0"}
    assert {"expert_load", "dropped_fraction", "router_entropy"} <= set(out["encoder/layer_0"])


def test_greedy_transcription_is_the_teacher_forced_argmax(model):
    feats, frames, _ = _batch()
    graphdef, state = nnx.split(model)
    greedy = jax.jit(
        lambda s, f, n: speech_task.greedy_transcribe(
            nnx.merge(graphdef, s), f, n, max_len=6, bos_id=2, eos_id=3
        )
    )
    rows = decode_lib.to_token_lists(greedy(state, feats, frames), 3)
    assert any(rows)
    for b, row in enumerate(rows):
        # Teacher-forcing the greedy output (padded to the decode length) reproduces each greedy choice.
        targets = np.zeros((2, 6), np.int32)
        targets[:, : len(row) + 1] = row + [3] if len(row) < 6 else row[:6]
        logits = forward(model, feats, frames, jnp.asarray(targets), dropout_key=jax.random.key(0))
        assert np.argmax(logits[b], -1).tolist()[: len(row)] == row
    beam = jax.jit(
        lambda s, f, n: speech_task.beam_transcribe(
            nnx.merge(graphdef, s), f, n, beam_size=2, max_len=6, bos_id=2, eos_id=3, alpha=0.6
        )
    )
    assert beam(state, feats, frames).shape == (2, 6)


def test_bad_speech_fields_name_the_field():
    with pytest.raises(ConfigError, match="time_mask_ratio"):
        _cfg(time_mask_ratio=1.5)
    with pytest.raises(ConfigError, match="num_mel_bins"):
        _cfg(num_mel_bins=0)


def test_error_rates_are_jiwer_percentages():
    rates = speech_task.error_rates(["open the file", ""], ["open a file", "close it"])
    # 1 substitution + 2 deletions over 5 reference words.
    assert rates["wer"] == pytest.approx(60.0)
    assert 0 < rates["cer"] <= 100


def test_ctc_term_is_in_the_training_loss_only():
    model = _build(_cfg(ctc_weight=0.3, freq_masks=0, time_masks=0, dropout_rate=0.0))
    feats, frames, targets = _batch()
    batch = {"features": feats, "num_frames": frames, "targets": targets}
    # Labels longer than the encoder frames cannot be aligned (13 labels, 8 frames in row 1).
    long_targets = jnp.asarray(np.r_[np.arange(5, 18), 3][None].repeat(2, 0).astype(np.int32))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        key = jax.random.key(0)
        ce, aux_eval = speech_task.loss_sums(m, batch, dropout_key=key, deterministic=True)
        mixed, aux_train = speech_task.loss_sums(m, batch, dropout_key=key, deterministic=False)
        enc, mask, _ = m.encode_features(feats, frames)
        return (
            ce["loss_sum"],
            mixed["loss_sum"],
            m.ctc_loss(enc, mask, targets, eos_id=3),
            m.ctc_loss(enc, mask, long_targets, eos_id=3),
            {**aux_eval, **aux_train},
        )

    ce, mixed, ctc_B, ctc_long_B, layers = run(state)
    assert set(layers) == {
        "encoder/layer_0",
        "decoder/layer_0",
    }  # the CTC entry never reaches the routing sums
    ctc_B = np.asarray(ctc_B)
    assert np.all(np.isfinite(ctc_B)) and np.all(ctc_B > 0)
    np.testing.assert_allclose(float(mixed), 0.7 * float(ce) + 0.3 * ctc_B.sum(), rtol=1e-5)
    assert np.asarray(ctc_long_B)[1] == 0.0  # an unalignable utterance contributes nothing
