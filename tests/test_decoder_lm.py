"""The decoder-only MoE language model against an independent float64 NumPy reference, plus packing and cache.

The reference is written from the math, not from the library: RMSNorm with its epsilon, queries/keys/values
with biases, q/k RMSNorm per head (Qwen3-MoE) or over the whole projection (OLMoE), RoPE as a complex
rotation at a non-default theta, grouped-query attention (query head h reads key/value head h // (H / N)),
attention one query at a time over its allowed keys only (causal, same document, real key: no mask
constant), the SwiGLU FFN, the MoE FFN from ``tests/moe_reference.py`` (dropless top-K), the final norm,
the tied or untied head and the logits soft cap ``cap · tanh(logits / cap)``.

Tolerances (float32 model, ``jax_default_matmul_precision=highest`` in ``conftest.py``): 1e-5 for one block
(the residual stream is O(1)), 1e-4 for the composite logits of the whole model, 1e-5 between the cached and
the full forward; never loosened to make a test pass.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.models import Block, DecoderLM, ModelConfig, MoeConfig
from moe_jax.models.transformer import document_mask, segment_positions
from tests import moe_reference

V, D, H, N, DH, F, E, TOP_K = 40, 16, 4, 2, 8, 32, 4, 2
THETA, EPS, CAP = 500.0, 1e-3, 2.0  # eps large enough that a wrong one fails the 1e-5 checks
TOL = dict(rtol=1e-5, atol=1e-5)
TOL_LOGITS = dict(rtol=1e-4, atol=1e-4)
DROPLESS = MoeConfig(num_experts=E, top_k=TOP_K, capacity_factor=None, layers=(1,))
LM = dict(
    vocab_size=V,
    d_model=D,
    num_heads=H,
    num_kv_heads=N,
    head_dim=DH,
    d_ff=F,
    num_encoder_layers=0,
    num_decoder_layers=2,
    rope_theta=THETA,
    qkv_bias=True,
    norm_eps=EPS,
    logits_soft_cap=CAP,
    moe=DROPLESS,
)
# Two packed rows: row 0 holds documents 1, 2 and a padding tail; row 1 documents 1 and 2.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2, 2]])


# -- the float64 reference --------------------------------------------------------------------------------


def rms_ref(x, scale, axes=(-1,)):
    return x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + EPS) * scale


def rope_ref(x_LHd, positions_L):
    """Pairs (x[i], x[i + Dh/2]) as complex numbers, rotated by position · theta^(−i/(Dh/2))."""
    half = x_LHd.shape[-1] // 2
    angle = positions_L[:, None] * THETA ** (-np.arange(half) / half)  # [L, half]
    z = (x_LHd[..., :half] + 1j * x_LHd[..., half:]) * np.exp(1j * angle)[:, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def attention_ref(x_LD, w, mask_LL, positions_L, qk_norm):
    q = np.einsum("ld,dhk->lhk", x_LD, w["w_q"]) + w["b_q"]
    k = np.einsum("ld,dhk->lhk", x_LD, w["w_k"]) + w["b_k"]
    v = np.einsum("ld,dhk->lhk", x_LD, w["w_v"]) + w["b_v"]
    if qk_norm != "none":
        axes = (-1,) if qk_norm == "head" else (-2, -1)
        q, k = rms_ref(q, w["q_norm"], axes), rms_ref(k, w["k_norm"], axes)
    q, k = rope_ref(q, positions_L), rope_ref(k, positions_L)
    num_q, num_kv = q.shape[1], k.shape[1]
    out = np.zeros_like(q)
    for h in range(num_q):
        n = h // (num_q // num_kv)
        for i in range(q.shape[0]):
            keys = np.flatnonzero(mask_LL[i])
            if not len(keys):
                continue  # a padding query sees nothing; its output is unspecified (not compared)
            scores = np.array([q[i, h] @ k[j, n] for j in keys]) / math.sqrt(q.shape[-1])
            p = np.exp(scores - scores.max())
            out[i, h] = (p / p.sum()) @ v[keys, n]
    return np.einsum("lhk,hkd->ld", out, w["w_o"])


def swiglu_ref(h_LD, w):
    gate, up = h_LD @ w["w_gate"], h_LD @ w["w_up"]
    return gate / (1.0 + np.exp(-gate)) * up @ w["w_down"]


def routing_gap(h_LD, router_DE, mask_L):
    """Smallest gap between a real token's K-th and (K+1)-th router probability (ambiguity check)."""
    z = h_LD[mask_L] @ router_DE
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs = np.sort(probs / probs.sum(axis=-1, keepdims=True), axis=-1)[:, ::-1]
    return float(np.min(probs[:, TOP_K - 1] - probs[:, TOP_K]))


def block_ref(p, x_LD, *, mask_LL, positions_L, mask_L, qk_norm, moe_layer=None):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)) (dense SwiGLU or dropless MoE)."""
    x = x_LD + attention_ref(
        rms_ref(x_LD, p["self_norm"]["scale"]), p["self_attn"], mask_LL, positions_L, qk_norm
    )
    h = rms_ref(x, p["ffn_norm"]["scale"])
    if moe_layer is None:
        return x + swiglu_ref(h, p["ffn"]), None
    y, metrics, _ = moe_reference.reference_forward(
        h[None],
        moe_reference.layer_params(moe_layer),
        activation="swiglu",
        mask_BL=mask_L[None],
        router="token_choice",
        top_k=TOP_K,
        capacity=None,
        normalize_gates=True,
        token_major=True,
    )
    assert metrics["dropped_fraction"] == 0.0
    return x + y[0], routing_gap(h, p["ffn"]["router"], mask_L)


def lm_ref(model, p, tokens_L, *, mask_LL, positions_L, mask_L, qk_norm, tied):
    """Embedding (× sqrt(D)), the blocks, the final norm, the head and the soft cap; returns (logits, gap)."""
    x = p["embedder"]["embed"]["table"][tokens_L] * math.sqrt(D)
    gaps = []
    for i, block in enumerate(model.decoder.layers):
        moe_layer = block.ffn if block.use_moe else None
        x, gap = block_ref(
            p["decoder"]["layers"][i],
            x,
            mask_LL=mask_LL,
            positions_L=positions_L,
            mask_L=mask_L,
            qk_norm=qk_norm,
            moe_layer=moe_layer,
        )
        gaps += [] if gap is None else [gap]
    h = rms_ref(x, p["decoder"]["final_norm"]["scale"])
    logits = h @ (p["embedder"]["embed"]["table"].T if tied else p["head"])
    return CAP * np.tanh(logits / CAP), min(gaps)


# -- helpers ----------------------------------------------------------------------------------------------


def _randomize(module, seed):
    """Norm scales, q/k norm scales and q/k/v biases away from their 1 / 0 init, so the reference checks them.

    NumPy draws: eager JAX ops would compile one small program per shape.
    """
    state = nnx.state(module, nnx.Param)
    pure = nnx.to_pure_dict(state)
    rng = np.random.default_rng(seed)

    def move(path, a):
        name = str(path[-1].key)
        if name in ("scale", "q_norm", "k_norm"):
            return (1.0 + 0.3 * rng.standard_normal(a.shape)).astype(np.float32)
        if name in ("b_q", "b_k", "b_v"):
            return (0.3 * rng.standard_normal(a.shape)).astype(np.float32)
        return a

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(move, pure))
    nnx.update(module, state)


def _params64(module):
    pure = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), pure)


@jax.jit(static_argnums=(0, 1))
def _apply(graphdef, method, state, args, kwargs):
    return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)


def _jit_call(module, method="__call__"):
    """``module.method`` under one module-level ``jax.jit``: equal configs and shapes share a compilation."""
    graphdef, state = nnx.split(module)
    return lambda *args, **kwargs: _apply(graphdef, method, state, args, kwargs)


def _document_mask_ref(segments_BL):
    """[B, L, L]: key j <= query i, same document, key not padding."""
    i, j = np.meshgrid(np.arange(segments_BL.shape[1]), np.arange(segments_BL.shape[1]), indexing="ij")
    return np.stack([(j <= i) & (seg[i] == seg[j]) & (seg[j] != 0) for seg in segments_BL])


def _segment_positions_ref(segments_BL):
    """0, 1, ... from the start of each run of equal segment ids."""
    positions = np.zeros(segments_BL.shape, np.int32)
    for b, seg in enumerate(segments_BL):
        for t in range(1, len(seg)):
            positions[b, t] = positions[b, t - 1] + 1 if seg[t] == seg[t - 1] else 0
    return positions


def _packed_inputs():
    tokens = np.random.default_rng(3).integers(1, V, SEGMENTS.shape)
    return np.where(SEGMENTS == 0, 0, tokens), _segment_positions_ref(SEGMENTS)


# -- tests ------------------------------------------------------------------------------------------------


def test_segment_positions_and_document_mask():
    np.testing.assert_array_equal(_segment_positions_ref(SEGMENTS)[0], [0, 1, 2, 0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(segment_positions(jnp.asarray(SEGMENTS)), _segment_positions_ref(SEGMENTS))
    np.testing.assert_array_equal(document_mask(jnp.asarray(SEGMENTS)), _document_mask_ref(SEGMENTS))


@pytest.mark.parametrize("qk_norm,use_moe", [("head", True), ("full", False)])
def test_block_matches_float64_reference(qk_norm, use_moe):
    """GQA (4 query heads, 2 key/value heads), q/k norm, biases, RoPE theta 500, document mask, eps 1e-5."""
    block = Block(
        D,
        H,
        F,
        head_dim=DH,
        num_kv_heads=N,
        moe=DROPLESS if use_moe else None,
        causal=True,
        use_rope=True,
        rope_theta=THETA,
        qk_norm=qk_norm,
        qkv_bias=True,
        norm_eps=EPS,
        rngs=nnx.Rngs(0),
    )
    _randomize(block, 1)
    assert block.self_attn.w_k[...].shape == (D, N, DH)
    x = np.random.default_rng(2).standard_normal(SEGMENTS.shape + (D,)).astype(np.float32)
    _, positions = _packed_inputs()
    attn_mask = _document_mask_ref(SEGMENTS)
    mask = SEGMENTS != 0
    got, aux = _jit_call(block)(x, attn_mask_BLL=attn_mask, positions_BL=positions, mask_BL=mask)
    assert (aux is not None) == use_moe
    p = _params64(block)
    for b in range(2):
        want, gap = block_ref(
            p,
            x[b].astype(np.float64),
            mask_LL=attn_mask[b],
            positions_L=positions[b].astype(np.float64),
            mask_L=mask[b],
            qk_norm=qk_norm,
            moe_layer=block.ffn if use_moe else None,
        )
        if use_moe:
            assert gap > 1e-4, gap  # routing is unambiguous in float32
        np.testing.assert_allclose(np.asarray(got[b])[mask[b]], want[mask[b]], **TOL)


@pytest.mark.parametrize("qk_norm,tied", [("head", True), ("full", False)])
def test_lm_matches_float64_reference(qk_norm, tied):
    """Two blocks (dense, then MoE) over packed documents with restarting positions; tied or untied head."""
    model = DecoderLM(ModelConfig(**{**LM, "qk_norm": qk_norm, "tie_embeddings": tied}), rngs=nnx.Rngs(4))
    _randomize(model, 5)
    assert (model.head is None) == tied and [b.use_moe for b in model.decoder.layers] == [False, True]
    tokens, positions = _packed_inputs()
    logits, aux = _jit_call(model)(tokens, segment_ids_BL=SEGMENTS, positions_BL=positions)
    assert list(aux) == ["decoder/layer_1"]
    # Padding is not routed: 16 real tokens × top-2 assignments.
    load = np.asarray(aux["decoder/layer_1"]["expert_load"]) * 2 * int((SEGMENTS != 0).sum())
    np.testing.assert_allclose(load, np.round(load), atol=1e-4)
    p = _params64(model)
    attn_mask = _document_mask_ref(SEGMENTS)
    for b in range(2):
        real = SEGMENTS[b] != 0
        want, gap = lm_ref(
            model,
            p,
            tokens[b],
            mask_LL=attn_mask[b],
            positions_L=positions[b].astype(np.float64),
            mask_L=real,
            qk_norm=qk_norm,
            tied=tied,
        )
        assert gap > 1e-4, gap
        assert np.abs(want).max() > 0.5 * CAP  # the cap bends the larger logits
        np.testing.assert_allclose(np.asarray(logits[b])[real], want[real], **TOL_LOGITS)


def test_segments_are_isolated_and_packing_equals_running_alone():
    model = DecoderLM(ModelConfig(**{**LM, "qk_norm": "head"}), rngs=nnx.Rngs(6))
    _randomize(model, 6)
    call = _jit_call(model)
    tokens, positions = _packed_inputs()
    logits, _ = call(tokens, segment_ids_BL=SEGMENTS, positions_BL=positions)
    # Other tokens in segment 1 leave segment 2 of the same row bit-identical.
    changed = np.where(SEGMENTS == 1, (tokens + 7) % (V - 1) + 1, tokens)
    logits2, _ = call(changed, segment_ids_BL=SEGMENTS, positions_BL=positions)
    seg2 = SEGMENTS == 2
    np.testing.assert_array_equal(np.asarray(logits2)[seg2], np.asarray(logits)[seg2])
    assert not np.allclose(np.asarray(logits2)[SEGMENTS == 1], np.asarray(logits)[SEGMENTS == 1])
    # Each document alone (right-padded, positions from 0) gives the packed logits; documents 1 of both
    # rows make one batch, documents 2 the other (the packed shape and signature: no new compilation).
    L = SEGMENTS.shape[1]
    for s in (1, 2):
        alone, alone_seg = np.zeros_like(tokens), np.zeros_like(SEGMENTS)
        for b in range(2):
            doc = tokens[b][SEGMENTS[b] == s]
            alone[b, : len(doc)], alone_seg[b, : len(doc)] = doc, 1
        arange = np.broadcast_to(np.arange(L), (2, L))
        alone_logits, _ = call(alone, segment_ids_BL=alone_seg, positions_BL=arange)
        for b in range(2):
            np.testing.assert_allclose(
                np.asarray(alone_logits[b])[alone_seg[b] == 1], np.asarray(logits[b])[SEGMENTS[b] == s], **TOL
            )


def test_prefill_and_decode_steps_match_full_forward_under_jit():
    """Variable prompt lengths in one batch, GQA, q/k norm, soft cap, dropless MoE; teacher-forced steps.

    Under ``jax.jit`` only (how generation runs): eagerly, every op would compile a program of its own.
    """
    model = DecoderLM(ModelConfig(**{**LM, "qk_norm": "head"}), rngs=nnx.Rngs(7))
    _randomize(model, 8)
    lengths = np.array([1, 5])
    steps, max_len = 4, 12
    total = lengths.max() + steps
    seq = np.random.default_rng(9).integers(1, V, (2, total))
    # The full forward as the packed tests call it (one document per row): their compilation serves here.
    assert seq.shape == SEGMENTS.shape
    whole = np.ones_like(SEGMENTS)
    want, _ = _jit_call(model)(seq, segment_ids_BL=whole, positions_BL=_segment_positions_ref(whole))
    prompts = np.where(np.arange(lengths.max())[None] < lengths[:, None], seq[:, : lengths.max()], 0)
    prefill, decode = _jit_call(model, "prefill"), _jit_call(model, "decode_step")
    cache = model.init_cache(2, max_len)
    assert len(cache) == 2 and cache[0]["k"].shape == (2, max_len, N, DH)
    logits, cache = prefill(prompts, lengths, cache)
    for b in range(2):
        np.testing.assert_allclose(logits[b, : lengths[b]], want[b, : lengths[b]], **TOL)
    rows = np.arange(2)
    for t in range(steps):
        pos = lengths + t
        step_logits, cache = decode(seq[rows, pos], pos, cache)
        np.testing.assert_allclose(step_logits, np.asarray(want)[rows, pos], **TOL)


def test_cached_decoding_with_multi_head_attention_and_learned_positions():
    """The other cache path: N = H (no grouping), learned positions looked up at each row's position."""
    dense = {"num_kv_heads": None, "qkv_bias": False, "logits_soft_cap": None, "moe": MoeConfig(layers=())}
    cfg = ModelConfig(**{**LM, **dense, "num_decoder_layers": 1, "positions": "learned", "max_len": 8})
    model = DecoderLM(cfg, rngs=nnx.Rngs(10))
    with pytest.raises(ValueError, match="max_len=9 exceeds"):
        model.init_cache(2, 9)
    seq = np.random.default_rng(11).integers(1, V, (2, 8))
    want, _ = _jit_call(model)(seq)
    lengths = np.array([2, 4])
    logits, cache = _jit_call(model, "prefill")(seq[:, :4], lengths, model.init_cache(2, 8))
    np.testing.assert_allclose(logits[1], want[1, :4], **TOL)
    decode = _jit_call(model, "decode_step")
    for t in range(4):
        pos = lengths + t
        step_logits, cache = decode(seq[np.arange(2), pos], pos, cache)
        np.testing.assert_allclose(step_logits, np.asarray(want)[np.arange(2), pos], **TOL)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_kv_heads", 3, "num_kv_heads=3 must divide num_heads=4"),
        ("num_kv_heads", 0, "num_kv_heads=0"),
        ("qk_norm", "rms", "qk_norm='rms' is unknown"),
        ("qkv_bias", 1, "qkv_bias=1"),
        ("rope_theta", 0.0, "rope_theta=0.0 must be"),
        ("rope_theta", -5, "rope_theta=-5 must be"),
        ("logits_soft_cap", 0.0, "logits_soft_cap=0.0 must be"),
        ("logits_soft_cap", float("inf"), "logits_soft_cap=inf must be"),
        ("norm_eps", 0.0, "norm_eps=0.0 must be"),
        ("norm_eps", -1e-6, "norm_eps=-1e-06 must be"),
    ],
)
def test_bad_config_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        ModelConfig(**{**LM, field: value})
    with pytest.raises(ConfigError, match=f"^config.model.{field}="):
        ModelConfig.from_mapping({**LM, field: value}, path="config.model")
