"""Transformer building blocks in Flax NNX: norms, embeddings, RoPE, attention, dense FFN.

Shape letters are those of ``moe_jax/moe/__init__.py`` (B batch, L length, D d_model, F d_ff, H heads,
V vocab) plus K for key/value length and Dh for the head width in attention.

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
    """Token embedding table [V, D]; ``attend`` gives tied output logits."""

    def __init__(
        self, vocab_size: int, d_model: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.d_model, self.dtype = d_model, dtype
        # std 1/sqrt(D) so that tied logits start near unit scale; lookups are rescaled by sqrt(D).
        init = nnx.initializers.normal(stddev=d_model**-0.5)
        self.table = sharding.param(
            init(rngs.params(), (vocab_size, d_model), param_dtype), ("vocab", "embed")
        )

    def __call__(self, ids_BL: jax.Array) -> jax.Array:
        x_BLD = jnp.take(self.table[...], ids_BL, axis=0).astype(self.dtype)
        return x_BLD * jnp.asarray(self.d_model**0.5, self.dtype)

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        """Logits in float32 against the (tied) table."""
        return jnp.einsum(
            "bld,vd->blv", x_BLD, self.table[...].astype(self.dtype), preferred_element_type=jnp.float32
        )


def rope(x_BLHd: jax.Array, positions_BL: jax.Array, max_wavelength: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (rotate-half form) on the last dim, computed in float32."""
    dh = x_BLHd.shape[-1]
    half = dh // 2
    freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BLh = positions_BL.astype(jnp.float32)[..., None] * freq
    sin, cos = jnp.sin(angle_BLh)[:, :, None, :], jnp.cos(angle_BLh)[:, :, None, :]
    x = x_BLHd.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHd.dtype)


class Attention(nnx.Module):
    """Multi-head attention (self or cross), optional RoPE on queries and keys; softmax in float32."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        use_rope: bool = False,
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
        self.num_heads, self.head_dim, self.use_rope, self.dtype = num_heads, head_dim, use_rope, dtype
        init = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
        )
        init_o = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
        )
        shape, axes = (d_model, num_heads, head_dim), ("embed", "heads", "kv")
        self.w_q = sharding.param(init(rngs.params(), shape, param_dtype), axes)
        self.w_k = sharding.param(init(rngs.params(), shape, param_dtype), axes)
        self.w_v = sharding.param(init(rngs.params(), shape, param_dtype), axes)
        self.w_o = sharding.param(
            init_o(rngs.params(), (num_heads, head_dim, d_model), param_dtype), ("heads", "kv", "embed")
        )

    def __call__(
        self,
        x_BLD: jax.Array,
        kv_BKD: jax.Array,
        mask_BLK: jax.Array,
        *,
        positions_BL: jax.Array | None = None,
        positions_BK: jax.Array | None = None,
    ) -> jax.Array:
        """Attends from ``x_BLD`` to ``kv_BKD``; ``mask_BLK`` is True where attention is allowed."""
        cast = lambda p: p[...].astype(self.dtype)
        q_BLHd = jnp.einsum("bld,dhk->blhk", x_BLD.astype(self.dtype), cast(self.w_q))
        k_BKHd = jnp.einsum("bld,dhk->blhk", kv_BKD.astype(self.dtype), cast(self.w_k))
        v_BKHd = jnp.einsum("bld,dhk->blhk", kv_BKD.astype(self.dtype), cast(self.w_v))
        if self.use_rope:
            q_BLHd = rope(q_BLHd, positions_BL)
            k_BKHd = rope(k_BKHd, positions_BK)
        q_BLHd = q_BLHd * jnp.asarray(self.head_dim**-0.5, self.dtype)
        logits_BHLK = jnp.einsum("blhk,bmhk->bhlm", q_BLHd, k_BKHd, preferred_element_type=jnp.float32)
        logits_BHLK = jnp.where(mask_BLK[:, None], logits_BHLK, jnp.finfo(jnp.float32).min)
        probs_BHLK = jax.nn.softmax(logits_BHLK, axis=-1).astype(self.dtype)
        out_BLHd = jnp.einsum("bhlm,bmhk->blhk", probs_BHLK, v_BKHd)
        y_BLD = jnp.einsum("blhk,hkd->bld", out_BLHd, cast(self.w_o))
        return sharding.constrain(y_BLD, _ACT_BLD)


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
