"""Vision data: the digits and shape-scene builders, Grain pipelines, tokenizer, input errors."""

import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moe_jax.data import vision
from moe_jax.data.builders import digits, shapes_scenes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vision_data"))


def _ns(**kw):
    return types.SimpleNamespace(**kw)


def test_digits_split_is_deterministic_and_disjoint():
    a, b = digits.split_indices(), digits.split_indices()
    assert a == b
    sizes = {s: len(v) for s, v in a.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] > 300 and sizes["train"] > 1200
    assert not set(a["train"]) & set(a["test"]) and not set(a["train"]) & set(a["validation"])


def test_image_classification_batches(data_dir):
    data = vision.make_image_data(
        _ns(source="sklearn_digits", image_size=8, channels=1, num_classes=10, random_shift=1),
        data_dir=data_dir,
    )
    assert {s: len(v) for s, v in data.sources.items()} == {
        s: len(v) for s, v in digits.split_indices().items()
    }
    batch = next(data.train_iter(16, seed=3))
    assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    # Same seed, same batches; another seed, another order.
    again = next(data.train_iter(16, seed=3))
    np.testing.assert_array_equal(batch["image"], again["image"])
    assert not np.array_equal(batch["label"], next(data.train_iter(16, seed=4))["label"])
    batches = list(data.eval_batches("test", 128))
    assert all(b["image"].shape == (128, 8, 8, 1) for b in batches)
    assert sum(float(b["row_weight"].sum()) for b in batches) == len(data.sources["test"])


def test_scenes_are_deterministic_and_consistent():
    s1 = shapes_scenes.render_scene(0, "train", 7)
    s2 = shapes_scenes.render_scene(0, "train", 7)
    np.testing.assert_array_equal(s1["image"], s2["image"])
    assert s1["caption"] == s2["caption"] and s1["answers"] == s2["answers"]
    assert not np.array_equal(s1["image"], shapes_scenes.render_scene(1, "train", 7)["image"])
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b, rel = shapes_scenes.sample_scene(rng, 32)
        assert a.shape != b.shape
        dx, dy = a.cx - b.cx, a.cy - b.cy
        expected = (
            ("left of" if dx < 0 else "right of") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        )
        assert rel == expected
    scene = shapes_scenes.render_scene(0, "test", 3)
    assert len(scene["questions"]) == shapes_scenes.NUM_QUESTIONS == len(scene["answers"])
    words = set(shapes_scenes.vocabulary())
    for text in [scene["caption"], *scene["questions"], *scene["answers"]]:
        assert set(text.replace("?", "").split()) <= words, text
    # The caption's colours are painted in the image.
    for colour, rgb in shapes_scenes.COLOURS.items():
        if f" {colour} " in f" {scene['caption']} ":
            assert (scene["image"] == np.array(rgb, np.uint8)).all(-1).any()


def test_vlm_batches_and_tokenizer(data_dir):
    cfg = _ns(source="shapes_scenes", builder_config="tiny", image_size=16, channels=3, max_text_len=16)
    data = vision.make_vlm_data(cfg, data_dir=data_dir)
    tok = data.tokenizer
    assert (
        tok.decode(tok.encode("What colour is the square left of the circle?"))
        == "what colour is the square left of the circle?"
    )
    batch = next(data.train_iter(8, seed=0))
    assert batch["image"].shape == (8, 16, 16, 3)
    for k in ("text", "targets", "token_weight"):
        assert batch[k].shape == (8, 16), k
    # Targets are the inputs shifted left; weights cover exactly the answer / caption tokens and EOS.
    np.testing.assert_array_equal(
        batch["targets"][:, :-1][batch["text"][:, 1:] != 0], batch["text"][:, 1:][batch["text"][:, 1:] != 0]
    )
    for row in range(8):
        w = batch["token_weight"][row]
        assert w.sum() > 0 and batch["targets"][row][w > 0][-1] == vision.EOS_ID
    again = next(data.train_iter(8, seed=0))
    np.testing.assert_array_equal(batch["text"], again["text"])
    vqa = next(data.eval_batches("test", 8, kind="vqa"))
    n = int(vqa["prompt_len"][0])
    assert vqa["prompt"][0, n - 1] == vision.ANSWER_ID and vqa["prompt"][0, n] == 0
    assert tok.decode(vqa["targets"][0][vqa["token_weight"][0] > 0]) == vqa["target_text"][0]
    cap = next(data.eval_batches("test", 8, kind="caption"))
    assert int(cap["prompt_len"][0]) == 2 and tok.decode(cap["targets"][0][1:]) == cap["target_text"][0]


def test_encode_task_positions():
    tok = vision.WordTokenizer(["red", "what", "colour", "?"])
    out = vision.encode_task(tok, "vqa", "what colour?", "red", 8)
    ids = {w: i for i, w in enumerate(tok.words)}
    full = [
        vision.BOS_ID,
        vision.QUESTION_ID,
        ids["what"],
        ids["colour"],
        ids["?"],
        vision.ANSWER_ID,
        ids["red"],
        vision.EOS_ID,
    ]
    np.testing.assert_array_equal(out["text"][:7], full[:-1])
    np.testing.assert_array_equal(out["targets"][:7], full[1:])
    np.testing.assert_array_equal(out["token_weight"], [0, 0, 0, 0, 0, 1, 1, 0])
    assert int(out["prompt_len"]) == 6


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="image has shape .*channels=3"):
        vision.preprocess_image(np.zeros((8, 8, 1), np.uint8), image_size=8, channels=3)
    with pytest.raises(ValueError, match="caption of example 5 .* is empty"):
        vision.scene_record({"image": np.zeros((4, 4, 3)), "caption": b"  "}, 5, "train")
    with pytest.raises(ValueError, match="caption"):
        vision.scene_record({"image": np.zeros((4, 4, 3)), "captions": {"text": [b"a dog", b""]}}, 0, "val")
    # Other sizes are centre-cropped and resized.
    out = vision.preprocess_image(np.full((20, 30, 3), 255, np.uint8), image_size=8, channels=3)
    assert out.shape == (8, 8, 3) and np.allclose(out, 1.0)


@pytest.mark.parametrize("name,split,size", [("cifar10", "test", 32), ("imagenet2012", "validation", 24)])
def test_real_classification_names_read_with_mock_data(data_dir, name, split, size):
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        data = vision.make_image_data(
            _ns(
                source=name,
                image_size=size,
                channels=3,
                num_classes=10,
                splits={"train": "train", "validation": split, "test": split},
            ),
            data_dir=data_dir,
        )
        batch = next(data.train_iter(4, seed=0))
        assert batch["image"].shape == (4, size, size, 3) and batch["label"].dtype == np.int32
        assert next(data.eval_batches("test", 8))["row_weight"].sum() == 8


def test_missing_real_data_is_a_one_line_error(data_dir):
    with pytest.raises(vision.DatasetUnavailableError, match="tfds build cifar10"):
        vision.make_image_data(
            _ns(source="cifar10", image_size=32, channels=3, num_classes=10), data_dir=data_dir
        )
