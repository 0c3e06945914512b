"""The quick API on images: ``SparseMoeModel(task='image_classification')`` (V-MoE ViT) on sklearn digits."""

import time

import numpy as np
import pytest

from moe_jax import SparseMoeModel
from moe_jax.api.vision import default_patch_size, pixel_statistics, standardize

EPOCHS = 15


@pytest.fixture(scope="module")
def digits_images():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(X))
    images = X[perm].reshape(-1, 8, 8, 1).astype(np.float32)  # pixel values 0-16
    return images[:1400], y[perm][:1400], images[1400:], y[perm][1400:]


@pytest.fixture(scope="module")
def digits_vit(digits_images):
    images, labels, _, _ = digits_images
    t0 = time.time()
    m = SparseMoeModel(task="image_classification", num_experts=4, top_k=2, d_model=32, num_layers=1)
    history = m.train(images, labels, epochs=EPOCHS, learning_rate=1e-2, batch_size=64)
    return m, history, time.time() - t0


def test_digits_image_classification_learns(digits_images, digits_vit):
    _, _, test_images, test_labels = digits_images
    m, history, seconds = digits_vit
    assert len(history["loss"]) == EPOCHS
    assert history["loss"][-1] < 0.1 * history["loss"][0], history["loss"]
    assert m._meta["patch_size"] == 2 and m._meta["channels"] == 1 and m._meta["image_size"] == 8
    pred = m.predict(test_images)
    assert pred.shape == test_labels.shape and pred.dtype.kind == "i"
    # Measured 0.967 on 397 held-out digits (15 epochs, 330 updates, ~10 s training on 2 shared cores, almost
    # all of it compilation); chance is 0.10.
    assert np.mean(pred == test_labels) > 0.9, (np.mean(pred == test_labels), seconds)


def test_prediction_does_not_depend_on_batch_size(digits_images, digits_vit):
    m = digits_vit[0]
    images = digits_images[2][:100]  # batch_size 64: the shape test_..._learns compiled
    np.testing.assert_array_equal(m.predict(images, batch_size=7), m.predict(images))


def test_save_load_predicts_identically(digits_images, digits_vit, tmp_path):
    m = digits_vit[0]
    images = digits_images[2][:100]
    m.save(tmp_path / "vit")
    loaded = SparseMoeModel.load(tmp_path / "vit")
    np.testing.assert_array_equal(loaded.predict(images), m.predict(images))
    assert loaded.task == "image_classification" and loaded._meta == m._meta
    assert loaded.model.cfg == m.model.cfg


def test_predict_errors_name_the_field(digits_images, digits_vit):
    m = digits_vit[0]
    images = digits_images[2][:4]
    with pytest.raises(ValueError, match="3 channels .*channels=1"):
        m.predict(np.repeat(images, 3, axis=-1))
    with pytest.raises(ValueError, match="16x16 images .*image_size=8"):
        m.predict(np.zeros((2, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        m.predict(images.astype(np.uint8))
    with pytest.raises(ValueError, match=r"images\[\.\.\., None\]"):
        m.predict(images[..., 0])


def test_pixel_scaling_and_standardization():
    """uint8 pixels are divided by 255, then standardized per channel with the training statistics."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 4, 4, 3), dtype=np.uint8)
    images[..., 2] = 7  # a constant channel: std 0 must not divide by zero
    stats = pixel_statistics(images)
    assert stats["uint8"]
    pixels = images.astype(np.float64) / 255.0
    mean, std = pixels.mean(axis=(0, 1, 2)), pixels.std(axis=(0, 1, 2))
    std[2] = 1.0
    np.testing.assert_allclose(standardize(images, stats), (pixels - mean) / std, atol=1e-5)
    # Float images are taken as they are (no ÷255), e.g. the digits' 0-16 values.
    floats = images.astype(np.float32)
    float_stats = pixel_statistics(floats)
    assert not float_stats["uint8"]
    np.testing.assert_allclose(float_stats["mean"], images.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(standardize(floats, float_stats), (pixels - mean) / std, atol=1e-5)


@pytest.mark.parametrize(
    "side,patch", [(8, 2), (28, 7), (32, 8), (224, 56), (10, 2), (7, 1), (12, 3), (1, 1)]
)
def test_default_patch_size_gives_about_16_patches(side, patch):
    # Hand-checked: 8x8 → 4x4 grid; 10 → 5x5 = 25 beats 2x2 = 4; 12 → 4x4; 7 → 49 beats 1 patch.
    assert default_patch_size(side) == patch


def test_train_errors_name_the_argument():
    m = SparseMoeModel(
        task="image_classification",
        num_experts=2,
        top_k=1,
        d_model=8,
        num_layers=1,
        num_heads=2,
        patch_size=3,
    )
    images, labels = np.zeros((4, 8, 8, 1), np.float32), np.array([0, 1, 0, 1])
    with pytest.raises(
        ValueError, match=r"patch_size=3 does not divide the image size 8x8; .*\[1, 2, 4, 8\]"
    ):
        m.train(images, labels, epochs=1)
    for data, match in [
        (images[:0], "data is empty"),
        (np.zeros((4, 8, 6, 1)), "8x6 images.*square"),
        (np.zeros((4, 8, 8)), r"\[N, height, width, channels\]"),
        (np.full((4, 8, 8, 1), np.nan), "NaN"),
        (np.array([["a"]] * 4), "numeric"),
    ]:
        with pytest.raises(ValueError, match=match):
            m.train(data, labels, epochs=1)
    with pytest.raises(ValueError, match="labels has 3 entries but data has 4"):
        m.train(images, labels[:3], epochs=1)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(vocab_size=10), "vocab_size"),
        (dict(channels=3), "channels"),
        (dict(moe_layers=(5,)), "moe_layers"),
        (dict(patch_size=0), "patch_size"),
        (dict(d_model=30, num_heads=4), "num_heads"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SparseMoeModel(task="image_classification", **kwargs)


def test_feature_classification_points_images_to_the_image_task():
    clf = SparseMoeModel(task="classification")
    with pytest.raises(ValueError, match="image_classification"):
        clf.train(np.zeros((4, 8, 8, 1), np.float32), np.array([0, 1, 0, 1]))
