"""Feature classification in the quick API (``task='classification'``): NumPy ``[N, F]`` or ``[N, L, F]``.

Features are standardized with the training set's mean and standard deviation and cut into tokens for a
:class:`~moe_jax.models.feature_classifier.FeatureClassifier` (how features become tokens is described
there); every update is the one :func:`moe_jax.train.step.train_step` over
:func:`moe_jax.tasks.classification.feature_loss_sums`. Images ``[N, H, W, C]`` belong
to ``task='image_classification'`` (``moe_jax/api/vision.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.api._common import check_classes, epoch_batches, label_indices, padded_chunks
from moe_jax.api.saved import CLASSES, POSITIVE_INT, check_fields, finite_list
from moe_jax.models.feature_classifier import FeatureClassifier

FEATURE_TASK = "classification"
# Quick-API option of this task that is not a ModelConfig field.
FEATURE_OPTIONS = {"patch_size": None}  # values per token of [N, F] features; default ceil(F / 8)
_MAX_AUTO_TOKENS = 8

_FEATURE_SHAPE = (
    lambda v: isinstance(v, list) and len(v) in (1, 2) and all(POSITIVE_INT[0](d) for d in v),
    "[features] or [L, features] (positive integers)",
)


def check_features_meta(meta: dict) -> None:
    """Checks what ``save`` stored about the features (``ValueError`` naming the ``meta`` field)."""
    check_fields(
        "meta",
        meta,
        {
            "feature_shape": _FEATURE_SHAPE,
            "token_dim": POSITIVE_INT,
            "num_tokens": POSITIVE_INT,
            "classes": CLASSES,
        },
    )
    shape, p, t = meta["feature_shape"], meta["token_dim"], meta["num_tokens"]
    check_fields("meta", meta, {"mean": finite_list(shape[-1]), "std": finite_list(shape[-1], positive=True)})
    cuts = (t - 1) * p < shape[0] <= t * p if len(shape) == 1 else [t, p] == shape
    if not cuts:
        raise ValueError(
            f"meta.token_dim={p} and meta.num_tokens={t} do not cut meta.feature_shape={shape} into tokens"
        )


class FeatureTask:
    """The feature-classification part of :class:`~moe_jax.api.SparseMoeModel` (a mixin)."""

    def _check_features(self, data) -> np.ndarray:
        if data is None or isinstance(data, str | bytes):
            raise ValueError(
                f"data must be a numeric array [N, features] or [N, L, features]; got {type(data).__name__}"
            )
        try:
            raw = np.asarray(data)
        except ValueError as e:  # ragged nested lists
            raise ValueError(
                f"data must be a numeric array [N, features] or [N, L, features] ({e})"
            ) from None
        if raw.dtype.kind == "O":  # e.g. lists holding None: convertible entries become NaN below
            try:
                raw = raw.astype(np.float32)
            except (TypeError, ValueError) as e:
                raise ValueError(f"data must be numeric; got non-numeric entries ({e})") from None
        if raw.dtype.kind not in "biuf":
            raise ValueError(f"data must be numeric (int, float or bool); got dtype {raw.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):  # too large for float32: refused below
            x = raw.astype(np.float32)
        if x.ndim == 4:
            raise ValueError(
                f"data has shape {x.shape}, which looks like images [N, height, width, channels]; use "
                "task='image_classification' for images (task='classification' takes [N, features] or "
                "[N, L, features])"
            )
        if x.ndim not in (2, 3):
            raise ValueError(f"data must have shape [N, features] or [N, L, features]; got shape {x.shape}")
        if x.shape[0] == 0:
            raise ValueError("data is empty; pass at least one example")
        if 0 in x.shape[1:]:
            raise ValueError(f"data has shape {x.shape}: no features per example")
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        if not finite.all():
            i = int(np.argmin(finite))
            raise ValueError(
                f"data[{i}] holds NaN, infinite or missing values (or ones too large for float32); "
                "fill or drop them"
            )
        if self._meta:
            want = tuple(self._meta["feature_shape"])
            if x.shape[1:] != want:
                raise ValueError(f"data has feature shape {x.shape[1:]} but the model was trained on {want}")
        return x

    def _build_features(self, cfg, rngs: nnx.Rngs) -> nnx.Module:
        meta = self._meta
        return FeatureClassifier(
            cfg,
            token_dim=meta["token_dim"],
            num_tokens=meta["num_tokens"],
            num_classes=len(meta["classes"]),
            rngs=rngs,
        )

    @staticmethod
    def _features_loss_sums(model, batch, *, dropout_key, deterministic):
        from moe_jax.tasks.classification import feature_loss_sums

        return feature_loss_sums(model, batch, dropout_key=dropout_key, deterministic=deterministic)

    def _tokens(self, x: np.ndarray) -> np.ndarray:
        """Standardized features → ``float32[N, T, P]`` tokens."""
        meta = self._meta
        x = (x - np.asarray(meta["mean"], np.float32)) / np.asarray(meta["std"], np.float32)
        if x.ndim == 3:
            return x.astype(np.float32)
        n, f = x.shape
        pad = meta["num_tokens"] * meta["token_dim"] - f
        x = np.pad(x, ((0, 0), (0, pad)))
        return x.reshape(n, meta["num_tokens"], meta["token_dim"]).astype(np.float32)

    def _prepare_features(self, x, y, batch_size, seed, epochs):
        if self._model is None:
            axes = (0,) if x.ndim == 2 else (0, 1)
            std = x.std(axis=axes)
            if x.ndim == 2:
                f = x.shape[1]
                p = int(self._extras["patch_size"] or math.ceil(f / _MAX_AUTO_TOKENS))
                token_dim, num_tokens = p, math.ceil(f / p)
            else:
                token_dim, num_tokens = x.shape[2], x.shape[1]
            self._meta = {
                "feature_shape": list(x.shape[1:]),
                "mean": x.mean(axis=axes).tolist(),
                "std": np.where(std > 1e-6, std, 1.0).tolist(),
                "token_dim": int(token_dim),
                "num_tokens": int(num_tokens),
                "classes": check_classes(y),
            }
            cfg = self._model_config(vocab_size=1, positions="learned", max_len=num_tokens)
            self._model = self._init(cfg)
        idx = label_indices(self._meta["classes"], y)
        rng = np.random.default_rng(seed)
        batches = epoch_batches({"x": self._tokens(x), "y": idx}, batch_size, epochs, rng)
        return batches, self._model

    def _predict_features(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        graphdef, state = nnx.split(self._model)
        if self._predict_fn is None:
            self._predict_fn = jax.jit(
                lambda state, x: jnp.argmax(nnx.merge(graphdef, state)(x, deterministic=True)[0], axis=-1)
            )
        tokens = self._tokens(x)
        # Rows are routed independently (one routing group per example), so padding changes nothing.
        preds = [
            np.asarray(self._predict_fn(state, chunk))[:rows]
            for chunk, rows in padded_chunks(tokens, min(batch_size, len(tokens)))
        ]
        return np.asarray(self._meta["classes"])[np.concatenate(preds)]
