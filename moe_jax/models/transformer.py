"""Pre-norm Transformers whose FFN is a sparse ``MoeLayer`` on the blocks ``cfg.moe`` names, dense elsewhere.

* :class:`ModelConfig`: the architecture (``config.model``, with the nested ``config.model.moe``).
* :class:`Seq2SeqTransformer`: encoder-decoder (translation, summarization).
* :class:`DecoderLM`: decoder-only language model of the same family.

Both stack :class:`~moe_jax.models.blocks.Block` (decoder blocks: causal mask, causal MoE routing; the
encoder-decoder's decoder blocks add cross-attention).

Both return ``(logits_BLV, aux)`` where ``aux`` maps a MoE layer's name (``encoder/layer_1``,
``decoder/layer_3``, ...) to the layer's aux dict (``load_balancing_loss``, ``router_z_loss``,
``expert_load`` [E], ``dropped_fraction``, ``router_entropy``, ``max_load_ratio``). Logits are float32
whatever the compute ``dtype``. Shape letters: ``moe_jax/moe/__init__.py`` and ``models/layers.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding
from moe_jax.errors import ConfigError
from moe_jax.models import config as config_lib
from moe_jax.models.blocks import make_blocks, run_blocks
from moe_jax.models.config import MoeConfig, Section, dtypes
from moe_jax.models.layers import Embed, Norm, dropout

_ACT_BLD = ("act_batch", "act_length", "act_embed")
POSITIONS = ("rope", "learned")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """Architecture of the Transformer family (``config.model``; all fields are static Python values).

    Attributes:
        vocab_size: V, shared by inputs and outputs (from the tokenizer).
        d_model, num_heads, head_dim, d_ff: widths (``head_dim`` defaults to d_model / num_heads).
        num_encoder_layers, num_decoder_layers: depths (the LM uses ``num_decoder_layers``, the feature
            classifier ``num_encoder_layers``).
        activation: FFN activation, dense and experts alike.
        norm: ``rmsnorm`` or ``layernorm`` (pre-norm, plus a final norm per stack).
        positions: ``rope`` (self-attention queries/keys) or ``learned`` (absolute, ``max_len`` rows).
        max_len: longest sequence for learned positions.
        tie_embeddings: output logits use the (shared) embedding table.
        dropout_rate: residual and attention-output dropout in training.
        dtype, param_dtype: compute and parameter dtypes (names or numpy dtypes).
        moe: the MoE layers (``config.model.moe``); ``moe.layers=None`` makes blocks 1, 3, 5, ... of each
            stack MoE. Decoder MoE layers are causal, so they refuse expert choice and batch-prioritized
            routing (unless ``moe.allow_noncausal_routing``).
    """

    vocab_size: int
    d_model: int = 256
    num_heads: int = 4
    head_dim: int | None = None
    d_ff: int = 1024
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    activation: str = "swiglu"
    norm: str = "rmsnorm"
    positions: str = "rope"
    max_len: int = 512
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)

    _sections: ClassVar[dict[str, type]] = {"moe": MoeConfig}

    def __post_init__(self):
        config_lib.check_model_widths(self, ("vocab_size", "d_model", "num_heads", "d_ff", "max_len"))
        config_lib.check_int("num_encoder_layers", self.num_encoder_layers, 0)
        config_lib.check_int("num_decoder_layers", self.num_decoder_layers, 0)
        config_lib.check_choice("positions", self.positions, POSITIONS)
        config_lib.check_bool("tie_embeddings", self.tie_embeddings)
        if not (isinstance(self.dropout_rate, int | float) and 0.0 <= self.dropout_rate < 1.0):
            raise ConfigError(f"dropout_rate={self.dropout_rate!r} must be in [0, 1)")
        if not isinstance(self.moe, MoeConfig):
            raise ConfigError(f"moe={self.moe!r} must be a MoeConfig (or a mapping of its fields)")
        depth = max(self.num_encoder_layers, self.num_decoder_layers)
        self.moe.check_layers(
            depth,
            f"num_encoder_layers={self.num_encoder_layers}, num_decoder_layers={self.num_decoder_layers}",
        )
        problem = self.moe.causal_conflict() if self.moe_layers(self.num_decoder_layers) else None
        if problem:
            raise ConfigError(problem)

    def moe_layers(self, num_layers: int) -> tuple[int, ...]:
        """The MoE blocks of a stack of ``num_layers`` blocks."""
        return self.moe.layer_indices(num_layers)


class _Stack(nnx.Module):
    """Embedding-free stack of blocks plus a final norm."""

    def __init__(
        self, cfg: ModelConfig, num_layers: int, *, causal: bool, cross: bool, name: str, rngs: nnx.Rngs
    ):
        self.name = name
        self.layers = make_blocks(
            num_layers,
            cfg.moe_layers(num_layers),
            cfg.moe,
            **block_kwargs(cfg, causal=causal, cross=cross),
            rngs=rngs,
        )
        self.final_norm = Norm(cfg.d_model, cfg.norm, **dtypes(cfg))

    def __call__(self, x_BLD, *, dropout_key=None, **kwargs):
        x_BLD, aux = run_blocks(self.layers, x_BLD, name=self.name, dropout_key=dropout_key, **kwargs)
        return self.final_norm(x_BLD), aux


def block_kwargs(cfg: ModelConfig, *, causal: bool, cross: bool) -> dict:
    """:class:`~moe_jax.models.blocks.Block` arguments (all but ``moe`` and ``rngs``) of a ``ModelConfig``."""
    return dict(
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        d_ff=cfg.d_ff,
        head_dim=cfg.head_dim,
        causal=causal,
        cross=cross,
        activation=cfg.activation,
        norm=cfg.norm,
        use_rope=cfg.positions == "rope",
        dropout_rate=cfg.dropout_rate,
        **dtypes(cfg),
    )


def _positions(mask_BL: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(mask_BL.shape[1], dtype=jnp.int32), mask_BL.shape)


def causal_mask(mask_BL: jax.Array) -> jax.Array:
    """[B, L, L] True where query i may attend key j: j <= i and key j is a real token."""
    L = mask_BL.shape[1]
    return jnp.tril(jnp.ones((L, L), bool))[None] & mask_BL[:, None, :]


def shift_right(targets_BL: jax.Array, bos_id: int) -> jax.Array:
    """Decoder inputs: BOS then the targets without their last position."""
    return jnp.concatenate([jnp.full_like(targets_BL[:, :1], bos_id), targets_BL[:, :-1]], axis=1)


class _Embedder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = dtypes(cfg)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, **dt, rngs=rngs)
        init = nnx.initializers.normal(stddev=0.02)
        self.pos = (
            sharding.param(
                init(rngs.params(), (cfg.max_len, cfg.d_model), dt["param_dtype"]), (None, "embed")
            )
            if cfg.positions == "learned"
            else None
        )

    def __call__(self, ids_BL):
        x_BLD = self.embed(ids_BL)
        if self.pos is not None:
            x_BLD = x_BLD + self.pos[...][: ids_BL.shape[1]].astype(x_BLD.dtype)[None]
        return sharding.constrain(x_BLD, _ACT_BLD)


def _output_head(cfg: ModelConfig, rngs: nnx.Rngs):
    """Untied output projection [D, V], or None when logits reuse the embedding table."""
    if cfg.tie_embeddings:
        return None
    init = nnx.initializers.lecun_normal()
    return sharding.param(
        init(rngs.params(), (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype)), ("embed", "vocab")
    )


class Seq2SeqTransformer(nnx.Module):
    """Encoder-decoder Transformer with MoE FFNs; decoder MoE layers are built with ``causal=True``.

    Args:
        cfg: the architecture.
        bos_id: token that starts every decoder input.
        rngs: initialisation randomness.
    """

    def __init__(self, cfg: ModelConfig, *, bos_id: int = 2, rngs: nnx.Rngs):
        self.cfg, self.bos_id = cfg, bos_id
        self.embedder = _Embedder(cfg, rngs=rngs)
        self.encoder = _Stack(
            cfg, cfg.num_encoder_layers, causal=False, cross=False, name="encoder", rngs=rngs
        )
        self.decoder = _Stack(cfg, cfg.num_decoder_layers, causal=True, cross=True, name="decoder", rngs=rngs)
        self.head = _output_head(cfg, rngs)

    def encode(self, inputs_BL, *, dropout_key=None, deterministic=True):
        """Returns ``(enc_BKD, aux)``; pad id 0 marks padding."""
        mask_BL = inputs_BL != 0
        x_BLD = dropout(self.embedder(inputs_BL), self.cfg.dropout_rate, dropout_key)
        self_mask = mask_BL[:, None, :] & mask_BL[:, :, None]
        return self.encoder(
            x_BLD,
            attn_mask_BLL=self_mask,
            positions_BL=_positions(mask_BL),
            mask_BL=mask_BL,
            dropout_key=dropout_key,
            deterministic=deterministic,
        )

    def decode(
        self,
        decoder_inputs_BL,
        enc_BKD,
        inputs_BK,
        *,
        decoder_mask_BL=None,
        dropout_key=None,
        deterministic=True,
    ):
        """Logits for every decoder position: ``(logits_BLV, aux)``.

        Args:
            decoder_inputs_BL: BOS-shifted targets.
            enc_BKD: encoder output.
            inputs_BK: the encoder's token ids (for the cross-attention pad mask).
            decoder_mask_BL: real decoder positions (MoE routing skips the rest); defaults to all.
        """
        if decoder_mask_BL is None:
            decoder_mask_BL = jnp.ones(decoder_inputs_BL.shape, bool)
        x_BLD = dropout(self.embedder(decoder_inputs_BL), self.cfg.dropout_rate, dropout_key)
        cross_mask = decoder_mask_BL[:, :, None] & (inputs_BK != 0)[:, None, :]
        x_BLD, aux = self.decoder(
            x_BLD,
            attn_mask_BLL=causal_mask(decoder_mask_BL),
            positions_BL=_positions(decoder_mask_BL),
            mask_BL=decoder_mask_BL,
            enc_BKD=enc_BKD,
            cross_mask_BLK=cross_mask,
            dropout_key=dropout_key,
            deterministic=deterministic,
        )
        return self.logits(x_BLD), aux

    def logits(self, x_BLD):
        if self.head is None:
            return self.embedder.embed.attend(x_BLD)
        return jnp.einsum(
            "bld,dv->blv", x_BLD, self.head[...].astype(x_BLD.dtype), preferred_element_type=jnp.float32
        )

    def __call__(self, inputs_BK, targets_BL, *, dropout_key=None, deterministic=True):
        """Teacher-forced logits for ``targets_BL`` (pad 0): ``(logits_BLV, aux)``."""
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        enc_BKD, enc_aux = self.encode(inputs_BK, dropout_key=keys[0], deterministic=deterministic)
        logits_BLV, dec_aux = self.decode(
            shift_right(targets_BL, self.bos_id),
            enc_BKD,
            inputs_BK,
            decoder_mask_BL=targets_BL != 0,
            dropout_key=keys[1],
            deterministic=deterministic,
        )
        return logits_BLV, {**enc_aux, **dec_aux}


class DecoderLM(nnx.Module):
    """Decoder-only causal language model with MoE FFNs (``num_decoder_layers`` blocks)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedder = _Embedder(cfg, rngs=rngs)
        self.decoder = _Stack(
            cfg, cfg.num_decoder_layers, causal=True, cross=False, name="decoder", rngs=rngs
        )
        self.head = _output_head(cfg, rngs)

    logits = Seq2SeqTransformer.logits

    def __call__(self, tokens_BL, *, mask_BL=None, dropout_key=None, deterministic=True):
        """Next-token logits at every position: ``(logits_BLV, aux)``; pad id 0 is masked by default."""
        mask_BL = tokens_BL != 0 if mask_BL is None else mask_BL
        x_BLD = dropout(self.embedder(tokens_BL), self.cfg.dropout_rate, dropout_key)
        x_BLD, aux = self.decoder(
            x_BLD,
            attn_mask_BLL=causal_mask(mask_BL),
            positions_BL=_positions(mask_BL),
            mask_BL=mask_BL,
            dropout_key=dropout_key,
            deterministic=deterministic,
        )
        return self.logits(x_BLD), aux
