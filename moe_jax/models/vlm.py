"""Vision-language model: a ViT (dense or V-MoE) feeding a decoder-only language model with MoE FFNs.

Image patch embeddings are projected into the decoder's token space and placed before the text (a prefix
LM): image tokens attend to each other in both directions, text tokens attend to every image token and to
earlier text tokens only. The decoder returns logits for the text positions only, so a loss on them never
touches image positions.

Routing metrics are split by modality: every decoder MoE layer's aux dict gains ``expert_count_image`` and
``expert_count_text`` [E] (assignments of image and of text tokens per expert, before capacity drops, as
``expert_load`` counts them) and ``expert_load_image`` / ``expert_load_text`` (each normalised to sum to 1).
They come from re-running the layer's cheap top-K selection on its input with a modality mask
(:func:`moe_jax.models.blocks.expert_counts_by_mask`), not from routing each modality separately, which would
change capacity competition and hence the model. By construction ``count_image + count_text`` equals the
layer's total assignment count, so ``expert_load = share_image·load_image + share_text·load_text``.

Shape letters: ``moe_jax/moe/__init__.py`` plus P image tokens (patches), T text tokens, H/W/C image dims.
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
from moe_jax.models.layers import Embed, Norm
from moe_jax.models.vit import ViTConfig, ViTEncoder

_ACT_BLD = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class VLMConfig(Section):
    """Architecture of the VLM (``config.model``; static values).

    Attributes:
        vision: the vision tower (``config.model.vision``, with its own ``moe``); its ``num_classes`` must be
            0 (no head); ``vision.moe.layers=()`` makes it dense.
        vocab_size: V of the text tokenizer.
        d_model, num_heads, d_ff, num_layers: the decoder.
        activation, norm: decoder FFN activation and norm.
        dtype, param_dtype: compute and parameter dtypes.
        moe: the decoder's MoE layers (``moe.layers=None``: blocks 1, 3, ...; ``()``: a dense decoder), built
            with ``causal=True``. ``group_size=None`` (one routing group per sequence) keeps a caption's
            routing independent of the rest of the batch. Batch-prioritized and expert-choice routing are
            refused (unless ``allow_noncausal_routing``): ranking by gate value lets a later token take a
            capacity slot from an earlier one, so a token's output would depend on the future.
    """

    vision: ViTConfig = dataclasses.field(default_factory=lambda: ViTConfig(num_classes=0))
    vocab_size: int = 64
    d_model: int = 64
    num_heads: int = 4
    d_ff: int = 128
    num_layers: int = 4
    activation: str = "swiglu"
    norm: str = "rmsnorm"
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)

    _sections: ClassVar[dict[str, type]] = {"vision": ViTConfig, "moe": MoeConfig}

    def __post_init__(self):
        config_lib.check_model_widths(self, ("vocab_size", "d_model", "num_heads", "d_ff", "num_layers"))
        if not isinstance(self.vision, ViTConfig):
            raise ConfigError(f"vision={self.vision!r} must be a ViTConfig (or a mapping of its fields)")
        if self.vision.num_classes != 0:
            raise ConfigError(
                f"vision.num_classes={self.vision.num_classes!r} must be 0: the VLM's vision tower has no "
                "classification head"
            )
        if not isinstance(self.moe, MoeConfig):
            raise ConfigError(f"moe={self.moe!r} must be a MoeConfig (or a mapping of its fields)")
        self.moe.check_layers(self.num_layers, f"num_layers={self.num_layers}")
        problem = self.moe.causal_conflict() if self.moe_layers else None
        if problem:
            raise ConfigError(problem)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The decoder's MoE blocks."""
        return self.moe.layer_indices(self.num_layers)


def prefix_lm_mask(num_prefix: int, mask_BL: jax.Array) -> jax.Array:
    """``[B, L, L]``: True where query i may attend key j.

    Key j must be a real token, and either in the prefix (``j < num_prefix``: image tokens, visible to every
    query) or not after the query (``j <= i``). Prefix queries therefore see the whole prefix but no text.
    """
    L = mask_BL.shape[1]
    i_L1 = jnp.arange(L)[:, None]
    j_1L = jnp.arange(L)[None, :]
    allowed_LL = (j_1L < num_prefix) | (j_1L <= i_L1)
    return allowed_LL[None] & mask_BL[:, None, :].astype(bool)


class VisionLanguageModel(nnx.Module):
    """ViT → linear projection → prefix of a causal MoE decoder over text.

    ``logits_BTV, aux = model(images_BHWC, text_BT)``: logits at every text position (float32), predicting
    the next text token. Pad id 0 marks text padding. ``aux`` maps ``vision/vit/layer_<i>`` and
    ``decoder/layer_<i>`` to MoE aux dicts (decoder ones with the modality split).
    """

    def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = dtypes(cfg)
        self.vision = ViTEncoder(cfg.vision, rngs=rngs)
        init = nnx.initializers.lecun_normal()
        self.proj_w = sharding.param(
            init(rngs.params(), (cfg.vision.d_model, cfg.d_model), dt["param_dtype"]), (None, "embed")
        )
        self.proj_b = sharding.param(jnp.zeros((cfg.d_model,), dt["param_dtype"]), ("embed",))
        self.embed = Embed(cfg.vocab_size, cfg.d_model, **dt, rngs=rngs)
        self.layers = make_blocks(
            cfg.num_layers,
            cfg.moe_layers,
            cfg.moe,
            d_model=cfg.d_model,
            num_heads=cfg.num_heads,
            d_ff=cfg.d_ff,
            causal=True,
            activation=cfg.activation,
            norm=cfg.norm,
            use_rope=True,
            **dt,
            rngs=rngs,
        )
        self.final_norm = Norm(cfg.d_model, cfg.norm, **dt)

    @property
    def num_image_tokens(self) -> int:
        return self.cfg.vision.num_patches

    def encode_image(self, images_BHWC: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, dict]:
        """Image tokens in the decoder's space: ``(prefix_BPD, aux)``."""
        x_BPD, aux = self.vision(images_BHWC, deterministic=deterministic)
        dtype = jnp.dtype(self.cfg.dtype)
        prefix_BPD = x_BPD.astype(dtype) @ self.proj_w[...].astype(dtype) + self.proj_b[...].astype(dtype)
        return sharding.constrain(prefix_BPD, _ACT_BLD), {f"vision/{k}": v for k, v in aux.items()}

    def decode_text(
        self,
        prefix_BPD: jax.Array,
        text_BT: jax.Array,
        *,
        text_mask_BT: jax.Array | None = None,
        deterministic: bool = True,
        split_by_modality: bool = True,
    ) -> tuple[jax.Array, dict]:
        """Runs the decoder over ``[image tokens; text]``; returns text-position logits and decoder aux."""
        B, P = prefix_BPD.shape[:2]
        T = text_BT.shape[1]
        text_mask_BT = (text_BT != 0) if text_mask_BT is None else text_mask_BT.astype(bool)
        x_BLD = jnp.concatenate([prefix_BPD, self.embed(text_BT).astype(prefix_BPD.dtype)], axis=1)
        x_BLD = sharding.constrain(x_BLD, _ACT_BLD)
        mask_BL = jnp.concatenate([jnp.ones((B, P), bool), text_mask_BT], axis=1)
        positions_BL = jnp.broadcast_to(jnp.arange(P + T, dtype=jnp.int32), (B, P + T))
        attn_mask_BLL = prefix_lm_mask(P, mask_BL)
        split = None
        if split_by_modality:
            is_image_BL = jnp.broadcast_to(jnp.arange(P + T) < P, (B, P + T))
            split = {"image": is_image_BL & mask_BL, "text": ~is_image_BL & mask_BL}
        x_BLD, aux = run_blocks(
            self.layers,
            x_BLD,
            name="decoder",
            attn_mask_BLL=attn_mask_BLL,
            mask_BL=mask_BL,
            positions_BL=positions_BL,
            deterministic=deterministic,
            split_masks=split,
        )
        if split:
            aux = {k: _with_modality_load(v) for k, v in aux.items()}
        text_BTD = self.final_norm(x_BLD[:, P:])
        return self.embed.attend(text_BTD), aux

    def __call__(
        self,
        images_BHWC: jax.Array,
        text_BT: jax.Array,
        *,
        text_mask_BT: jax.Array | None = None,
        deterministic: bool = True,
        split_by_modality: bool = True,
    ) -> tuple[jax.Array, dict]:
        """Teacher-forced next-token logits at the text positions: ``(logits_BTV, aux)``.

        Args:
            images_BHWC: float images of the vision config's size and channels.
            text_BT: token ids, pad 0.
            text_mask_BT: real text tokens; default ``text_BT != 0``.
            deterministic: evaluation mode of the MoE layers.
            split_by_modality: add the image/text expert-load split to the decoder aux.

        Raises:
            ValueError: image shape or channels do not match the vision config (names the field ``image``),
                or ``text`` is not ``[batch, length]`` with the image batch size, or is empty (length 0).
        """
        if text_BT.ndim != 2 or text_BT.shape[0] != images_BHWC.shape[0]:
            raise ValueError(
                f"text must have shape [batch, length] with the image batch {images_BHWC.shape[0]}; got "
                f"shape {text_BT.shape}"
            )
        if text_BT.shape[1] == 0:
            raise ValueError("text is empty (length 0); pass at least the BOS token of every example")
        prefix_BPD, vision_aux = self.encode_image(images_BHWC, deterministic=deterministic)
        logits_BTV, aux = self.decode_text(
            prefix_BPD,
            text_BT,
            text_mask_BT=text_mask_BT,
            deterministic=deterministic,
            split_by_modality=split_by_modality,
        )
        return logits_BTV, {**vision_aux, **aux}


def _with_modality_load(aux: dict) -> dict:
    out = dict(aux)
    for name in ("image", "text"):
        count_E = aux[f"expert_count_{name}"]
        out[f"expert_load_{name}"] = count_E / jnp.maximum(count_E.sum(), 1.0)
    return out
