"""Image classification (V-MoE ViT; top-1 accuracy) and the quick API's feature classifier."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.tasks.base import Task, data_dir, missing_data
from moe_jax.train.step import cross_entropy


def moe_field(section, name: str, default=None):
    """An MoE field of a model section (``section.moe.<name>``)."""
    moe = section.get("moe") if hasattr(section, "get") else None
    return (moe if moe is not None else section).get(name, default)


def check_group_sizes(config, checks) -> None:
    """Fails fast when an MoE ``group_size`` does not divide a batch's tokens (else the first step fails).

    Args:
        config: the run's config.
        checks: ``(field path, group size, tokens per example, what the tokens are)`` tuples.
    """
    for field, group, per_example, what in checks:
        if group is None:
            continue
        for batch_field, bs in (
            ("train.batch_size", config.train.batch_size),
            ("eval.batch_size", config.eval.batch_size),
        ):
            if (bs * per_example) % group:
                raise ConfigError(
                    f"config.{field}={group} must divide the {bs * per_example} tokens of a batch "
                    f"(config.{batch_field}={bs} x {per_example} {what}); pick a divisor (whole examples: a "
                    f"multiple of {per_example}), or None for one routing group per example"
                )


def num_patches(vision) -> int | None:
    if vision.image_size % vision.patch_size:
        return None  # build_model reports it, naming both fields
    return (vision.image_size // vision.patch_size) ** 2


def rows_loss_sums(logits_BQ, labels_B, row_weight_B, label_smoothing: float):
    """Summed cross-entropy and correct predictions over weighted rows."""
    ce_sum, correct = cross_entropy(
        logits_BQ[:, None], labels_B[:, None], row_weight_B[:, None], label_smoothing
    )
    return {"loss_sum": ce_sum, "correct_sum": correct, "weight_sum": row_weight_B.sum()}


class ImageClassificationTask(Task):
    """Images → class with a (V-MoE) ViT; the score is top-1 accuracy on the split."""

    train_keys = ("image", "label")
    eval_keys = ("image", "label", "row_weight")
    token_level = False
    identity_data_fields = ("source", "builder_config", "image_size", "channels", "num_classes")

    def validate(self, config, *, data_parallel: int) -> None:
        patches = num_patches(config.model)
        if patches is not None:
            check_group_sizes(
                config, [("model.moe.group_size", moe_field(config.model, "group_size"), patches, "patches")]
            )

    def load_data(self, config):
        from moe_jax.data import DatasetUnavailableError, vision

        try:
            return vision.make_image_data(config.data, data_dir=data_dir(config))
        except DatasetUnavailableError as e:
            raise missing_data(e) from None

    def build_model(self, config, data):
        from moe_jax.models.vit import ViTClassifier, ViTConfig

        try:
            return ViTClassifier(
                ViTConfig.from_mapping(config.model.to_dict()), rngs=nnx.Rngs(params=int(config.seed))
            )
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.model: {e}") from None

    def loss_sums(self, model, batch, *, dropout_key, deterministic):
        logits_BQ, aux = model(batch["image"], deterministic=deterministic)
        labels_B = batch["label"]
        weights_B = batch.get("row_weight", jnp.ones(labels_B.shape, jnp.float32))
        return rows_loss_sums(logits_BQ, labels_B, weights_B, self.label_smoothing), aux


def feature_loss_sums(model, batch, *, dropout_key, deterministic):
    """The quick API's :class:`~moe_jax.models.feature_classifier.FeatureClassifier` on ``x`` → ``y``."""
    logits_BQ, aux = model(batch["x"], dropout_key=dropout_key, deterministic=deterministic)
    labels_B = batch["y"]
    weights_B = batch.get("row_weight", jnp.ones(labels_B.shape, jnp.float32))
    return rows_loss_sums(logits_BQ, labels_B, weights_B, 0.0), aux
