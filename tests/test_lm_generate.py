"""LM generation: the sampler against a NumPy reference, and KV-cache generation against recomputation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.models import DecoderLM, ModelConfig
from moe_jax.train import decode


def reference_filtered_probs(
    logits_V: np.ndarray, temperature: float, top_k: int, top_p: float
) -> np.ndarray:
    """The distribution :func:`decode.sample` draws from, in float64 with plain loops."""
    z = logits_V.astype(np.float64) / temperature
    allowed = np.ones(len(z), bool)
    if top_k:
        kth = np.sort(z)[::-1][top_k - 1]
        allowed &= z >= kth
    if top_p < 1.0:  # the nucleus of the distribution left after top-k (renormalised)
        p = np.where(allowed, np.exp(z - z.max()), 0.0)
        p /= p.sum()
        order = np.argsort(-z, kind="stable")
        mass, keep = 0.0, np.zeros(len(z), bool)
        for i in order:
            if allowed[i] and mass < top_p:
                keep[i] = True
            mass += p[i]
        allowed &= keep
    w = np.where(allowed, np.exp(z - z[allowed].max()), 0.0)
    return w / w.sum()


LOGITS_V = np.array([2.0, 1.5, 0.3, -0.2, 1.0, -1.0, 0.0, 0.7], np.float32)


def test_temperature_zero_is_argmax():
    logits_BV = jnp.asarray(np.random.default_rng(0).normal(size=(5, 11)), jnp.float32)
    got = decode.sample(logits_BV, None, temperature=0.0)
    np.testing.assert_array_equal(got, np.argmax(np.asarray(logits_BV), axis=-1))


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (1.0, 5, 0.6), (1.0, 1, 1.0)]
)
def test_sample_frequencies_match_the_filtered_softmax(temperature, top_k, top_p):
    n = 20_000
    keys = jax.random.split(jax.random.key(1), n)
    draw = jax.vmap(
        lambda k: decode.sample(
            jnp.asarray(LOGITS_V)[None], k, temperature=temperature, top_k=top_k, top_p=top_p
        )
    )
    tokens = np.asarray(draw(keys)).reshape(-1)
    freq = np.bincount(tokens, minlength=len(LOGITS_V)) / n
    expected = reference_filtered_probs(LOGITS_V, temperature, top_k, top_p)
    assert np.all(freq[expected == 0] == 0)  # never outside the kept set
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-12), (freq, expected)


def _model(**moe):
    cfg = ModelConfig.from_mapping(
        dict(
            d_model=32,
            num_heads=4,
            num_kv_heads=2,
            d_ff=64,
            num_encoder_layers=0,
            num_decoder_layers=2,
            qk_norm="head",
            tie_embeddings=False,
            logits_soft_cap=30.0,
            moe=dict(num_experts=4, top_k=2, d_ff=32, layers=(1,), capacity_factor=None, **moe),
        ),
        vocab_size=50,
    )
    model = DecoderLM(cfg, rngs=nnx.Rngs(params=0))
    model.eval()
    return model


def _prompts():
    lengths_B = np.array([5, 2, 7], np.int32)
    rng = np.random.default_rng(0)
    prompt_BL = np.zeros((3, 7), np.int32)
    for b, n in enumerate(lengths_B):
        prompt_BL[b, :n] = rng.integers(4, 50, n)
    prompt_BL[:, 0] = 2  # BOS
    return jnp.asarray(prompt_BL), jnp.asarray(lengths_B)


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0.0), pytest.param(dict(temperature=1.0, top_k=10, top_p=0.9), marks=pytest.mark.slow)],
)
def test_cached_generation_equals_recomputing_the_prefix(sampling):
    model = _model()
    graphdef, state = nnx.split(model)
    prompt_BL, lengths_B = _prompts()

    def gen(state, use_cache):
        return decode.generate(
            nnx.merge(graphdef, state),
            prompt_BL,
            lengths_B,
            max_new_tokens=24,
            eos_id=3,
            key=jax.random.key(7),
            use_cache=use_cache,
            **sampling,
        )

    cached = np.asarray(jax.jit(lambda s: gen(s, True))(state))
    recomputed = np.asarray(jax.jit(lambda s: gen(s, False))(state))
    np.testing.assert_array_equal(cached, recomputed)
    assert (cached > 0).sum() > 20  # it generated something


def test_generation_continues_the_teacher_forced_argmax():
    """Greedy tokens are the argmax of the full forward over prompt + tokens so far, at every step."""
    model = _model()
    graphdef, state = nnx.split(model)
    prompt_BL, lengths_B = _prompts()
    steps = 6
    out = np.asarray(decode.generate(model, prompt_BL, lengths_B, max_new_tokens=steps, eos_id=-1))
    L = prompt_BL.shape[1] + steps

    @jax.jit
    def last_logits(state, tokens_1L, n):
        # One fixed-length buffer, masked to its first n tokens: one compilation for every prefix.
        mask_1L = jnp.arange(L)[None] < n
        logits_1LV, _ = nnx.merge(graphdef, state)(tokens_1L, mask_BL=mask_1L)
        return logits_1LV[0, n - 1]

    for b in range(3):
        seq = list(np.asarray(prompt_BL[b, : lengths_B[b]]))
        for t in range(steps):
            tokens_1L = np.zeros((1, L), np.int32)
            tokens_1L[0, : len(seq)] = seq
            assert out[b, t] == int(np.argmax(np.asarray(last_logits(state, tokens_1L, len(seq)))))
            seq.append(int(out[b, t]))


def test_rows_stop_after_eos():
    model = _model()
    prompt_BL, lengths_B = _prompts()
    free = np.asarray(decode.generate(model, prompt_BL, lengths_B, max_new_tokens=8, eos_id=-1))
    eos = int(free[0, 2])  # make row 0's third token the EOS
    out = np.asarray(decode.generate(model, prompt_BL, lengths_B, max_new_tokens=8, eos_id=eos))
    np.testing.assert_array_equal(out[0, :3], free[0, :3])
    assert np.all(out[0, 3:] == 0)


def test_sampling_without_a_key_is_refused():
    model = _model()
    prompt_BL, lengths_B = _prompts()
    with pytest.raises(ValueError, match="key"):
        decode.generate(model, prompt_BL, lengths_B, max_new_tokens=2, eos_id=3, temperature=1.0)
