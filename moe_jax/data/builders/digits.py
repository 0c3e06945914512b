"""TFDS builder: scikit-learn's 1,797 bundled 8x8 handwritten digits (real scans, no download).

Each example is ``{'image': uint8[8, 8, 1], 'label': 0..9}``. The original 0..16 grey levels are scaled by 16
and clipped to 0..255, so the usual ``/ 255`` normalisation applies. The split is a content hash of the
pixels and label (70% train, 10% validation, 20% test; see :func:`common.split_of`): it is the same on every
machine, and duplicate images can never straddle train and test.

Prepare::

    SklearnDigits(data_dir=DIR, file_format='array_record').download_and_prepare()
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from moe_jax.data.builders import common

IMAGE_SIZE = 8
NUM_CLASSES = 10
# Per-mille cut points: 70% train, 10% validation, 20% test (the test split is the one reported).
SPLIT_PERMILLE = (700, 800)


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All digits as ``(uint8[N, 8, 8, 1] images, int64[N] labels)`` in scikit-learn's order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16.0, 0, 255).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def split_indices() -> dict[str, list[int]]:
    """Split name → indices into :func:`load_digits_uint8`, decided by a hash of each example's content."""
    images, labels = load_digits_uint8()
    out: dict[str, list[int]] = {s: [] for s in common.SPLITS}
    for i, (image, label) in enumerate(zip(images, labels)):
        key = common.example_key(image.tobytes().hex(), str(int(label)))
        out[common.split_of(key, SPLIT_PERMILLE)].append(i)
    return out


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """8x8 handwritten digits from ``sklearn.datasets.load_digits``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded: the data ships inside scikit-learn.
        images, labels = load_digits_uint8()
        return {
            split: self._generate_examples(images, labels, indices)
            for split, indices in split_indices().items()
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield i, {"image": images[i], "label": int(labels[i])}
