"""Pre-norm Transformers whose FFN is a sparse ``MoeLayer`` on the blocks ``cfg.moe`` names, dense elsewhere.

* :class:`ModelConfig`: the architecture (``config.model``, with the nested ``config.model.moe``).
* :class:`Seq2SeqTransformer`: encoder-decoder (translation, summarization).
* :class:`DecoderLM`: decoder-only language model of the same family (packed documents, KV-cache
  generation).

Both stack :class:`~moe_jax.models.blocks.Block` (decoder blocks: causal mask, causal MoE routing; the
encoder-decoder's decoder blocks add cross-attention).

Both return ``(logits_BLV, aux)`` where ``aux`` maps a MoE layer's name (``encoder/layer_1``,
``decoder/layer_3``, ...) to the layer's aux dict (``load_balancing_loss``, ``router_z_loss``,
``expert_load`` [E], ``dropped_fraction``, ``router_entropy``, ``max_load_ratio``). Logits are float32
whatever the compute ``dtype``. Shape letters: ``moe_jax/moe/__init__.py`` and ``models/layers.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding
from moe_jax.errors import ConfigError
from moe_jax.models import config as config_lib
from moe_jax.models import scan
from moe_jax.models.blocks import REMAT_POLICIES, make_blocks, run_blocks
from moe_jax.models.config import MoeConfig, Section, dtypes
from moe_jax.models.layers import QK_NORMS, Embed, Norm, dropout

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
        scale_embeddings: multiply embedding lookups by sqrt(d_model) (False for imported Hugging Face
            decoders, which do not).
        remat_policy: rematerialise each block in the backward pass (``models/blocks.py:
            REMAT_POLICIES``: ``none``, ``full``, ``dots_saveable``, ``dots_with_no_batch_dims_saveable``);
            outputs and gradients are the same, memory falls and compute rises.
        scan_layers: stack the repeated blocks' parameters on a leading ``layers`` axis and run them with a
            scan (``models/scan.py``): the same function, compiled once per repeating unit instead of once
            per layer; checkpoints convert with ``scan.to_scanned`` / ``to_unscanned``.
        pad_id: the token id the decoder LM treats as padding when called without ``mask_BL`` or segment
            ids; ``None``: every token is real (imported Hugging Face decoders, whose id 0 is a token).
        num_kv_heads: key/value heads, grouped-query attention when fewer than ``num_heads`` (which it must
            divide); ``None`` is ``num_heads``.
        qk_norm: RMSNorm of queries and keys before RoPE: ``none``, ``head`` (each head's Dh, Qwen3-MoE) or
            ``full`` (the whole H·Dh query and N·Dh key projections, OLMoE).
        qkv_bias: biases on the q, k and v projections (Qwen2).
        rope_theta: RoPE's maximum wavelength (> 0).
        logits_soft_cap: final logits are ``cap · tanh(logits / cap)``; ``None`` leaves them uncapped.
        norm_eps: epsilon of every norm (> 0).
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
    scale_embeddings: bool = True
    pad_id: int | None = 0
    remat_policy: str = "none"
    scan_layers: bool = False
    num_kv_heads: int | None = None
    qk_norm: str = "none"
    qkv_bias: bool = False
    rope_theta: float = 10_000.0
    logits_soft_cap: float | None = None
    norm_eps: float = 1e-6
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
        config_lib.check_bool("scale_embeddings", self.scale_embeddings)
        config_lib.check_choice("remat_policy", self.remat_policy, tuple(REMAT_POLICIES))
        config_lib.check_bool("scan_layers", self.scan_layers)
        if self.pad_id is not None:
            config_lib.check_int("pad_id", self.pad_id, 0)
        config_lib.check_optional_int("num_kv_heads", self.num_kv_heads)
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        config_lib.check_choice("qk_norm", self.qk_norm, QK_NORMS)
        config_lib.check_bool("qkv_bias", self.qkv_bias)
        _check_positive("rope_theta", self.rope_theta)
        _check_positive("logits_soft_cap", self.logits_soft_cap, none="None (no cap)")
        _check_positive("norm_eps", self.norm_eps)
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


def _check_positive(name: str, value: Any, *, none: str | None = None) -> None:
    """Raises a ConfigError naming ``name`` unless ``value`` is a finite number > 0 (or None, if ``none``)."""
    if value is None and none is not None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        alternative = f", or {none}" if none else ""
        raise ConfigError(f"{name}={value!r} must be a finite number > 0{alternative}")


class _Stack(nnx.Module):
    """Embedding-free stack of blocks plus a final norm.

    With ``cfg.scan_layers`` the blocks that repeat are a :class:`~moe_jax.models.scan.ScannedBlocks`
    (``self.scanned``) after the unrolled leading ones (``self.layers``); otherwise every block is in
    ``self.layers``.
    """

    def __init__(
        self, cfg: ModelConfig, num_layers: int, *, causal: bool, cross: bool, name: str, rngs: nnx.Rngs
    ):
        self.name, self.remat_policy = name, cfg.remat_policy
        moe_layers = cfg.moe_layers(num_layers)
        kwargs = block_kwargs(cfg, causal=causal, cross=cross)
        lead, period, units = (
            scan.stack_layout(num_layers, moe_layers) if cfg.scan_layers else (num_layers, 0, 0)
        )
        self.layers = make_blocks(lead, moe_layers, cfg.moe, **kwargs, rngs=rngs)
        moe_set = set(moe_layers)
        unit_moe = [cfg.moe if lead + j in moe_set else None for j in range(period)]
        self.scanned = scan.ScannedBlocks(lead, units, unit_moe, **kwargs, rngs=rngs) if period else None
        self.final_norm = Norm(cfg.d_model, cfg.norm, eps=cfg.norm_eps, **dtypes(cfg))

    def __call__(self, x_BLD, *, dropout_key=None, caches=None, **kwargs):
        """``(x_BLD, aux)``, or ``(x_BLD, aux, new_caches)`` with ``caches=`` (see :func:`run_blocks`)."""
        lead = len(self.layers)
        common = dict(name=self.name, dropout_key=dropout_key, remat_policy=self.remat_policy, **kwargs)
        parts = [run_blocks(self.layers, x_BLD, caches=None if caches is None else caches[:lead], **common)]
        if self.scanned is not None:
            rest = None if caches is None else caches[lead:]
            parts.append(self.scanned(parts[-1][0], caches=rest, **common))
        x_BLD = self.final_norm(parts[-1][0])
        aux = {k: v for part in parts for k, v in part[1].items()}
        if caches is None:
            return x_BLD, aux
        return x_BLD, aux, tuple(c for part in parts for c in part[2])

    def init_caches(self, batch_size: int, max_len: int, dtype) -> tuple[dict[str, jax.Array], ...]:
        """An empty KV cache per unrolled block, then one stacked cache per scanned unit position."""
        caches = []
        for block in self.layers:
            attn = block.self_attn
            shape = (batch_size, max_len, attn.num_kv_heads, attn.head_dim)
            caches.append({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)})
        if self.scanned is not None:
            caches += self.scanned.init_caches(batch_size, max_len, dtype)
        return tuple(caches)

    def num_caches(self) -> int:
        return len(self.layers) + (self.scanned.period if self.scanned is not None else 0)


def block_kwargs(cfg: ModelConfig, *, causal: bool, cross: bool) -> dict:
    """:class:`~moe_jax.models.blocks.Block` arguments (all but ``moe`` and ``rngs``) of a ``ModelConfig``."""
    return dict(
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        d_ff=cfg.d_ff,
        head_dim=cfg.head_dim,
        num_kv_heads=cfg.num_kv_heads,
        causal=causal,
        cross=cross,
        activation=cfg.activation,
        norm=cfg.norm,
        use_rope=cfg.positions == "rope",
        rope_theta=cfg.rope_theta,
        qk_norm=cfg.qk_norm,
        qkv_bias=cfg.qkv_bias,
        norm_eps=cfg.norm_eps,
        dropout_rate=cfg.dropout_rate,
        **dtypes(cfg),
    )


def _positions(mask_BL: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(mask_BL.shape[1], dtype=jnp.int32), mask_BL.shape)


def causal_mask(mask_BL: jax.Array) -> jax.Array:
    """[B, L, L] True where query i may attend key j: j <= i and key j is a real token."""
    L = mask_BL.shape[1]
    return jnp.tril(jnp.ones((L, L), bool))[None] & mask_BL[:, None, :]


def document_mask(segment_ids_BL: jax.Array, mask_BL: jax.Array | None = None) -> jax.Array:
    """[B, L, L] for packed documents: j <= i, same segment, key j real (default: segment id != 0)."""
    mask_BL = segment_ids_BL != 0 if mask_BL is None else mask_BL
    same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return causal_mask(mask_BL) & same_BLL


def segment_positions(segment_ids_BL: jax.Array) -> jax.Array:
    """Positions restarting at 0 where each segment (packed document) starts: [[1,1,2,2,0]] → [[0,1,0,1,0]].

    Padding (id 0) after a document counts as a segment of its own; its positions do not matter.
    """
    L = segment_ids_BL.shape[1]
    idx_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), segment_ids_BL.shape)
    prev_BL = jnp.concatenate([jnp.full_like(segment_ids_BL[:, :1], -1), segment_ids_BL[:, :-1]], axis=1)
    start_BL = jax.lax.cummax(jnp.where(segment_ids_BL != prev_BL, idx_BL, 0), axis=1)
    return idx_BL - start_BL


def shift_right(targets_BL: jax.Array, bos_id: int) -> jax.Array:
    """Decoder inputs: BOS then the targets without their last position."""
    return jnp.concatenate([jnp.full_like(targets_BL[:, :1], bos_id), targets_BL[:, :-1]], axis=1)


class _Embedder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = dtypes(cfg)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, scale=cfg.scale_embeddings, **dt, rngs=rngs)
        init = nnx.initializers.normal(stddev=0.02)
        self.pos = (
            sharding.param(
                init(rngs.params(), (cfg.max_len, cfg.d_model), dt["param_dtype"]), (None, "embed")
            )
            if cfg.positions == "learned"
            else None
        )

    def __call__(self, ids_BL, positions_BL=None):
        """Embeddings plus learned positions (``positions_BL``; default 0, 1, ... along each row)."""
        x_BLD = self.embed(ids_BL)
        if self.pos is not None and positions_BL is None:
            x_BLD = x_BLD + self.pos[...][: ids_BL.shape[1]].astype(x_BLD.dtype)[None]
        elif self.pos is not None:
            x_BLD = x_BLD + jnp.take(self.pos[...], positions_BL, axis=0).astype(x_BLD.dtype)
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
        """Float32 output logits of the final hidden states (tied or untied head, optional soft cap)."""
        if self.head is None:
            logits_BLV = self.embedder.embed.attend(x_BLD)
        else:
            logits_BLV = jnp.einsum(
                "bld,dv->blv", x_BLD, self.head[...].astype(x_BLD.dtype), preferred_element_type=jnp.float32
            )
        cap = self.cfg.logits_soft_cap
        if cap is not None:
            logits_BLV = cap * jnp.tanh(logits_BLV / cap)
        return logits_BLV

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
    """Decoder-only causal language model with MoE FFNs (``num_decoder_layers`` blocks).

    Training and scoring: ``logits_BLV, aux = model(tokens_BL)``, optionally over packed documents
    (``segment_ids_BL``). Generation with a KV cache::

        cache = model.init_cache(batch_size, max_len)
        logits_BLV, cache = model.prefill(prompts_BL, lengths_B, cache)     # right-padded prompts
        logits_BV, cache = model.decode_step(tokens_B, positions_B, cache)  # one token per row, repeated

    The cache is a plain pytree (no NNX state), so these methods run under ``jax.jit`` over
    ``nnx.split`` state with static shapes: a tuple with one ``{"k": [B, M, N, Dh], "v": [B, M, N, Dh]}``
    per block (M = ``max_len``, N key/value heads, Dh head width, compute dtype), keys stored after the k
    norm and RoPE. With ``scan_layers`` the scanned blocks share one entry per unit position, stacked
    [U, B, M, N, Dh] (``models/scan.py``).

    With dropless MoE routing (``moe.eval_capacity_factor`` resolving to None) prefill followed by decode
    steps gives the logits of the full forward over the same prefix, because a token's dropless routing does
    not depend on the other tokens. With capacity routing it does not, in general: prefill routes the
    prompts as the full forward would, but a decode step routes each row's single token as its own group
    (``moe.group_size=None``), which never overflows capacity, so a token the full forward drops is kept
    when decoding. With ``moe.group_size`` set, a decode step's B tokens (one per row) are grouped by that
    size, which must divide B, and compete for capacity across rows. The LM configs evaluate and generate
    dropless.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedder = _Embedder(cfg, rngs=rngs)
        self.decoder = _Stack(
            cfg, cfg.num_decoder_layers, causal=True, cross=False, name="decoder", rngs=rngs
        )
        self.head = _output_head(cfg, rngs)

    logits = Seq2SeqTransformer.logits

    def __call__(
        self,
        tokens_BL,
        *,
        segment_ids_BL=None,
        positions_BL=None,
        mask_BL=None,
        dropout_key=None,
        deterministic=True,
    ):
        """Next-token logits at every position: ``(logits_BLV, aux)``.

        Args:
            tokens_BL: token ids.
            segment_ids_BL: packed documents, one id per document and 0 for padding: query i attends key j
                iff j <= i, both in the same segment and key j real. ``None``: one document per row, pad id
                0 masked.
            positions_BL: RoPE (or learned) positions; default 0, 1, ... along each row. For packed
                documents pass :func:`segment_positions` to restart them per document.
            mask_BL: real tokens (keys that may be attended, tokens the MoE layers route); default
                ``segment_ids_BL != 0`` with segment ids, else ``tokens_BL != cfg.pad_id`` (all tokens
                when ``pad_id`` is None).
            dropout_key: dropout randomness; None disables dropout.
            deterministic: evaluation mode of the MoE layers.
        """
        if mask_BL is None and segment_ids_BL is not None:
            mask_BL = segment_ids_BL != 0
        elif mask_BL is None:
            pad = self.cfg.pad_id
            mask_BL = jnp.ones(tokens_BL.shape, bool) if pad is None else tokens_BL != pad
        if segment_ids_BL is None:
            attn_mask_BLL = causal_mask(mask_BL)
        else:
            attn_mask_BLL = document_mask(segment_ids_BL, mask_BL)
        x_BLD = dropout(self.embedder(tokens_BL, positions_BL), self.cfg.dropout_rate, dropout_key)
        x_BLD, aux = self.decoder(
            x_BLD,
            attn_mask_BLL=attn_mask_BLL,
            positions_BL=_positions(mask_BL) if positions_BL is None else positions_BL,
            mask_BL=mask_BL,
            dropout_key=dropout_key,
            deterministic=deterministic,
        )
        return self.logits(x_BLD), aux

    def init_cache(self, batch_size: int, max_len: int) -> tuple[dict[str, jax.Array], ...]:
        """An empty KV cache for ``batch_size`` rows of up to ``max_len`` positions (class docstring).

        Raises:
            ValueError: ``max_len`` exceeds the learned position table (``positions='learned'``).
        """
        if self.cfg.positions == "learned" and max_len > self.cfg.max_len:
            raise ValueError(
                f"cache max_len={max_len} exceeds the model's learned positions max_len={self.cfg.max_len}"
            )
        return self.decoder.init_caches(batch_size, max_len, jnp.dtype(self.cfg.dtype))

    def prefill(self, tokens_BL, lengths_B, cache):
        """Runs the right-padded prompts and writes their keys and values into the cache.

        Args:
            tokens_BL: prompts; row b is real at positions < ``lengths_B[b]``.
            lengths_B: prompt lengths (>= 1 for a row whose next token is read from these logits).
            cache: from :meth:`init_cache`, of length M >= L.

        Returns:
            ``(logits_BLV, cache)``: the full forward's logits at the real positions (those past a row's
            length are unspecified); the cache holds positions [0, L) of every row (padding ones are
            overwritten by later decode steps before anything attends to them).
        """
        B, L = tokens_BL.shape
        M = self._cache_len(cache, L)
        i_1L1 = jnp.arange(L)[None, :, None]
        j_11M = jnp.arange(M)[None, None, :]
        lengths_B11 = jnp.asarray(lengths_B)[:, None, None]
        attn_mask_BLM = (j_11M <= i_1L1) & (j_11M < lengths_B11)
        mask_BL = jnp.arange(L)[None, :] < lengths_B11[:, :, 0]
        positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        x_BLD, _, cache = self.decoder(
            self.embedder(tokens_BL),
            attn_mask_BLL=attn_mask_BLM,
            positions_BL=positions_BL,
            mask_BL=mask_BL,
            deterministic=True,
            caches=cache,
        )
        return self.logits(x_BLD), cache

    def decode_step(self, tokens_B, positions_B, cache, *, mask_B=None):
        """One new token per row: writes its keys and values at ``positions_B[b]`` and attends keys <= it.

        Args:
            tokens_B: the tokens at ``positions_B``.
            positions_B: each row's position (< M); rows may be at different positions.
            cache: the cache after :meth:`prefill` and the earlier steps.
            mask_B: rows whose token the MoE layers route (finished rows may be False); default all.

        Returns:
            ``(logits_BV, cache)``: the logits at ``positions_B`` (predicting the next token).
        """
        M = self._cache_len(cache, 1)
        positions_B1 = jnp.asarray(positions_B, jnp.int32)[:, None]
        attn_mask_B1M = jnp.arange(M)[None, None, :] <= positions_B1[:, :, None]
        mask_B1 = jnp.ones(positions_B1.shape, bool) if mask_B is None else jnp.asarray(mask_B, bool)[:, None]
        tokens_B1 = jnp.asarray(tokens_B)[:, None]
        x_BLD, _, cache = self.decoder(
            self.embedder(tokens_B1, positions_B1),
            attn_mask_BLL=attn_mask_B1M,
            positions_BL=positions_B1,
            mask_BL=mask_B1,
            deterministic=True,
            caches=cache,
        )
        return self.logits(x_BLD)[:, 0], cache

    def _cache_len(self, cache, length: int) -> int:
        """The cache length M, checking the cache has one entry per block and room for ``length``."""
        if len(cache) != self.decoder.num_caches():
            raise ValueError(
                f"the cache has {len(cache)} entries but the model needs {self.decoder.num_caches()}; "
                "use init_cache"
            )
        M = cache[0]["k"].shape[-3] if cache else length
        if length > M:
            raise ValueError(f"{length} prompt positions do not fit a cache of max_len={M}")
        return M
