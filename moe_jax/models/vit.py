"""Vision Transformer whose MLPs are sparse ``MoeLayer``s on a configurable pattern (V-MoE).

Shape letters are those of ``moe_jax/moe/__init__.py`` plus: H and W image height and width (pixels), C
channels, P patch side, N patches (image tokens), Dp = P·P·C the flattened patch, Q classes.

* :func:`patchify` cuts ``[B, H, W, C]`` images into ``[B, N, P·P·C]`` patches (row-major over the patch
  grid), failing with a ``ValueError`` that names the field when sizes or channels do not fit.
* :class:`Block` is the pre-norm block shared by the ViT and the VLM decoder: self-attention under any
  boolean mask, then a dense or MoE FFN; it can also report which experts tokens of each modality chose.
* :class:`ViTEncoder` embeds patches and runs the blocks; :class:`ViTClassifier` adds mean pooling and a
  linear head.

The V-MoE default places MoE FFNs on every other block of the last half (always including the last block),
e.g. blocks 5 and 7 of 8. Batch-prioritized routing (``batch_prioritized=True``) fills expert capacity by
each token's top-1 gate instead of its position, which V-MoE found lets a smaller capacity factor at
evaluation (``eval_capacity_factor``) drop only the least confident patches.

Capacity is per routing group: ``group_size`` tokens, by default (``None``) one image. An image's patches
are often alike (background) and crowd the same experts, so per-image groups drop many of them; groups of
several images pool capacity across images (the configs use 16 images per group: on the VLM's shape scenes
this took the image tokens dropped at evaluation from 37% to 1%, see ``configs/vlm.py``). A group must
divide batch × patches, and groups spanning images make an image's output depend on its batch neighbours.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding
from moe_jax.models.layers import Attention, DenseFFN, Norm
from moe_jax.models.transformer import MoeFields
from moe_jax.moe import MoeLayer

_ACT_BLD = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class ViTConfig(MoeFields):
    """Architecture of a (V-MoE) Vision Transformer; all fields are static Python values.

    Attributes:
        image_size: H = W of the (square) input images.
        patch_size: P; must divide ``image_size``.
        channels: C of the input images.
        num_classes: Q; 0 builds the encoder only (the VLM's vision tower).
        d_model, num_heads, d_ff, num_layers: widths and depth.
        moe_layers: indices of blocks with an MoE FFN; ``None`` is the V-MoE default (every other block of
            the last half); ``()`` is a dense ViT.
        batch_prioritized: capacity priority by top-1 gate (V-MoE's BPR), passed to
            :class:`~moe_jax.moe.MoeLayer` with the keyword-only
            :class:`~moe_jax.models.transformer.MoeFields` (``num_experts``, ``top_k``, ``moe_d_ff`` (default
            ``d_ff``), ``router``, ``capacity_factor``, ``eval_capacity_factor``, ``dispatch``,
            ``num_shared_experts``, ``jitter_noise`` and ``group_size``: tokens per routing group, ``None``
            for one group per image; a group of several images lets capacity even out between them).
        activation: FFN activation (dense and experts).
        norm: ``layernorm`` (ViT's) or ``rmsnorm``.
        dtype, param_dtype: compute and parameter dtypes (names or numpy dtypes).
    """

    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    num_classes: int = 10
    d_model: int = 64
    num_heads: int = 4
    d_ff: int = 128
    num_layers: int = 4
    moe_layers: tuple[int, ...] | None = None
    batch_prioritized: bool = True
    activation: str = "gelu"
    norm: str = "layernorm"
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        for name in ("image_size", "patch_size", "channels", "d_model", "num_heads", "d_ff", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; pick a "
                f"patch_size that divides it (e.g. {_divisors(self.image_size)})"
            )
        if self.moe_layers is not None:
            object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(
                    f"moe_layers={self.moe_layers} has indices {bad} outside [0, {self.num_layers})"
                )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides) -> ViTConfig:
        """Builds from a config mapping (extra keys such as ``kind`` are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(values).items() if k in names}
        kwargs.update(overrides)
        if kwargs.get("moe_layers") is not None:
            kwargs["moe_layers"] = tuple(kwargs["moe_layers"])
        return cls(**kwargs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        if self.moe_layers is not None:
            return self.moe_layers
        return vmoe_pattern(self.num_layers)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def vmoe_pattern(num_layers: int) -> tuple[int, ...]:
    """V-MoE's default: every other block of the last half, counted back from the last block."""
    return tuple(sorted(i for i in range(num_layers // 2, num_layers) if (num_layers - 1 - i) % 2 == 0))


def _dtypes(dtype, param_dtype) -> dict:
    return {"dtype": jnp.dtype(dtype), "param_dtype": jnp.dtype(param_dtype)}


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


def expert_counts_by_mask(moe: MoeLayer, h_BLD: jax.Array, masks: Mapping[str, jax.Array]) -> dict:
    """Per-expert assignment counts of the tokens selected by each mask (before capacity drops).

    Recomputes the layer's selection (router logits, softmax, selection bias, top-K) from the layer's own
    router weights instead of running the layer once per modality: routing a subset alone would change
    capacity competition and therefore the layer's output, while this reproduces exactly the assignments
    that the layer's ``expert_load`` counts, split by mask. The extra cost is one [T, D]×[D, E] matmul.
    Token-choice routers only (expert choice has no per-token selection to count this way).

    Args:
        moe: the layer whose routing to split.
        h_BLD: the layer's input (what ``moe(h_BLD)`` receives).
        masks: name → ``bool[B, L]``; masks should be disjoint and exclude padding.

    Returns:
        ``{name: float32[E]}``: how many of the masked tokens' K assignments chose each expert (no gradient).
    """
    logits_BLE = h_BLD.astype(jnp.float32) @ moe.router[...].astype(jnp.float32)
    scores_BLE = jax.nn.softmax(logits_BLE, axis=-1)
    if moe.selection_bias is not None:
        scores_BLE = scores_BLE + moe.selection_bias[...]
    _, expert_BLK = jax.lax.top_k(scores_BLE, moe.top_k)
    onehot_BLE = jax.nn.one_hot(expert_BLK, moe.num_experts, dtype=jnp.float32).sum(axis=2)
    return {
        name: jax.lax.stop_gradient(jnp.einsum("ble,bl->e", onehot_BLE, m.astype(jnp.float32)))
        for name, m in masks.items()
    }


class Block(nnx.Module):
    """Pre-norm block: self-attention under a boolean mask, then a dense or MoE FFN.

    Args:
        d_model, num_heads, d_ff: widths.
        moe_kwargs: ``None`` for a dense FFN, else keyword arguments of :class:`~moe_jax.moe.MoeLayer`
            (``num_experts``, ``top_k``, ``d_ff`` override, ``capacity_factor``, ``causal``, ...).
        activation, norm: FFN activation and norm kind.
        use_rope: rotary positions on queries/keys (the VLM decoder); the ViT adds learned positions instead.
        dtype, param_dtype: compute and parameter dtypes.
        rngs: initialisation randomness.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        *,
        moe_kwargs: Mapping | None,
        activation: str = "gelu",
        norm: str = "layernorm",
        use_rope: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        dt = {"dtype": dtype, "param_dtype": param_dtype}
        self.attn_norm = Norm(d_model, norm, **dt)
        self.attn = Attention(d_model, num_heads, use_rope=use_rope, **dt, rngs=rngs)
        self.ffn_norm = Norm(d_model, norm, **dt)
        self.use_moe = moe_kwargs is not None
        if self.use_moe:
            kwargs = dict(moe_kwargs)
            moe_d_ff = kwargs.pop("d_ff", None) or d_ff
            num_experts, top_k = kwargs.pop("num_experts"), kwargs.pop("top_k")
            self.ffn = MoeLayer(
                d_model, moe_d_ff, num_experts, top_k, activation=activation, **kwargs, **dt, rngs=rngs
            )
        else:
            self.ffn = DenseFFN(d_model, d_ff, activation, **dt, rngs=rngs)

    def __call__(
        self,
        x_BLD: jax.Array,
        *,
        attn_mask_BLL: jax.Array,
        mask_BL: jax.Array | None = None,
        positions_BL: jax.Array | None = None,
        deterministic: bool = True,
        split_masks: Mapping[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict | None]:
        """Returns ``(x_BLD, aux)``; ``aux`` is None for a dense FFN.

        Args:
            x_BLD: the residual stream.
            attn_mask_BLL: True where query i may attend key j.
            mask_BL: real tokens (MoE routing skips the rest); default all.
            positions_BL: token positions for RoPE.
            deterministic: evaluation mode of the MoE layer (eval capacity factor, no jitter).
            split_masks: name → ``bool[B, L]``; adds ``expert_count_<name>`` [E] to ``aux`` (see
                :func:`expert_counts_by_mask`).
        """
        h = self.attn_norm(x_BLD)
        x_BLD = x_BLD + self.attn(h, h, attn_mask_BLL, positions_BL=positions_BL, positions_BK=positions_BL)
        h = self.ffn_norm(x_BLD)
        aux = None
        if self.use_moe:
            y, aux = self.ffn(h, mask_BL=mask_BL, deterministic=deterministic)
            if split_masks:
                counts = expert_counts_by_mask(self.ffn, h, split_masks)
                aux = {**aux, **{f"expert_count_{k}": v for k, v in counts.items()}}
        else:
            y = self.ffn(h)
        return sharding.constrain(x_BLD + y.astype(x_BLD.dtype), _ACT_BLD), aux


def moe_kwargs_of(cfg: Any, *, causal: bool = False) -> dict:
    """MoE keyword arguments for :class:`Block` from a config carrying the MoE fields."""
    return dict(
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        d_ff=cfg.moe_d_ff,
        router=cfg.router,
        capacity_factor=cfg.capacity_factor,
        eval_capacity_factor=cfg.eval_capacity_factor,
        batch_prioritized=cfg.batch_prioritized,
        dispatch=cfg.dispatch,
        group_size=cfg.group_size,
        jitter_noise=cfg.jitter_noise,
        num_shared_experts=cfg.num_shared_experts,
        selection_bias=cfg.selection_bias,
        selection_bias_rate=cfg.selection_bias_rate,
        grouped_backend=cfg.grouped_backend,
        expert_parallel=cfg.expert_parallel,
        causal=causal,
    )


class ViTEncoder(nnx.Module):
    """Patch embedding + learned positions + blocks + final norm: ``(tokens_BND, aux)``.

    ``aux`` maps ``vit/layer_<i>`` of each MoE block to the layer's aux dict.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = _dtypes(cfg.dtype, cfg.param_dtype)
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
        moe_set = set(cfg.moe_layer_indices)
        self.layers = nnx.List(
            [
                Block(
                    cfg.d_model,
                    cfg.num_heads,
                    cfg.d_ff,
                    moe_kwargs=moe_kwargs_of(cfg) if i in moe_set else None,
                    activation=cfg.activation,
                    norm=cfg.norm,
                    **dt,
                    rngs=rngs,
                )
                for i in range(cfg.num_layers)
            ]
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
        aux = {}
        for i, layer in enumerate(self.layers):
            x_BND, layer_aux = layer(x_BND, attn_mask_BLL=attn_mask_BNN, deterministic=deterministic)
            if layer_aux is not None:
                aux[f"vit/layer_{i}"] = layer_aux
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


def moe_layer_names(cfg: ViTConfig) -> Sequence[str]:
    """The aux keys the classifier reports, in block order."""
    return [f"vit/layer_{i}" for i in cfg.moe_layer_indices]
