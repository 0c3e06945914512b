"""ONE pre-norm Transformer :class:`Block`, used by the encoder-decoder, the decoder LM, the ViT and the VLM.

A block is self-attention under a boolean mask (bidirectional, causal, prefix-LM: the caller's mask), RoPE
optional, then optional cross-attention to an encoder, then a dense or MoE FFN, each a pre-norm residual
branch with optional dropout::

    x = x + dropout(self_attn(norm(x)))
    x = x + dropout(cross_attn(norm(x), enc))      # cross=True
    x = x + dropout(ffn(norm(x)))                  # DenseFFN, or MoeLayer from MoeConfig.build

Self-attention may be grouped-query, with q/k norms, biases and a RoPE theta (:class:`Attention`); given a
KV cache (``cache=``), the block writes its tokens' keys and values into it and returns the updated cache,
which is how the decoder LM prefills and decodes.

Shape letters: ``moe_jax/moe/__init__.py`` plus K for the encoder (key/value) length of cross-attention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding
from moe_jax.models.config import MoeConfig
from moe_jax.models.layers import Attention, DenseFFN, Norm, dropout
from moe_jax.moe import MoeLayer
from moe_jax.moe import routing as routing_lib

_ACT_BLD = ("act_batch", "act_length", "act_embed")


def expert_counts_by_mask(moe: MoeLayer, h_BLD: jax.Array, masks: Mapping[str, jax.Array]) -> dict:
    """Per-expert assignment counts of the tokens selected by each mask (before capacity drops).

    Re-runs the layer's token-choice selection (:func:`moe_jax.moe.routing.route_token_choice`: router
    logits in float32, the layer's ``score_fn`` (softmax or sigmoid), selection bias, the stable top-K) on
    the layer's input, instead of running the layer once per modality: routing a subset alone would change
    capacity competition and therefore the layer's output, while this reproduces the assignments the
    layer's ``expert_load`` counts (in evaluation; router jitter in training is not replayed), split by
    mask. The extra cost is one [T, D]×[D, E] matmul and one sort.

    Args:
        moe: the layer whose routing to split (token choice).
        h_BLD: the layer's input (what ``moe(h_BLD)`` receives).
        masks: name → ``bool[B, L]``; masks should be disjoint and exclude padding.

    Returns:
        ``{name: float32[E]}``: how many of the masked tokens' K assignments chose each expert (no gradient).

    Raises:
        ValueError: the layer routes by expert choice (no per-token selection to count).
    """
    if moe.router_type != routing_lib.TOKEN_CHOICE:
        raise ValueError(
            f"expert counts by mask need router='token_choice'; the layer has {moe.router_type!r}"
        )
    logits_BLE = jnp.matmul(
        h_BLD.astype(jnp.float32), moe.router[...].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    bias_E = None if moe.selection_bias is None else moe.selection_bias[...]
    # Each sequence as a group, dropless: selection does not depend on grouping or capacity.
    routing = routing_lib.route_token_choice(
        logits_BLE,
        top_k=moe.top_k,
        capacity=None,
        normalize_gates=moe.normalize_gates,
        selection_bias_E=bias_E,
        score_fn=moe.score_fn,
    )
    onehot_BNE = jax.nn.one_hot(routing.expert_GN, moe.num_experts, dtype=jnp.float32)
    counts = {}
    for name, m in masks.items():
        m_BN = jnp.repeat(m.astype(jnp.float32), moe.top_k, axis=1)  # assignments are token-major
        counts[name] = jax.lax.stop_gradient(jnp.einsum("bne,bn->e", onehot_BNE, m_BN))
    return counts


class Block(nnx.Module):
    """Pre-norm block: self-attention, optional cross-attention, dense or MoE FFN (module docstring).

    Parameters are drawn from ``rngs`` in this order: self-attention (q, k, v, o), cross-attention (q, k, v,
    o), FFN; norms, attention biases and q/k norms draw nothing.

    Args:
        d_model, num_heads, d_ff: widths (``d_ff`` is the dense FFN's, and the experts' unless ``moe.d_ff``).
        head_dim: attention head width; default ``d_model // num_heads``.
        num_kv_heads: key/value heads (grouped-query attention); ``None`` is ``num_heads``.
        moe: ``None`` for a dense FFN, else the MoE layer's config (:meth:`MoeConfig.build`).
        causal: the block sits in a causal decoder: an MoE FFN fills capacity token by token (the attention
            mask itself is the caller's).
        cross: add cross-attention to an encoder output (no RoPE there; the same head layout, q/k norm and
            biases as self-attention).
        activation, norm: FFN activation (dense and experts) and norm kind.
        use_rope: rotary positions on self-attention queries and keys.
        rope_theta: RoPE's maximum wavelength.
        qk_norm: ``"none"``, ``"head"`` or ``"full"`` RMSNorm of queries and keys (:class:`Attention`).
        qkv_bias: biases on the q, k and v projections.
        norm_eps: epsilon of every norm in the block.
        dropout_rate: dropout on each residual branch in training (when a dropout key is passed).
        dtype, param_dtype: compute and parameter dtypes.
        rngs: initialisation randomness.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        *,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        moe: MoeConfig | None = None,
        causal: bool = False,
        cross: bool = False,
        activation: str = "swiglu",
        norm: str = "rmsnorm",
        use_rope: bool = False,
        rope_theta: float = 10_000.0,
        qk_norm: str = "none",
        qkv_bias: bool = False,
        norm_eps: float = 1e-6,
        dropout_rate: float = 0.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        dt = {"dtype": dtype, "param_dtype": param_dtype}
        attn = dict(num_kv_heads=num_kv_heads, qk_norm=qk_norm, qkv_bias=qkv_bias, norm_eps=norm_eps, **dt)
        self.dropout_rate, self.use_moe = dropout_rate, moe is not None
        self.self_norm = Norm(d_model, norm, eps=norm_eps, **dt)
        self.self_attn = Attention(
            d_model, num_heads, head_dim, use_rope=use_rope, rope_theta=rope_theta, **attn, rngs=rngs
        )
        if cross:
            self.cross_norm = Norm(d_model, norm, eps=norm_eps, **dt)
            self.cross_attn = Attention(d_model, num_heads, head_dim, **attn, rngs=rngs)
        else:
            self.cross_norm = self.cross_attn = None
        self.ffn_norm = Norm(d_model, norm, eps=norm_eps, **dt)
        if moe is not None:
            self.ffn = moe.build(d_model, d_ff, activation=activation, causal=causal, **dt, rngs=rngs)
        else:
            self.ffn = DenseFFN(d_model, d_ff, activation, **dt, rngs=rngs)

    def __call__(
        self,
        x_BLD: jax.Array,
        *,
        attn_mask_BLL: jax.Array,
        positions_BL: jax.Array | None = None,
        mask_BL: jax.Array | None = None,
        enc_BKD: jax.Array | None = None,
        cross_mask_BLK: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        deterministic: bool = True,
        split_masks: Mapping[str, jax.Array] | None = None,
        cache: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict | None] | tuple[jax.Array, dict | None, dict[str, jax.Array]]:
        """Returns ``(x_BLD, aux)``, or ``(x_BLD, aux, new_cache)`` with a ``cache``.

        ``aux`` is the MoE layer's aux dict, None for a dense FFN.

        Args:
            x_BLD: the residual stream.
            attn_mask_BLL: True where query i may attend key j; with a ``cache`` it is [B, L, M] over the
                cache's M positions.
            positions_BL: token positions for RoPE (and, with a cache, where their keys and values go).
            mask_BL: real tokens (MoE routing skips the rest); default all.
            enc_BKD: encoder output (cross-attention blocks).
            cross_mask_BLK: True where query i may attend encoder position k.
            dropout_key: dropout randomness; None disables dropout.
            deterministic: evaluation mode of the MoE layer (eval capacity factor, no jitter).
            split_masks: name → ``bool[B, L]``; adds ``expert_count_<name>`` [E] to an MoE block's aux (see
                :func:`expert_counts_by_mask`).
            cache: this block's self-attention KV cache ``{"k", "v"}`` [B, M, N, Dh] (see
                :class:`~moe_jax.models.layers.Attention`); the tokens' keys and values are written at
                ``positions_BL`` and the queries attend to the whole updated cache.
        """
        keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
        h = self.self_norm(x_BLD)
        if cache is None:
            h = self.self_attn(h, h, attn_mask_BLL, positions_BL=positions_BL, positions_BK=positions_BL)
        else:
            if positions_BL is None:
                raise ValueError("a block with a KV cache needs positions_BL (where its keys are written)")
            h, cache = self.self_attn(
                h, h, attn_mask_BLL, positions_BL=positions_BL, positions_BK=positions_BL, cache=cache
            )
        x_BLD = x_BLD + dropout(h, self.dropout_rate, keys[0])
        if self.cross_attn is not None:
            h = self.cross_attn(self.cross_norm(x_BLD), enc_BKD, cross_mask_BLK)
            x_BLD = x_BLD + dropout(h, self.dropout_rate, keys[1])
        h = self.ffn_norm(x_BLD)
        aux = None
        if self.use_moe:
            y, aux = self.ffn(h, mask_BL=mask_BL, deterministic=deterministic)
            if split_masks:
                counts = expert_counts_by_mask(self.ffn, h, split_masks)
                aux = {**aux, **{f"expert_count_{k}": v for k, v in counts.items()}}
        else:
            y = self.ffn(h)
        x_BLD = x_BLD + dropout(y.astype(x_BLD.dtype), self.dropout_rate, keys[2])
        x_BLD = sharding.constrain(x_BLD, _ACT_BLD)
        return (x_BLD, aux) if cache is None else (x_BLD, aux, cache)


# name -> jax.checkpoint policy (None: save nothing, recompute the whole block). Memory falls and compute
# rises from "dots_saveable" (keeps every matmul output, recomputes elementwise ops) through
# "dots_with_no_batch_dims_saveable" (keeps only weight matmuls' outputs) to "full" (keeps only the block
# input: one extra forward per block). "none" stores every activation for the backward pass.
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat_call(block, x_BLD, key, policy: str, kwargs):
    """``block(x_BLD, dropout_key=key, **kwargs)`` under ``nnx.remat`` with the named policy.

    Python values among ``kwargs`` (``deterministic``, names) stay static through the closure.
    """

    def call(block, x_BLD, key):
        return block(x_BLD, dropout_key=key, **kwargs)

    return nnx.remat(call, policy=REMAT_POLICIES[policy])(block, x_BLD, key)


def make_blocks(num_layers: int, moe_layers: Sequence[int], moe: MoeConfig, **block_kwargs) -> nnx.List:
    """``num_layers`` blocks, those in ``moe_layers`` with an MoE FFN built from ``moe`` (in order)."""
    moe_set = set(moe_layers)
    return nnx.List([Block(moe=moe if i in moe_set else None, **block_kwargs) for i in range(num_layers)])


def run_blocks(
    blocks: Sequence[Block],
    x_BLD: jax.Array,
    *,
    name: str,
    dropout_key: jax.Array | None = None,
    caches: Sequence[dict[str, jax.Array]] | None = None,
    remat_policy: str = "none",
    **kwargs,
) -> tuple[jax.Array, dict] | tuple[jax.Array, dict, tuple[dict[str, jax.Array], ...]]:
    """Applies ``blocks`` in order; returns ``(x_BLD, aux)`` with aux keyed ``<name>/layer_<i>``.

    Block i gets the dropout key ``fold_in(dropout_key, i)`` and, when ``caches`` is given (one KV cache
    per block), ``caches[i]``; then the return value is ``(x_BLD, aux, new_caches)``. The other keyword
    arguments go to every block. ``remat_policy`` (:data:`REMAT_POLICIES`) rematerialises each block in the
    backward pass (not with caches: decoding has no backward pass).
    """
    aux, new_caches = {}, []
    for i, block in enumerate(blocks):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        if caches is None and remat_policy != "none":
            x_BLD, layer_aux = _remat_call(block, x_BLD, key, remat_policy, kwargs)
        elif caches is None:
            x_BLD, layer_aux = block(x_BLD, dropout_key=key, **kwargs)
        else:
            x_BLD, layer_aux, cache = block(x_BLD, dropout_key=key, cache=caches[i], **kwargs)
            new_caches.append(cache)
        if layer_aux is not None:
            aux[f"{name}/layer_{i}"] = layer_aux
    return (x_BLD, aux) if caches is None else (x_BLD, aux, tuple(new_caches))
