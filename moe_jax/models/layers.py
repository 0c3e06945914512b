"""Transformer building blocks in Flax NNX: norms, embeddings, RoPE, attention, dense FFN.

Shape letters are those of ``moe_jax/moe/__init__.py`` (B batch, L length, D d_model, F d_ff, H heads,
V vocab) plus, in attention, K for the key/value length, M for the KV-cache length, Dh for the head width,
N for the key/value heads (N = H without grouped-query attention) and R = H / N query heads per key/value
head.

Parameters carry logical axis names through :func:`moe_jax.sharding.param`; activations are constrained
with :func:`moe_jax.sharding.constrain` (a no-op outside a mesh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding
from moe_jax.moe import experts as experts_lib

_ACT_BLD = ("act_batch", "act_length", "act_embed")


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when ``rate`` is 0 or ``key`` is None (evaluation)."""
    if rate <= 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last dim, computed in float32, output in ``dtype``."""

    def __init__(
        self,
        dim: int,
        kind: str = "rmsnorm",
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        eps: float = 1e-6,
    ):
        if kind not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm={kind!r} is unknown; choose 'rmsnorm' or 'layernorm'")
        self.kind, self.eps, self.dtype = kind, eps, dtype
        self.scale = sharding.param(jnp.ones((dim,), param_dtype), ("embed",))
        self.bias = (
            sharding.param(jnp.zeros((dim,), param_dtype), ("embed",)) if kind == "layernorm" else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table [V, D]; ``attend`` gives tied output logits.

    Lookups are multiplied by sqrt(D) when ``scale`` (the project's default, as in T5X / Gemma), not at all
    otherwise (Llama, Mixtral, OLMoE, Qwen: what Hugging Face checkpoints expect).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        scale: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.d_model, self.dtype, self.scale = d_model, dtype, scale
        # std 1/sqrt(D) so that tied logits start near unit scale; lookups are rescaled by sqrt(D).
        init = nnx.initializers.normal(stddev=d_model**-0.5)
        self.table = sharding.param(
            init(rngs.params(), (vocab_size, d_model), param_dtype), ("vocab", "embed")
        )

    def __call__(self, ids_BL: jax.Array) -> jax.Array:
        # Gathered like a weight (fsdp shards ``embed``) before the lookup: gathering rows of a D-sharded
        # table gives D-sharded rows, and their gradient would have to go from batch- to D-sharded through
        # a full replica (GSPMD's "involuntary full rematerialization").
        table_VD = sharding.constrain(self.table[...], ("vocab", "act_embed"))
        x_BLD = jnp.take(table_VD, ids_BL, axis=0).astype(self.dtype)
        return x_BLD * jnp.asarray(self.d_model**0.5, self.dtype) if self.scale else x_BLD

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        """Logits in float32 against the (tied) table."""
        return jnp.einsum(
            "bld,vd->blv", x_BLD, self.table[...].astype(self.dtype), preferred_element_type=jnp.float32
        )


def rope(x_BLHd: jax.Array, positions_BL: jax.Array, max_wavelength: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (rotate-half form) on the last dim, computed in float32.

    ``max_wavelength`` is RoPE's theta (10,000 in the original paper; 500,000 in Llama 3, 1,000,000 in
    Qwen3-MoE): pair i of the head is rotated by ``position · theta^(−i / (Dh/2))``.
    """
    dh = x_BLHd.shape[-1]
    half = dh // 2
    freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BLh = positions_BL.astype(jnp.float32)[..., None] * freq
    sin, cos = jnp.sin(angle_BLh)[:, :, None, :], jnp.cos(angle_BLh)[:, :, None, :]
    x = x_BLHd.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHd.dtype)


def _rms_norm(x: jax.Array, scale: nnx.Param, eps: float, axes: tuple[int, ...]) -> jax.Array:
    """RMSNorm of ``x`` over ``axes`` with a learned ``scale``, in float32, output in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + eps)
    return (y * scale[...].astype(jnp.float32)).astype(x.dtype)


def write_cache(cache_BMNd: jax.Array, new_BKNd: jax.Array, positions_BK: jax.Array) -> jax.Array:
    """Writes each row's new keys (or values) at its own positions of a [B, M, N, Dh] cache.

    Rows differ in where they write (prompts of different lengths), hence a scatter rather than one
    ``dynamic_update_slice``; positions at or past M are dropped.
    """
    rows_B1 = jnp.arange(cache_BMNd.shape[0])[:, None]
    return cache_BMNd.at[rows_B1, positions_BK].set(new_BKNd.astype(cache_BMNd.dtype), mode="drop")


QK_NORMS = ("none", "head", "full")


class Attention(nnx.Module):
    """Multi-head attention (self or cross), optional RoPE on queries and keys; softmax in float32.

    Grouped-query attention when ``num_kv_heads`` < ``num_heads``: query head h reads key/value head
    ``h // (num_heads / num_kv_heads)`` (the Hugging Face ``repeat_kv`` layout). Optional q/k RMSNorm before
    RoPE: ``"head"`` normalises each head's Dh (scale [Dh], Qwen3-MoE), ``"full"`` the whole projection
    H·Dh of q and N·Dh of k (scales [H, Dh] and [N, Dh], OLMoE). Optional q/k/v biases (Qwen2).

    Args:
        d_model, num_heads, head_dim: widths (``head_dim`` defaults to ``d_model // num_heads``).
        num_kv_heads: N key/value heads; ``None`` is ``num_heads``. Must divide ``num_heads``.
        use_rope: rotary positions on queries and keys.
        rope_theta: RoPE's maximum wavelength.
        qk_norm: ``"none"``, ``"head"`` or ``"full"``.
        qkv_bias: biases on the q, k and v projections.
        norm_eps: epsilon of the q/k norms.
        dtype, param_dtype: compute and parameter dtypes.
        rngs: initialisation randomness (q, k, v, o are drawn in that order; biases and norms draw nothing).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        num_kv_heads: int | None = None,
        use_rope: bool = False,
        rope_theta: float = 10_000.0,
        qk_norm: str = "none",
        qkv_bias: bool = False,
        norm_eps: float = 1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(
                    f"d_model={d_model} must be divisible by num_heads={num_heads} (or set head_dim)"
                )
            head_dim = d_model // num_heads
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r} is unknown; choose one of {QK_NORMS}")
        self.num_heads, self.head_dim, self.use_rope, self.dtype = num_heads, head_dim, use_rope, dtype
        self.num_kv_heads, self.rope_theta, self.norm_eps = num_kv_heads, float(rope_theta), norm_eps
        self.qk_norm = qk_norm
        init = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
        )
        init_o = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
        )
        q_shape, q_axes = (d_model, num_heads, head_dim), ("embed", "heads", "kv")
        kv_shape, kv_axes = (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "kv")
        self.w_q = sharding.param(init(rngs.params(), q_shape, param_dtype), q_axes)
        self.w_k = sharding.param(init(rngs.params(), kv_shape, param_dtype), kv_axes)
        self.w_v = sharding.param(init(rngs.params(), kv_shape, param_dtype), kv_axes)
        self.w_o = sharding.param(
            init_o(rngs.params(), (num_heads, head_dim, d_model), param_dtype), ("heads", "kv", "embed")
        )
        # The optional parameters draw no randomness, so a model without them initialises as before.
        zeros = lambda shape, axes: sharding.param(jnp.zeros(shape, param_dtype), axes)
        ones = lambda shape, axes: sharding.param(jnp.ones(shape, param_dtype), axes)
        if qkv_bias:
            self.b_q = zeros(q_shape[1:], q_axes[1:])
            self.b_k = zeros(kv_shape[1:], kv_axes[1:])
            self.b_v = zeros(kv_shape[1:], kv_axes[1:])
        else:
            self.b_q = self.b_k = self.b_v = None
        if qk_norm == "head":
            self.q_norm, self.k_norm = ones((head_dim,), ("kv",)), ones((head_dim,), ("kv",))
        elif qk_norm == "full":
            self.q_norm, self.k_norm = ones(q_shape[1:], q_axes[1:]), ones(kv_shape[1:], kv_axes[1:])
        else:
            self.q_norm = self.k_norm = None

    def __call__(
        self,
        x_BLD: jax.Array,
        kv_BKD: jax.Array,
        mask_BLK: jax.Array,
        *,
        positions_BL: jax.Array | None = None,
        positions_BK: jax.Array | None = None,
        cache: dict[str, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Attends from ``x_BLD`` to ``kv_BKD``; ``mask_BLK`` is True where attention is allowed.

        Args:
            x_BLD: queries' input.
            kv_BKD: keys' and values' input (``x_BLD`` for self-attention).
            mask_BLK: True where query i may attend key j; with a cache, K is the cache length M.
            positions_BL, positions_BK: RoPE positions of queries and keys; with a cache, ``positions_BK``
                also says where the new keys and values are written.
            cache: ``{"k", "v"}`` of shape [B, M, N, Dh] (self-attention): the new keys and values
                (after the k norm and RoPE) are written at ``positions_BK`` and the queries attend to the
                whole updated cache under ``mask_BLK``.

        Returns:
            ``y_BLD``, or ``(y_BLD, new_cache)`` when a cache is given.
        """
        cast = lambda p: p[...].astype(self.dtype)
        q_BLHd = jnp.einsum("bld,dhk->blhk", x_BLD.astype(self.dtype), cast(self.w_q))
        k_BKNd = jnp.einsum("bld,dhk->blhk", kv_BKD.astype(self.dtype), cast(self.w_k))
        v_BKNd = jnp.einsum("bld,dhk->blhk", kv_BKD.astype(self.dtype), cast(self.w_v))
        if self.b_q is not None:
            q_BLHd, k_BKNd, v_BKNd = q_BLHd + cast(self.b_q), k_BKNd + cast(self.b_k), v_BKNd + cast(self.b_v)
        if self.q_norm is not None:
            axes = (-1,) if self.qk_norm == "head" else (-2, -1)
            q_BLHd = _rms_norm(q_BLHd, self.q_norm, self.norm_eps, axes)
            k_BKNd = _rms_norm(k_BKNd, self.k_norm, self.norm_eps, axes)
        if self.use_rope:
            q_BLHd = rope(q_BLHd, positions_BL, self.rope_theta)
            k_BKNd = rope(k_BKNd, positions_BK, self.rope_theta)
        new_cache = None
        if cache is not None:
            if positions_BK is None:
                raise ValueError("attention with a KV cache needs positions_BK (where to write the new keys)")
            k_BKNd = write_cache(cache["k"], k_BKNd, positions_BK)
            v_BKNd = write_cache(cache["v"], v_BKNd, positions_BK)
            new_cache = {"k": k_BKNd, "v": v_BKNd}
            k_BKNd, v_BKNd = k_BKNd.astype(self.dtype), v_BKNd.astype(self.dtype)
        q_BLHd = q_BLHd * jnp.asarray(self.head_dim**-0.5, self.dtype)
        if self.num_kv_heads == self.num_heads:
            logits_BHLK = jnp.einsum("blhk,bmhk->bhlm", q_BLHd, k_BKNd, preferred_element_type=jnp.float32)
            logits_BHLK = jnp.where(mask_BLK[:, None], logits_BHLK, jnp.finfo(jnp.float32).min)
            probs_BHLK = jax.nn.softmax(logits_BHLK, axis=-1).astype(self.dtype)
            out_BLHd = jnp.einsum("bhlm,bmhk->blhk", probs_BHLK, v_BKNd)
        else:
            out_BLHd = self._grouped_attend(q_BLHd, k_BKNd, v_BKNd, mask_BLK)
        y_BLD = jnp.einsum("blhk,hkd->bld", out_BLHd, cast(self.w_o))
        y_BLD = sharding.constrain(y_BLD, _ACT_BLD)
        return y_BLD if cache is None else (y_BLD, new_cache)

    def _grouped_attend(self, q_BLHd, k_BKNd, v_BKNd, mask_BLK):
        """Grouped-query attention without repeating keys and values: the R query heads of a key/value
        head share one contraction."""
        B, L, H, Dh = q_BLHd.shape
        N = self.num_kv_heads
        q_BLNRd = q_BLHd.reshape(B, L, N, H // N, Dh)
        logits_BNRLK = jnp.einsum("blnrk,bmnk->bnrlm", q_BLNRd, k_BKNd, preferred_element_type=jnp.float32)
        logits_BNRLK = jnp.where(mask_BLK[:, None, None], logits_BNRLK, jnp.finfo(jnp.float32).min)
        probs_BNRLK = jax.nn.softmax(logits_BNRLK, axis=-1).astype(self.dtype)
        out_BLNRd = jnp.einsum("bnrlm,bmnk->blnrk", probs_BNRLK, v_BKNd)
        return out_BLNRd.reshape(B, L, H, Dh)


class DenseFFN(nnx.Module):
    """Dense feed-forward layer with the same activations as the experts (SwiGLU by default)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str = "swiglu",
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _, gated = experts_lib.check_activation(activation)
        self.activation, self.dtype = activation, dtype
        init = nnx.initializers.lecun_normal()
        self.w_gate = (
            sharding.param(init(rngs.params(), (d_model, d_ff), param_dtype), ("embed", "mlp"))
            if gated
            else None
        )
        self.w_up = sharding.param(init(rngs.params(), (d_model, d_ff), param_dtype), ("embed", "mlp"))
        self.w_down = sharding.param(init(rngs.params(), (d_ff, d_model), param_dtype), ("mlp", "embed"))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        cast = lambda p: None if p is None else p[...].astype(self.dtype)
        x_BLD = x_BLD.astype(self.dtype)
        up = x_BLD @ cast(self.w_up)
        gate = None if self.w_gate is None else x_BLD @ cast(self.w_gate)
        hidden = sharding.constrain(
            experts_lib.ffn_hidden(gate, up, self.activation), ("act_batch", "act_length", "act_mlp")
        )
        return sharding.constrain(hidden @ cast(self.w_down), _ACT_BLD)
