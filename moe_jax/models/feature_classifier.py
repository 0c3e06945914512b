"""A MoE Transformer encoder over feature tokens with a classification head (the quick API's classifier).

Features become tokens before the model (``moe_jax.api``): ``[N, F]`` features are cut into consecutive
chunks of ``patch_size`` values (zero-padded at the end; by default ``patch_size = ceil(F / 8)``, so at most
8 tokens), like image patches; for ``[N, L, F]`` each of the L rows is one token of F values. Every token is
linearly embedded to ``d_model`` and gets a learned position embedding.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding
from moe_jax.models.blocks import make_blocks, run_blocks
from moe_jax.models.layers import Norm
from moe_jax.models.transformer import ModelConfig, block_kwargs


class FeatureClassifier(nnx.Module):
    """MoE Transformer encoder over feature tokens → mean pool → linear head.

    ``logits_BQ, aux = model(tokens_BTP, dropout_key=None, deterministic=True)`` where ``tokens_BTP`` holds
    T tokens of P values each (see the module docstring for how features become tokens) and ``aux`` maps
    ``encoder/layer_<i>`` of every MoE block to its aux dict (as the seq2seq model does).

    Args:
        cfg: architecture (``num_encoder_layers`` blocks; ``positions`` must be ``'learned'``, and ``max_len``
            at least T); ``vocab_size`` is unused.
        token_dim: P, values per token.
        num_tokens: T.
        num_classes: Q.
        rngs: initialisation randomness.
    """

    def __init__(
        self, cfg: ModelConfig, *, token_dim: int, num_tokens: int, num_classes: int, rngs: nnx.Rngs
    ):
        if cfg.positions != "learned":
            raise ValueError(f"positions={cfg.positions!r}: the feature classifier uses 'learned' positions")
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed_w = sharding.param(
            nnx.initializers.lecun_normal()(rngs.params(), (token_dim, cfg.d_model), pdt), (None, "embed")
        )
        self.embed_b = sharding.param(jnp.zeros((cfg.d_model,), pdt), ("embed",))
        self.pos = sharding.param(
            nnx.initializers.normal(0.02)(rngs.params(), (num_tokens, cfg.d_model), pdt), (None, "embed")
        )
        self.layers = make_blocks(
            cfg.num_encoder_layers,
            cfg.moe_layers(cfg.num_encoder_layers),
            cfg.moe,
            **block_kwargs(cfg, causal=False, cross=False),
            rngs=rngs,
        )
        self.final_norm = Norm(cfg.d_model, cfg.norm, dtype=jnp.dtype(cfg.dtype), param_dtype=pdt)
        # A zero head starts every class at the same logit (initial loss = log Q).
        self.head_w = sharding.param(jnp.zeros((cfg.d_model, num_classes), pdt), ("embed", None))
        self.head_b = sharding.param(jnp.zeros((num_classes,), pdt), (None,))

    def __call__(self, tokens_BTP, *, dropout_key=None, deterministic=True):
        dtype = jnp.dtype(self.cfg.dtype)
        x_BTD = tokens_BTP.astype(dtype) @ self.embed_w[...].astype(dtype) + self.embed_b[...].astype(dtype)
        x_BTD = x_BTD + self.pos[...].astype(dtype)[None]
        B, T = x_BTD.shape[:2]
        mask_BT = jnp.ones((B, T), bool)
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD, aux = run_blocks(
            self.layers,
            x_BTD,
            name="encoder",
            dropout_key=dropout_key,
            attn_mask_BLL=jnp.ones((B, T, T), bool),
            positions_BL=positions_BT,
            mask_BL=mask_BT,
            deterministic=deterministic,
        )
        pooled_BD = jnp.mean(self.final_norm(x_BTD).astype(jnp.float32), axis=1)
        logits_BQ = pooled_BD @ self.head_w[...].astype(jnp.float32) + self.head_b[...].astype(jnp.float32)
        return logits_BQ, aux
