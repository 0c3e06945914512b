"""The one ``Block`` against an independent float64 NumPy reference: norms, RoPE attention, masks, FFN, MoE.

The reference is written from the math, not from the library: RMSNorm / LayerNorm from their definitions,
RoPE as a complex rotation of (first half, second half) pairs, attention one query at a time over its
allowed keys only (no mask constant), the dense FFN from the activation's formula (exact GELU via ``erf``),
and the MoE FFN as a dense loop over tokens: softmax router, the K highest probabilities (ties to the lower
expert), gates renormalised when the layer does, every chosen expert's FFN weighted by its gate (dropless:
nothing is dropped; padding is not routed).

Tolerance: the float32 Block matches the float64 reference to ``rtol=1e-5, atol=1e-5`` (the residual
stream is O(1); float32 sums of a few dozen terms), checked with ``jax_default_matmul_precision=highest``
(``conftest.py``). It is never loosened to make a test pass.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from moe_jax.models import Block, MoeConfig, causal_mask

B, L, K_ENC, D, H, F = 2, 6, 5, 16, 2, 32
DH = D // H
EPS = 1e-6  # the Norm's epsilon
TOL = dict(rtol=1e-5, atol=1e-5)


# -- the float64 reference --------------------------------------------------------------------------------


def norm_ref(x, scale, bias, kind):
    if kind == "layernorm":
        x = x - x.mean(axis=-1, keepdims=True)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * scale
    return y if bias is None else y + bias


def rope_ref(x_LHd, positions_L, max_wavelength=10_000.0):
    """Pairs (x[i], x[i + Dh/2]) as complex numbers, rotated by position · wavelength^(−i/(Dh/2))."""
    half = x_LHd.shape[-1] // 2
    theta = positions_L[:, None] * max_wavelength ** (-np.arange(half) / half)  # [L, half]
    z = (x_LHd[..., :half] + 1j * x_LHd[..., half:]) * np.exp(1j * theta)[:, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def attention_ref(x_LD, kv_KD, w, mask_LK, positions_L=None):
    q = np.einsum("ld,dhk->lhk", x_LD, w["w_q"])
    k = np.einsum("ld,dhk->lhk", kv_KD, w["w_k"])
    v = np.einsum("ld,dhk->lhk", kv_KD, w["w_v"])
    if positions_L is not None:
        q, k = rope_ref(q, positions_L), rope_ref(k, positions_L)
    out = np.zeros_like(q)
    for h in range(q.shape[1]):
        for i in range(q.shape[0]):
            keys = np.flatnonzero(mask_LK[i])
            if not len(keys):
                continue  # a padding query may see nothing; its output is unspecified (not compared)
            scores = np.array([q[i, h] @ k[j, h] for j in keys]) / math.sqrt(q.shape[-1])
            p = np.exp(scores - scores.max())
            out[i, h] = (p / p.sum()) @ v[keys, h]
    return np.einsum("lhk,hkd->ld", out, w["w_o"])


def act_ref(name, gate, up):
    silu = lambda v: v / (1.0 + np.exp(-v))
    if name == "swiglu":
        return silu(gate) * up
    assert name == "gelu"
    return 0.5 * up * (1.0 + erf(up / math.sqrt(2.0)))


def dense_ffn_ref(h_LD, w, activation):
    gate = None if w.get("w_gate") is None else h_LD @ w["w_gate"]
    return act_ref(activation, gate, h_LD @ w["w_up"]) @ w["w_down"]


def moe_ffn_ref(h_LD, w, mask_L, *, top_k, normalize_gates):
    """Dropless top-K token choice, one token at a time; returns (output, min top-K vs next score gap)."""
    E = w["router"].shape[1]
    out, gap = np.zeros_like(h_LD), np.inf
    for t in range(h_LD.shape[0]):
        if not mask_L[t]:
            continue  # padding is not routed: its routed output is zero
        logits = h_LD[t] @ w["router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = sorted(range(E), key=lambda e: (-probs[e], e))
        chosen = order[:top_k]
        if top_k < E:
            gap = min(gap, probs[order[top_k - 1]] - probs[order[top_k]])
        gates = probs[chosen] / (probs[chosen].sum() if normalize_gates else 1.0)
        for g, e in zip(gates, chosen):
            expert = {"w_gate": w["w_gate"][e], "w_up": w["w_up"][e], "w_down": w["w_down"][e]}
            out[t] += g * dense_ffn_ref(h_LD[t : t + 1], expert, "swiglu")[0]
    return out, gap


def block_ref(
    p,
    x_LD,
    *,
    norm,
    activation,
    self_mask_LL,
    positions_L,
    enc_KD=None,
    cross_mask_LK=None,
    moe=None,
    mask_L=None,
):
    """Pre-norm residual block: self-attention, optional cross-attention, dense or MoE FFN."""
    n = lambda name, v: norm_ref(v, p[name]["scale"], p[name].get("bias"), norm)
    x = x_LD + attention_ref(
        n("self_norm", x_LD), n("self_norm", x_LD), p["self_attn"], self_mask_LL, positions_L
    )
    if enc_KD is not None:
        x = x + attention_ref(n("cross_norm", x), enc_KD, p["cross_attn"], cross_mask_LK)
    h = n("ffn_norm", x)
    if moe is None:
        return x + dense_ffn_ref(h, p["ffn"], activation), h, None
    y, gap = moe_ffn_ref(h, p["ffn"], mask_L, **moe)
    return x + y, h, gap


# -- the Block under test ---------------------------------------------------------------------------------


def _params64(block):
    """Every parameter as float64 NumPy, nested like the module (``p['self_attn']['w_q']``)."""
    pure = nnx.to_pure_dict(nnx.state(block, nnx.Param))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), pure)


def _randomize_norms(block, key):
    """Scales and biases away from their 1 / 0 init, so the reference checks that they are applied."""
    for i, norm in enumerate(n for n in (block.self_norm, block.cross_norm, block.ffn_norm) if n is not None):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        norm.scale[...] = 1.0 + 0.3 * jax.random.normal(k1, norm.scale[...].shape)
        if norm.bias is not None:
            norm.bias[...] = 0.3 * jax.random.normal(k2, norm.bias[...].shape)


def _apply(block, x, **kwargs):
    graphdef, state = nnx.split(block)
    return jax.jit(lambda s, x, kw: nnx.merge(graphdef, s)(x, **kw))(state, x, kwargs)


def _inputs():
    x = np.asarray(jax.random.normal(jax.random.key(1), (B, L, D)), np.float32)
    enc = np.asarray(jax.random.normal(jax.random.key(2), (B, K_ENC, D)), np.float32)
    mask = np.ones((B, L), bool)
    mask[1, 4:] = False  # row 1: two padding positions
    enc_mask = np.ones((B, K_ENC), bool)
    enc_mask[0, 3:] = False
    positions = np.broadcast_to(np.arange(L) + 3, (B, L))  # RoPE away from position 0
    return x, enc, mask, enc_mask, positions


def test_encoder_decoder_block_matches_float64_reference():
    """Decoder block of the encoder-decoder: RMSNorm, RoPE, causal + padding mask, cross-attention, SwiGLU."""
    block = Block(
        D, H, F, causal=True, cross=True, activation="swiglu", norm="rmsnorm", use_rope=True, rngs=nnx.Rngs(0)
    )
    _randomize_norms(block, jax.random.key(7))
    x, enc, mask, enc_mask, positions = _inputs()
    self_mask = np.asarray(causal_mask(jnp.asarray(mask)))
    cross_mask = mask[:, :, None] & enc_mask[:, None, :]
    got, aux = _apply(
        block,
        x,
        attn_mask_BLL=self_mask,
        positions_BL=positions,
        mask_BL=mask,
        enc_BKD=enc,
        cross_mask_BLK=cross_mask,
    )
    assert aux is None
    p = _params64(block)
    assert set(p) == {"self_norm", "self_attn", "cross_norm", "cross_attn", "ffn_norm", "ffn"}
    for b in range(B):
        want, _, _ = block_ref(
            p,
            x[b].astype(np.float64),
            norm="rmsnorm",
            activation="swiglu",
            self_mask_LL=self_mask[b],
            positions_L=positions[b].astype(np.float64),
            enc_KD=enc[b].astype(np.float64),
            cross_mask_LK=cross_mask[b],
        )
        # Padding queries see no encoder position; only real positions have a defined output.
        np.testing.assert_allclose(np.asarray(got[b])[mask[b]], want[mask[b]], **TOL)


def test_vit_block_matches_float64_reference():
    """ViT block: LayerNorm (scale and bias), exact GELU MLP, bidirectional attention, no RoPE."""
    block = Block(D, H, F, activation="gelu", norm="layernorm", rngs=nnx.Rngs(1))
    _randomize_norms(block, jax.random.key(8))
    x, _, _, _, _ = _inputs()
    full = np.ones((B, L, L), bool)
    got, _ = _apply(block, x, attn_mask_BLL=full)
    p = _params64(block)
    assert p["ffn"].get("w_gate") is None and "bias" in p["self_norm"]
    for b in range(B):
        want, _, _ = block_ref(
            p,
            x[b].astype(np.float64),
            norm="layernorm",
            activation="gelu",
            self_mask_LL=full[b],
            positions_L=None,
        )
        np.testing.assert_allclose(np.asarray(got[b]), want, **TOL)


@pytest.mark.parametrize(
    "dispatch,top_k,normalize_gates",
    [("einsum", 2, True), ("indices", 2, True), ("grouped", 2, True), ("grouped", 1, False)],
)
def test_moe_block_matches_dense_float64_top_k(dispatch, top_k, normalize_gates):
    """MoE block, dropless: the FFN part and the whole block against a per-token dense top-K computation."""
    moe = MoeConfig(
        num_experts=4, top_k=top_k, capacity_factor=None, dispatch=dispatch, normalize_gates=normalize_gates
    )
    block = Block(
        D, H, F, moe=moe, causal=True, activation="swiglu", norm="rmsnorm", use_rope=True, rngs=nnx.Rngs(2)
    )
    _randomize_norms(block, jax.random.key(9))
    x, _, mask, _, positions = _inputs()
    self_mask = np.asarray(causal_mask(jnp.asarray(mask)))
    got, aux = _apply(block, x, attn_mask_BLL=self_mask, positions_BL=positions, mask_BL=mask)
    assert float(aux["dropped_fraction"]) == 0.0
    p = _params64(block)
    graphdef, state = nnx.split(block.ffn)
    ffn = jax.jit(lambda s, h, m: nnx.merge(graphdef, s)(h, mask_BL=m, deterministic=True)[0])
    for b in range(B):
        want, h_ref, gap = block_ref(
            p,
            x[b].astype(np.float64),
            norm="rmsnorm",
            activation="swiglu",
            self_mask_LL=self_mask[b],
            positions_L=positions[b].astype(np.float64),
            moe=dict(top_k=top_k, normalize_gates=normalize_gates),
            mask_L=mask[b],
        )
        # Routing is unambiguous in float32 (else the comparison would test rounding, not the layer).
        assert gap > 1e-4, gap
        np.testing.assert_allclose(np.asarray(got[b]), want, **TOL)
        # The FFN part alone, on the reference's normalised input.
        y = ffn(state, h_ref[None].astype(np.float32), mask[b : b + 1])
        want_ffn, _ = moe_ffn_ref(h_ref, p["ffn"], mask[b], top_k=top_k, normalize_gates=normalize_gates)
        np.testing.assert_allclose(np.asarray(y[0]), want_ffn, **TOL)
