"""Image classification in the quick API (``task='image_classification'``): NumPy images ``[N, H, W, C]``.

The model is the project's V-MoE Vision Transformer (:class:`~moe_jax.models.vit.ViTClassifier`) and every
update is the one :func:`moe_jax.train.step.train_step` over the classification loss sums
(:func:`moe_jax.tasks.classification.rows_loss_sums`), so the quick API and
``configs/image_classification.py`` train the same model the same way.

What the first :meth:`~moe_jax.api.SparseMoeModel.train` call decides from the data (and ``save`` stores):

* image size (square images only: the ViT has one ``image_size``) and channels; :meth:`predict` refuses
  another size or channel count with a ``ValueError`` naming ``image_size`` or ``channels``;
* pixel scaling: ``uint8`` images are divided by 255 (other dtypes are taken as they are), then every
  channel is standardized with the training set's mean and standard deviation. Prediction must use the same
  kind of dtype (uint8 vs not) as training, since the scaling depends on it;
* ``patch_size`` (unless given): the divisor of the image side whose patch grid is closest to 4×4 = 16
  patches (ties go to more patches), e.g. 2 for 8×8 digits, 7 for 28×28, 8 for 32×32. A ``patch_size``
  that does not divide the image side is refused with a message naming both.

Routing: unless overridden, every block's MLP is a batch-prioritized MoE layer, each image is its own routing
group (so a prediction never depends on the other images of its batch) and capacity at evaluation is
``2 · capacity_factor`` (V-MoE evaluates with a larger capacity than it trains with). A ``group_size``
override that spans images pools capacity across them, as ``configs/image_classification.py`` does; it
must divide ``batch_size × patches``, and predictions then depend on which images share a batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.api._common import (
    build_config,
    check_classes,
    epoch_batches,
    label_indices,
    padded_chunks,
)
from moe_jax.api.saved import BOOL, CLASSES, POSITIVE_INT, check_fields, finite_list
from moe_jax.models.vit import ViTClassifier, ViTConfig

IMAGE_TASK = "image_classification"
# Quick-API option of this task that is not a ViTConfig field (the other ViTConfig fields that follow the
# data are refused as overrides).
IMAGE_OPTIONS = {"patch_size": None}  # patch side in pixels; default: see default_patch_size
_DATA_FIELDS = ("image_size", "channels", "num_classes", "patch_size")
_TARGET_PATCHES = 16


def default_patch_size(image_size: int) -> int:
    """The divisor P of ``image_size`` whose (image_size / P)² patches are closest to 16 (log scale).

    Ties go to the smaller patch (more tokens). 16 patches keep a small ViT fast on a CPU while leaving the
    router several tokens per image to spread over experts.
    """
    divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
    return min(divisors, key=lambda p: (abs(math.log((image_size // p) ** 2 / _TARGET_PATCHES)), p))


def image_model_fields(
    *, d_model: int, num_layers: int, capacity_factor: float | None
) -> tuple[set[str], dict, dict]:
    """(ViTConfig fields a user may override, the quick API's defaults for them, its MoE defaults)."""
    names = {f.name for f in dataclasses.fields(ViTConfig)} - set(_DATA_FIELDS) - {"moe"}
    defaults = {
        "d_model": d_model,
        "num_heads": 4 if d_model % 4 == 0 else 1,
        "d_ff": 2 * d_model,
        "num_layers": num_layers,
    }
    moe = {
        "eval_capacity_factor": None if capacity_factor is None else 2.0 * capacity_factor,
        "batch_prioritized": True,
        "group_size": None,
    }
    return names, defaults, moe


def check_image_model_fields(model: dict) -> None:
    """Validates the architecture before any data is seen (the errors name the argument)."""
    build_config(ViTConfig, model, image_size=1, patch_size=1, channels=1, num_classes=1)


def check_images_meta(meta: dict, cfg: ViTConfig) -> None:
    """Checks the stored image shaping against the ViT config (``ValueError`` naming the field)."""
    check_fields(
        "meta",
        meta,
        {
            "image_size": POSITIVE_INT,
            "channels": POSITIVE_INT,
            "patch_size": POSITIVE_INT,
            "uint8": BOOL,
            "classes": CLASSES,
        },
    )
    channels = meta["channels"]
    check_fields("meta", meta, {"mean": finite_list(channels), "std": finite_list(channels, positive=True)})
    if meta["image_size"] % meta["patch_size"]:
        raise ValueError(
            f"meta.patch_size={meta['patch_size']} does not divide meta.image_size={meta['image_size']}"
        )
    pairs = [(k, meta[k], getattr(cfg, k)) for k in ("image_size", "channels", "patch_size")]
    pairs.append(("num_classes", len(meta["classes"]), cfg.num_classes))
    for name, stored, model in pairs:
        if stored != model:
            what = f"meta.{name}={stored}" if name != "num_classes" else f"meta.classes has {stored} classes"
            raise ValueError(f"{what} but model_config.{name}={model}")


def pixel_statistics(images: np.ndarray) -> dict:
    """What standardization needs from the training images: ``{'uint8', 'mean', 'std'}`` (per channel).

    ``uint8`` images are divided by 255 first. A constant channel gets ``std`` 1 instead of 0.
    """
    uint8 = images.dtype == np.uint8
    pixels = images.astype(np.float32) / (255.0 if uint8 else 1.0)
    std = pixels.std(axis=(0, 1, 2))
    return {
        "uint8": bool(uint8),
        "mean": pixels.mean(axis=(0, 1, 2)).tolist(),
        "std": np.where(std > 1e-6, std, 1.0).tolist(),
    }


def standardize(images: np.ndarray, stats: dict) -> np.ndarray:
    """Images → ``float32[N, H, W, C]`` standardized with ``stats`` from :func:`pixel_statistics`."""
    pixels = images.astype(np.float32) / (255.0 if stats["uint8"] else 1.0)
    return (pixels - np.asarray(stats["mean"], np.float32)) / np.asarray(stats["std"], np.float32)


# Module level with a static graphdef: a loaded model (equal graphdef) reuses the compiled program.
@functools.partial(jax.jit, static_argnums=0)
def _predict_labels(graphdef, state, images_BHWC):
    logits_BQ, _ = nnx.merge(graphdef, state)(images_BHWC, deterministic=True)
    return jnp.argmax(logits_BQ, axis=-1)


class ImageTask:
    """The image-classification part of :class:`~moe_jax.api.SparseMoeModel` (a mixin)."""

    def _check_images(self, data) -> np.ndarray:
        if data is None or isinstance(data, str | bytes):
            raise ValueError(f"data must be images [N, height, width, channels]; got {type(data).__name__}")
        try:
            x = np.asarray(data)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"data must be images [N, height, width, channels] of one size ({e})") from None
        if x.dtype.kind not in "uifb":
            raise ValueError(f"data must be numeric images [N, height, width, channels]; got dtype {x.dtype}")
        if x.ndim != 4:
            hint = "; add a channel axis for grayscale (images[..., None])" if x.ndim == 3 else ""
            raise ValueError(f"data must be images [N, height, width, channels]; got shape {x.shape}{hint}")
        if x.shape[0] == 0:
            raise ValueError("data is empty; pass at least one image")
        if 0 in x.shape[1:]:
            raise ValueError(
                f"data has shape {x.shape}: images need a height, width and channels of at least 1"
            )
        if x.shape[1] != x.shape[2]:
            raise ValueError(
                f"data holds {x.shape[1]}x{x.shape[2]} images; image_classification needs square images "
                "(one image_size): crop or resize them"
            )
        if x.dtype.kind == "f":
            finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
            if not finite.all():
                i = int(np.argmin(finite))
                raise ValueError(f"data[{i}] holds NaN or infinite pixel values; fill or drop that image")
        if self._meta:
            meta = self._meta
            if x.shape[-1] != meta["channels"]:
                raise ValueError(
                    f"data has {x.shape[-1]} channels but the model was trained with "
                    f"channels={meta['channels']} (shape {x.shape})"
                )
            if x.shape[1] != meta["image_size"]:
                side = meta["image_size"]
                raise ValueError(
                    f"data holds {x.shape[1]}x{x.shape[2]} images but the model was trained with "
                    f"image_size={side} ({side}x{side}); resize them"
                )
            if (x.dtype == np.uint8) != meta["uint8"]:
                trained = "uint8" if meta["uint8"] else "non-uint8"
                raise ValueError(
                    f"data has dtype {x.dtype} but the model was trained on {trained} images; pixel scaling "
                    "depends on it (uint8 is divided by 255), so pass the same kind as in training"
                )
        return x

    def _build_images(self, cfg: ViTConfig, rngs: nnx.Rngs) -> nnx.Module:
        return ViTClassifier(cfg, rngs=rngs)

    @staticmethod
    def _images_loss_sums(model, batch, *, dropout_key, deterministic):
        from moe_jax.tasks.classification import rows_loss_sums

        del dropout_key  # the ViT has no dropout
        logits_BQ, aux = model(batch["image"], deterministic=deterministic)
        labels_B = batch["label"]
        return rows_loss_sums(logits_BQ, labels_B, jnp.ones(labels_B.shape, jnp.float32), 0.0), aux

    def _prepare_images(self, x, y, batch_size, seed, epochs):
        if self._model is None:
            side, channels = int(x.shape[1]), int(x.shape[3])
            patch = self._extras["patch_size"]
            patch = default_patch_size(side) if patch is None else int(patch)
            if side % patch:
                divisors = [p for p in range(1, side + 1) if side % p == 0]
                raise ValueError(
                    f"patch_size={patch} does not divide the image size {side}x{side}; pick one of {divisors}"
                )
            self._meta = {
                "image_size": side,
                "channels": channels,
                "patch_size": patch,
                **pixel_statistics(x),
                "classes": check_classes(y),
            }
            cfg = build_config(
                ViTConfig,
                self._model_fields,
                image_size=side,
                patch_size=patch,
                channels=channels,
                num_classes=len(self._meta["classes"]),
            )
            self._model = self._init(cfg)
        idx = label_indices(self._meta["classes"], y)
        rng = np.random.default_rng(seed)
        batches = epoch_batches({"image": standardize(x, self._meta), "label": idx}, batch_size, epochs, rng)
        return batches, self._model

    def _predict_images(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        graphdef, state = nnx.split(self._model)
        pixels = standardize(x, self._meta)
        # With the default per-image routing groups, the zero padding of the last chunk changes nothing.
        preds = [
            np.asarray(_predict_labels(graphdef, state, chunk))[:rows]
            for chunk, rows in padded_chunks(pixels, min(batch_size, len(pixels)))
        ]
        return np.asarray(self._meta["classes"])[np.concatenate(preds)]
