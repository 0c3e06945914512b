"""Pre-norm Transformers whose FFN is a sparse ``MoeLayer`` on a pattern of layers, dense elsewhere.

* :class:`Seq2SeqTransformer`: encoder-decoder (translation, summarization).
* :class:`DecoderLM`: decoder-only language model of the same family.

Both return ``(logits_BLV, aux)`` where ``aux`` maps a MoE layer's name (``encoder/layer_1``,
``decoder/layer_3``, ...) to the layer's aux dict (``load_balancing_loss``, ``router_z_loss``,
``expert_load`` [E], ``dropped_fraction``, ``router_entropy``, ``max_load_ratio``). Logits are float32
whatever the compute ``dtype``. Shape letters: ``moe_jax/moe/__init__.py`` and ``models/layers.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding
from moe_jax.models.layers import Attention, DenseFFN, Embed, Norm, dropout
from moe_jax.moe import MoeLayer

_ACT_BLD = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeFields:
    """The MoE-layer fields every model config shares (:class:`ModelConfig`, ``ViTConfig``, ``VLMConfig``).

    Keyword-only, so a subclass's own fields keep their positional order (``ModelConfig(vocab_size, ...)``
    still works); ``dataclasses.fields`` and ``asdict`` list these first.

    Attributes:
        num_experts, top_k, moe_d_ff, router, capacity_factor, eval_capacity_factor, dispatch,
            num_shared_experts, group_size, jitter_noise, selection_bias, selection_bias_rate,
            grouped_backend, expert_parallel: passed to :class:`~moe_jax.moe.MoeLayer` (``moe_d_ff``
            defaults to the config's ``d_ff``; ``group_size=None`` routes each sequence, or image, as its own
            group; ``selection_bias`` turns on aux-loss-free balancing, updated every training step;
            ``expert_parallel="shard_map"`` needs an ``expert`` mesh axis).
    """

    num_experts: int = 8
    top_k: int = 2
    moe_d_ff: int | None = None
    router: str = "token_choice"
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None | str = "same"
    dispatch: str = "auto"
    num_shared_experts: int = 0
    group_size: int | None = None
    jitter_noise: float = 0.0
    selection_bias: bool = False
    selection_bias_rate: float = 1e-3
    grouped_backend: str = "auto"
    expert_parallel: str = "gspmd"


@dataclasses.dataclass(frozen=True)
class ModelConfig(MoeFields):
    """Architecture of the Transformer family (all fields are static Python values).

    Attributes:
        vocab_size: V, shared by inputs and outputs.
        d_model, num_heads, head_dim, d_ff: widths (``head_dim`` defaults to d_model / num_heads).
        num_encoder_layers, num_decoder_layers: depths (the LM uses ``num_decoder_layers``).
        moe_every, moe_offset: layer i (0-based, per stack) is MoE when ``moe_every > 0`` and
            ``i % moe_every == moe_offset``; the default (2, 1) makes every other layer MoE.
        num_experts, top_k, moe_d_ff, router, capacity_factor, eval_capacity_factor, dispatch,
            num_shared_experts, group_size, jitter_noise, selection_bias, selection_bias_rate,
            grouped_backend, expert_parallel: keyword-only, from :class:`MoeFields`.
        activation: FFN activation, dense and experts alike.
        norm: ``rmsnorm`` or ``layernorm`` (pre-norm, plus a final norm per stack).
        positions: ``rope`` (self-attention queries/keys) or ``learned`` (absolute, ``max_len`` rows).
        max_len: longest sequence for learned positions.
        tie_embeddings: output logits use the (shared) embedding table.
        dropout_rate: residual and attention-output dropout in training.
        dtype, param_dtype: compute and parameter dtypes (names or numpy dtypes).
    """

    vocab_size: int
    d_model: int = 256
    num_heads: int = 4
    head_dim: int | None = None
    d_ff: int = 1024
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    moe_every: int = 2
    moe_offset: int = 1
    activation: str = "swiglu"
    norm: str = "rmsnorm"
    positions: str = "rope"
    max_len: int = 512
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides) -> ModelConfig:
        """Builds from a config mapping (extra keys such as ``kind`` are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(values).items() if k in names}
        kwargs.update(overrides)
        return cls(**kwargs)

    def is_moe(self, layer: int) -> bool:
        return self.moe_every > 0 and layer % self.moe_every == self.moe_offset % self.moe_every


def _dtypes(cfg: ModelConfig):
    return {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}


class Block(nnx.Module):
    """Pre-norm block: self-attention, optional cross-attention, FFN (MoE or dense)."""

    def __init__(self, cfg: ModelConfig, *, use_moe: bool, causal: bool, cross: bool, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        rope = cfg.positions == "rope"
        self.dropout_rate, self.use_moe = cfg.dropout_rate, use_moe
        self.self_norm = Norm(cfg.d_model, cfg.norm, **dt)
        self.self_attn = Attention(cfg.d_model, cfg.num_heads, cfg.head_dim, use_rope=rope, **dt, rngs=rngs)
        if cross:
            self.cross_norm = Norm(cfg.d_model, cfg.norm, **dt)
            self.cross_attn = Attention(cfg.d_model, cfg.num_heads, cfg.head_dim, **dt, rngs=rngs)
        else:
            self.cross_norm = self.cross_attn = None
        self.ffn_norm = Norm(cfg.d_model, cfg.norm, **dt)
        if use_moe:
            self.ffn = MoeLayer(
                cfg.d_model,
                cfg.moe_d_ff or cfg.d_ff,
                cfg.num_experts,
                cfg.top_k,
                router=cfg.router,
                capacity_factor=cfg.capacity_factor,
                eval_capacity_factor=cfg.eval_capacity_factor,
                activation=cfg.activation,
                dispatch=cfg.dispatch,
                num_shared_experts=cfg.num_shared_experts,
                group_size=cfg.group_size,
                jitter_noise=cfg.jitter_noise,
                selection_bias=cfg.selection_bias,
                selection_bias_rate=cfg.selection_bias_rate,
                grouped_backend=cfg.grouped_backend,
                expert_parallel=cfg.expert_parallel,
                causal=causal,
                **dt,
                rngs=rngs,
            )
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, **dt, rngs=rngs)

    def __call__(
        self,
        x_BLD,
        *,
        self_mask_BLL,
        positions_BL,
        mask_BL,
        enc_BKD=None,
        cross_mask_BLK=None,
        dropout_key=None,
        deterministic=True,
    ):
        keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
        h = self.self_norm(x_BLD)
        h = self.self_attn(h, h, self_mask_BLL, positions_BL=positions_BL, positions_BK=positions_BL)
        x_BLD = x_BLD + dropout(h, self.dropout_rate, keys[0])
        if self.cross_attn is not None:
            h = self.cross_attn(self.cross_norm(x_BLD), enc_BKD, cross_mask_BLK)
            x_BLD = x_BLD + dropout(h, self.dropout_rate, keys[1])
        h = self.ffn_norm(x_BLD)
        aux = None
        if self.use_moe:
            h, aux = self.ffn(h, mask_BL=mask_BL, deterministic=deterministic)
        else:
            h = self.ffn(h)
        x_BLD = x_BLD + dropout(h.astype(x_BLD.dtype), self.dropout_rate, keys[2])
        return sharding.constrain(x_BLD, _ACT_BLD), aux


class _Stack(nnx.Module):
    """Embedding-free stack of blocks plus a final norm."""

    def __init__(
        self, cfg: ModelConfig, num_layers: int, *, causal: bool, cross: bool, name: str, rngs: nnx.Rngs
    ):
        self.name = name
        self.layers = nnx.List(
            [
                Block(cfg, use_moe=cfg.is_moe(i), causal=causal, cross=cross, rngs=rngs)
                for i in range(num_layers)
            ]
        )
        self.final_norm = Norm(cfg.d_model, cfg.norm, **_dtypes(cfg))

    def __call__(self, x_BLD, *, dropout_key=None, **kwargs):
        aux = {}
        for i, layer in enumerate(self.layers):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            x_BLD, layer_aux = layer(x_BLD, dropout_key=key, **kwargs)
            if layer_aux is not None:
                aux[f"{self.name}/layer_{i}"] = layer_aux
        return self.final_norm(x_BLD), aux


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
        dt = _dtypes(cfg)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, **dt, rngs=rngs)
        if cfg.positions not in ("rope", "learned"):
            raise ValueError(f"positions={cfg.positions!r} is unknown; choose 'rope' or 'learned'")
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
            self_mask_BLL=self_mask,
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
            self_mask_BLL=causal_mask(decoder_mask_BL),
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
            self_mask_BLL=causal_mask(mask_BL),
            positions_BL=_positions(mask_BL),
            mask_BL=mask_BL,
            dropout_key=dropout_key,
            deterministic=deterministic,
        )
        return self.logits(x_BLD), aux
