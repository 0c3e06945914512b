"""Vision Transformer whose MLPs are sparse ``MoeLayer``s on a configurable pattern (V-MoE).

Shape letters are those of ``moe_jax/moe/__init__.py`` plus: H and W image height and width (pixels), C
channels, P patch side, N patches (image tokens), Dp = P·P·C the flattened patch, Q classes.

* :func:`patchify` cuts ``[B, H, W, C]`` images into ``[B, N, P·P·C]`` patches (row-major over the patch
  grid), failing with a ``ValueError`` that names the field when sizes or channels do not fit.
* :class:`ViTConfig` is the architecture (``config.model``, or ``config.model.vision`` in the VLM), with
  the MoE layers in its nested ``moe`` (:class:`~moe_jax.models.config.MoeConfig`).
* :class:`ViTEncoder` embeds patches and runs the shared :class:`~moe_jax.models.blocks.Block`
  (bidirectional attention, no RoPE, no dropout); :class:`ViTClassifier` adds mean pooling and a linear
  head.

The V-MoE default (``moe.layers=None``, :func:`~moe_jax.models.config.vmoe_layers`) places MoE FFNs on
every other block of the last half (always including the last block), e.g. blocks 5 and 7 of 8.
Batch-prioritized routing (``moe.batch_prioritized=True``, the ViT's default) fills expert capacity by
each token's top-1 gate instead of its position, which V-MoE found lets a smaller capacity factor at
evaluation (``moe.eval_capacity_factor``) drop only the least confident patches.

Capacity is per routing group: ``moe.group_size`` tokens, by default (``None``) one image. An image's patches
are often alike (background) and crowd the same experts, so per-image groups drop many of them; groups of
several images pool capacity across images (the configs use 16 images per group: on the VLM's shape scenes
this took the image tokens dropped at evaluation from 37% to 1%, see ``configs/vlm.py``). A group must
divide batch × patches, and groups spanning images make an image's output depend on its batch neighbours.
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
from moe_jax.models.config import MoeConfig, Section, dtypes, vmoe_layers
from moe_jax.models.layers import Norm

_ACT_BLD = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class ViTConfig(Section):
    """Architecture of a (V-MoE) Vision Transformer; all fields are static Python values.

    Attributes:
        image_size: H = W of the (square) input images.
        patch_size: P; must divide ``image_size``.
        channels: C of the input images.
        num_classes: Q; 0 builds the encoder only (the VLM's vision tower).
        d_model, num_heads, d_ff, num_layers: widths and depth.
        activation: FFN activation (dense and experts).
        norm: ``layernorm`` (ViT's) or ``rmsnorm``.
        dtype, param_dtype: compute and parameter dtypes (names or numpy dtypes).
        moe: the MoE layers; by default batch-prioritized (V-MoE's BPR), ``moe.layers=None`` is the V-MoE
            pattern, ``moe.group_size=None`` one routing group per image (a group of several images lets
            capacity even out between them).
    """

    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    num_classes: int = 10
    d_model: int = 64
    num_heads: int = 4
    d_ff: int = 128
    num_layers: int = 4
    activation: str = "gelu"
    norm: str = "layernorm"
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    moe: MoeConfig = dataclasses.field(default_factory=lambda: MoeConfig(batch_prioritized=True))

    _sections: ClassVar[dict[str, type]] = {"moe": MoeConfig}

    def __post_init__(self):
        names = ("image_size", "patch_size", "channels", "d_model", "num_heads", "d_ff", "num_layers")
        config_lib.check_model_widths(self, names)
        config_lib.check_int("num_classes", self.num_classes, 0)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; pick a "
                f"patch_size that divides it (e.g. {_divisors(self.image_size)})"
            )
        if not isinstance(self.moe, MoeConfig):
            raise ConfigError(f"moe={self.moe!r} must be a MoeConfig (or a mapping of its fields)")
        self.moe.check_layers(self.num_layers, f"num_layers={self.num_layers}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The MoE blocks (``moe.layers``, or the V-MoE pattern)."""
        return self.moe.layer_indices(self.num_layers, default=vmoe_layers)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_images(images_BHWC: jax.Array, *, image_size: int, channels: int, field: str = "image") -> None:
    """Raises a ``ValueError`` naming ``field`` unless images are ``[B, image_size, image_size, C]``."""
    shape = tuple(images_BHWC.shape)
    if len(shape) != 4:
        raise ValueError(f"{field} must have shape [batch, height, width, channels]; got shape {shape}")
    if shape[-1] != channels:
        raise ValueError(
            f"{field} has {shape[-1]} channels but the model expects channels={channels} (shape {shape})"
        )
    if shape[1:3] != (image_size, image_size):
        raise ValueError(
            f"{field} is {shape[1]}x{shape[2]} but the model expects image_size={image_size} "
            f"({image_size}x{image_size}); resize the images or set image_size"
        )


def patchify(images_BHWC: jax.Array, patch_size: int) -> jax.Array:
    """``[B, H, W, C]`` → ``[B, N, P·P·C]`` with patches in row-major order of the patch grid.

    Raises:
        ValueError: H or W is not divisible by ``patch_size`` (the message names the image size).
    """
    B, H, W, C = images_BHWC.shape
    if H % patch_size or W % patch_size:
        raise ValueError(
            f"image size {H}x{W} is not divisible by patch_size={patch_size}; pick a patch_size that divides "
            f"both sides"
        )
    x = images_BHWC.reshape(B, H // patch_size, patch_size, W // patch_size, patch_size, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // patch_size) * (W // patch_size), patch_size * patch_size * C)


class ViTEncoder(nnx.Module):
    """Patch embedding + learned positions + blocks + final norm: ``(tokens_BND, aux)``.

    ``aux`` maps ``vit/layer_<i>`` of each MoE block to the layer's aux dict.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = dtypes(cfg)
        Dp = cfg.patch_size * cfg.patch_size * cfg.channels
        init = nnx.initializers.lecun_normal()
        self.patch_w = sharding.param(
            init(rngs.params(), (Dp, cfg.d_model), dt["param_dtype"]), (None, "embed")
        )
        self.patch_b = sharding.param(jnp.zeros((cfg.d_model,), dt["param_dtype"]), ("embed",))
        self.pos = sharding.param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_patches, cfg.d_model), dt["param_dtype"]),
            (None, "embed"),
        )
        self.layers = make_blocks(
            cfg.num_layers,
            cfg.moe_layers,
            cfg.moe,
            d_model=cfg.d_model,
            num_heads=cfg.num_heads,
            d_ff=cfg.d_ff,
            activation=cfg.activation,
            norm=cfg.norm,
            **dt,
            rngs=rngs,
        )
        self.final_norm = Norm(cfg.d_model, cfg.norm, **dt)

    def __call__(self, images_BHWC: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, dict]:
        cfg = self.cfg
        check_images(images_BHWC, image_size=cfg.image_size, channels=cfg.channels)
        dtype = jnp.dtype(cfg.dtype)
        patches_BNP = patchify(images_BHWC.astype(dtype), cfg.patch_size)
        x_BND = patches_BNP @ self.patch_w[...].astype(dtype) + self.patch_b[...].astype(dtype)
        x_BND = sharding.constrain(x_BND + self.pos[...].astype(dtype)[None], _ACT_BLD)
        B, N = x_BND.shape[:2]
        # Image tokens see each other both ways.
        attn_mask_BNN = jnp.ones((B, N, N), bool)
        x_BND, aux = run_blocks(
            self.layers, x_BND, name="vit", attn_mask_BLL=attn_mask_BNN, deterministic=deterministic
        )
        return self.final_norm(x_BND), aux


class ViTClassifier(nnx.Module):
    """ViT (V-MoE) image classifier: encoder, mean pooling over patches, linear head.

    ``logits_BQ, aux = model(images_BHWC, deterministic=...)``; logits are float32.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg.num_classes, int) or cfg.num_classes < 1:
            raise ValueError(f"num_classes={cfg.num_classes!r} must be a positive integer for a classifier")
        self.cfg = cfg
        self.encoder = ViTEncoder(cfg, rngs=rngs)
        # Zero head: the first logits are uniform, so the initial loss is log(Q) whatever the encoder does.
        self.head_w = sharding.param(
            jnp.zeros((cfg.d_model, cfg.num_classes), jnp.dtype(cfg.param_dtype)), ("embed", None)
        )
        self.head_b = sharding.param(jnp.zeros((cfg.num_classes,), jnp.dtype(cfg.param_dtype)), (None,))

    def __call__(self, images_BHWC: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, dict]:
        x_BND, aux = self.encoder(images_BHWC, deterministic=deterministic)
        pooled_BD = jnp.mean(x_BND.astype(jnp.float32), axis=1)
        logits_BQ = pooled_BD @ self.head_w[...].astype(jnp.float32) + self.head_b[...].astype(jnp.float32)
        return logits_BQ, aux
