"""Vision configs: errors name the field; smoke variants train end to end; real-data variants take one step
on ``tfds.testing.mock_data`` (model shrunk to the smoke size, data path and names unchanged). Every variant
loading and building is in ``tests/test_configs.py``."""

import importlib.util
import json
import os

import pytest
import tensorflow_datasets as tfds

from moe_jax.errors import ConfigError
from moe_jax.tasks import get_task
from moe_jax.train import loop

_CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", os.path.join(_CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IC, VLM = _load("image_classification"), _load("vlm")


def test_bad_model_config_names_the_field():
    config = IC.get_config("smoke")
    config.model.patch_size = 3
    with pytest.raises(ConfigError, match="^config.model.image_size=8 is not divisible by patch_size=3"):
        get_task(config).build_model(config, None)


def test_group_size_that_does_not_divide_the_batch_names_the_fields():
    config = VLM.get_config("smoke")
    config.model.vision.moe.group_size = 48  # a batch of 8 images has 8 x 16 = 128 patches
    with pytest.raises(
        ConfigError,
        match=r"config.model.vision.moe.group_size=48 must divide the 128 tokens .*train.batch_size=8",
    ):
        loop.validate_config(config)
    config = VLM.get_config("smoke")
    config.model.moe.group_size = 40  # decoder: 16 patches + 16 text tokens per example
    with pytest.raises(ConfigError, match=r"config.model.moe.group_size=40 .*x 32 image \+ text tokens"):
        loop.validate_config(config)
    config = IC.get_config("default")
    config.eval.batch_size = 104  # 1,664 patches: not a multiple of the 256-token groups
    with pytest.raises(ConfigError, match=r"config.model.moe.group_size=256 .*eval.batch_size=104"):
        loop.validate_config(config)


def _fast(config, tmp_path, steps=1):
    config.data_dir = str(tmp_path / "data")
    config.train.update(num_train_steps=steps, eval_every=0, checkpoint_every=0, log_every=1)
    return config


def _shrink(config, smoke):
    """Smoke-sized model and batches on a real-data config (keeps its data section)."""
    config.model.update(
        {
            k: v
            for k, v in smoke.model.items()
            if k not in ("moe", "vision", "image_size", "channels", "num_classes")
        }
    )
    config.model.moe.update(smoke.model.moe.to_dict())
    config.model.moe.group_size = None
    if "vision" in config.model:
        config.model.vision.update(
            {
                k: v
                for k, v in smoke.model.vision.items()
                if k not in ("moe", "image_size", "channels", "patch_size")
            }
        )
        config.model.vision.moe.update(smoke.model.vision.moe.to_dict())
    config.train.batch_size = config.eval.batch_size = 8
    config.eval.update(max_eval_examples=8, max_decode_examples=2)
    return config


@pytest.mark.slow  # 20-30 s on 2 cores; CI runs the slow set
def test_image_classification_smoke_trains(tmp_path):
    config = _fast(IC.get_config("smoke"), tmp_path, steps=2)
    final = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert 0.0 <= final["test_accuracy"] <= 1.0 and final["test_loss"] > 0
    assert "test/moe/vit/layer_1/expert_load" in final
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]


@pytest.mark.slow  # ~30 s; the VLM step (skip, loss) is in the default suite through test_one_step.py
def test_vlm_smoke_trains_and_reports_modality_load(tmp_path):
    config = _fast(VLM.get_config("smoke"), tmp_path)
    final = loop.train_and_evaluate(config, str(tmp_path / "run"))
    for k in (
        "vqa_accuracy",
        "caption_bleu",
        "test_loss",
        "test/moe/decoder/layer_1/expert_load_image",
        "test/moe/decoder/layer_1/expert_load_text",
    ):
        assert k in final, k
    assert os.path.exists(tmp_path / "run" / "modality_load.png")


@pytest.mark.slow  # real-data variants run with the slow set, like the other tasks' (~15 s each)
@pytest.mark.parametrize("variant", ["cifar10", "imagenet2012"])
def test_real_classification_variant_one_step_on_mock_data(tmp_path, variant):
    config = _fast(_shrink(IC.get_config(variant), IC.get_config("smoke")), tmp_path)
    if variant == "imagenet2012":
        config.data.image_size = 32  # mock images are resized like real ones; 224 only costs time here
        config.model.patch_size = 8
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        final = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert final["test_loss"] > 0


# TFDS's coco_captions builder declares its features with TensorFlow dtypes, so tfds.testing.mock_data needs
# TensorFlow (an optional extra, not installed in CI); the next test fakes COCO's feature layout instead.


@pytest.mark.slow  # real-data variant (~23 s)
def test_coco_captions_variant_one_step_on_fake_source(tmp_path, monkeypatch):
    """The coco_captions path without TensorFlow: its feature layout (``captions``: {'text', 'id'}) faked."""
    import numpy as np

    from moe_jax.data import vision

    rng = np.random.default_rng(0)

    def fake_source(name, split, data_dir):
        assert name == "coco_captions" and split in ("train", "val", "test")
        return [
            {
                "image": rng.integers(0, 255, (40, 30, 3), dtype=np.uint8),
                "image/id": i,
                "captions": {
                    "text": np.array([b"a man riding a horse", b"a horse and a man"]),
                    "id": np.array([1, 2]),
                },
            }
            for i in range(12)
        ]

    monkeypatch.setattr(vision, "_tfds_source", fake_source)
    config = _fast(_shrink(VLM.get_config("coco_captions"), VLM.get_config("smoke")), tmp_path)
    config.data.image_size, config.model.vision.patch_size, config.data.max_text_len = 32, 8, 16
    final = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert "caption_bleu" in final and "vqa_accuracy" not in final
