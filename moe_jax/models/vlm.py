"""Vision-language model: a ViT (dense or V-MoE) feeding a decoder-only language model with MoE FFNs.

Image patch embeddings are projected into the decoder's token space and placed before the text (a prefix
LM): image tokens attend to each other in both directions, text tokens attend to every image token and to
earlier text tokens only. The decoder returns logits for the text positions only, so a loss on them never
touches image positions.

Routing metrics are split by modality: every decoder MoE layer's aux dict gains ``expert_count_image`` and
``expert_count_text`` [E] (assignments of image and of text tokens per expert, before capacity drops, as
``expert_load`` counts them) and ``expert_load_image`` / ``expert_load_text`` (each normalised to sum to 1).
They come from re-running the layer's cheap top-K selection on its input with a modality mask
(:func:`moe_jax.models.vit.expert_counts_by_mask`), not from routing each modality separately, which would
change capacity competition and hence the model. By construction ``count_image + count_text`` equals the
layer's total assignment count, so ``expert_load = share_image·load_image + share_text·load_text``.

Shape letters: ``moe_jax/moe/__init__.py`` plus P image tokens (patches), T text tokens, H/W/C image dims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding
from moe_jax.models.layers import Embed, Norm
from moe_jax.models.transformer import MoeFields
from moe_jax.models.vit import Block, ViTConfig, ViTEncoder, moe_kwargs_of

_ACT_BLD = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class VLMConfig(MoeFields):
    """Architecture of the VLM (static values).

    Attributes:
        vision: the vision tower (``num_classes`` is ignored); ``vision.moe_layers=()`` makes it dense.
        vocab_size: V of the text tokenizer.
        d_model, num_heads, d_ff, num_layers: the decoder.
        moe_every, moe_offset: decoder block i is MoE when ``moe_every > 0`` and ``i % moe_every ==
            moe_offset``; ``moe_every=0`` gives a dense decoder.
        num_experts, top_k, moe_d_ff, router, capacity_factor, eval_capacity_factor, dispatch, group_size,
            jitter_noise, num_shared_experts: the decoder's MoE layers (keyword-only, from
            :class:`~moe_jax.models.transformer.MoeFields`), built with ``causal=True``. ``group_size=None``
            (one routing group per sequence) keeps a caption's routing independent of the rest of the
            batch. Batch-prioritized routing is not offered here: ranking by gate value lets a later token
            take a capacity slot from an earlier one, so a token's output would depend on the future.
        activation, norm: decoder FFN activation and norm.
        dtype, param_dtype: compute and parameter dtypes.
    """

    vision: ViTConfig = dataclasses.field(default_factory=lambda: ViTConfig(num_classes=0))
    vocab_size: int = 64
    d_model: int = 64
    num_heads: int = 4
    d_ff: int = 128
    num_layers: int = 4
    moe_every: int = 2
    moe_offset: int = 1
    activation: str = "swiglu"
    norm: str = "rmsnorm"
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    batch_prioritized = False  # see the class docstring (read by moe_kwargs_of)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], vision: Mapping[str, Any], **overrides) -> VLMConfig:
        """Builds from config mappings (``model`` and ``model.vision`` sections; extra keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"vision"}
        kwargs = {k: v for k, v in dict(values).items() if k in names}
        kwargs.update(overrides)
        return cls(vision=ViTConfig.from_mapping(vision, num_classes=0), **kwargs)

    def is_moe(self, layer: int) -> bool:
        return self.moe_every > 0 and layer % self.moe_every == self.moe_offset % self.moe_every


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
        dt = {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
        self.vision = ViTEncoder(cfg.vision, rngs=rngs)
        init = nnx.initializers.lecun_normal()
        self.proj_w = sharding.param(
            init(rngs.params(), (cfg.vision.d_model, cfg.d_model), dt["param_dtype"]), (None, "embed")
        )
        self.proj_b = sharding.param(jnp.zeros((cfg.d_model,), dt["param_dtype"]), ("embed",))
        self.embed = Embed(cfg.vocab_size, cfg.d_model, **dt, rngs=rngs)
        self.layers = nnx.List(
            [
                Block(
                    cfg.d_model,
                    cfg.num_heads,
                    cfg.d_ff,
                    moe_kwargs=moe_kwargs_of(cfg, causal=True) if cfg.is_moe(i) else None,
                    activation=cfg.activation,
                    norm=cfg.norm,
                    use_rope=True,
                    **dt,
                    rngs=rngs,
                )
                for i in range(cfg.num_layers)
            ]
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
        aux = {}
        for i, layer in enumerate(self.layers):
            x_BLD, layer_aux = layer(
                x_BLD,
                attn_mask_BLL=attn_mask_BLL,
                mask_BL=mask_BL,
                positions_BL=positions_BL,
                deterministic=deterministic,
                split_masks=split,
            )
            if layer_aux is not None:
                aux[f"decoder/layer_{i}"] = _with_modality_load(layer_aux) if split else layer_aux
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
