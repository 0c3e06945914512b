"""Every config file and variant loads, validates and builds; model sections are strict; smoke trains."""

import dataclasses
import glob
import importlib.util
import os

import jax
import pytest
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.models import (
    DecoderLM,
    ModelConfig,
    MoeConfig,
    Seq2SeqTransformer,
    VisionLanguageModel,
    ViTClassifier,
    ViTConfig,
    VLMConfig,
)
from moe_jax.models.speech import SpeechConfig, SpeechTransformer
from moe_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_module(name):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name, variant):
    return load_module(name).get_config(variant)


VARIANTS = {
    "translation": ["default", "smoke", "large", "xl", "wmt14_de_en"],
    "summarization": ["default", "smoke", "cnn_dailymail", "xsum"],
    "image_classification": ["default", "smoke", "cifar10", "imagenet2012"],
    "vlm": ["default", "smoke", "coco_captions"],
    # The plan-only shapes (mixtral_8x7b, ...) are built and counted in tests/test_lm_configs.py.
    "lm": ["default", "dense", "smoke", "lm1b", "c4"],
    "speech": ["default", "smoke", "librispeech"],
}
# Config files named otherwise than their task.
TASK = {"lm": "language_modeling", "speech": "speech_recognition"}
VOCAB = 40  # the VLM's vocabulary comes from its tokenizer


def build_config(c):
    """The model config of a run's ``config.model``, as the tasks build it."""
    model = c.model.to_dict()
    if c.task in ("translation", "summarization", "language_modeling"):
        return ModelConfig.from_mapping(model, vocab_size=c.data.vocab_size)
    if c.task == "image_classification":
        return ViTConfig.from_mapping(model)
    if c.task == "speech_recognition":
        return SpeechConfig.from_mapping(model, vocab_size=VOCAB)
    return VLMConfig.from_mapping(model, vocab_size=VOCAB)


def build_abstract(c):
    cfg = build_config(c)
    models = {
        ModelConfig: Seq2SeqTransformer,
        ViTConfig: ViTClassifier,
        VLMConfig: VisionLanguageModel,
        SpeechConfig: SpeechTransformer,
    }
    cls = DecoderLM if c.task == "language_modeling" else models[type(cfg)]
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def test_every_config_file_is_covered():
    """Both ways: every file in configs/ is listed here, and every listed name is a file."""
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert sorted(files - set(VARIANTS)) == [], "config files without a test entry"
    assert sorted(set(VARIANTS) - files) == [], "test entries without a config file"


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in VARIANTS.items() for v in vs])
def test_config_loads_validates_and_builds(name, variant):
    c = load_config(name, variant)
    assert c.task == TASK.get(name, name)
    # Batch sizes of the big variants are multiples of 8 (the simulated devices), routing groups divide them.
    loop.validate_config(c)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(build_abstract(c), nnx.Param)))
    assert n > 0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_config_file_states_how_to_run_and_shares_one_moe_section(name):
    module = load_module(name)
    assert "python -m moe_jax.main --config=configs/" in module.__doc__
    assert "Hardware" in module.__doc__ and "Expected" in module.__doc__
    with open(os.path.join(ROOT, "configs", f"{name}.py")) as f:
        source = f.read()
    # The shared module is imported as a package, not loaded from a file path.
    assert "from moe_jax import config_lib" in source and "importlib" not in source
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("nope")
    moe_fields = {f.name for f in dataclasses.fields(MoeConfig)}
    for variant in VARIANTS[name]:
        c = module.get_config(variant)
        assert "kind" not in c.model
        sections = [c.model.moe] + ([c.model.vision.moe] if "vision" in c.model else [])
        for moe in sections:  # made by config_lib.moe_section: every MoeConfig field, nothing else
            assert set(moe) == moe_fields


STRICT_SECTIONS = [
    ("translation", "model"),
    ("translation", "model.moe"),
    ("summarization", "model.moe"),
    ("image_classification", "model"),
    ("image_classification", "model.moe"),
    ("vlm", "model"),
    ("vlm", "model.moe"),
    ("vlm", "model.vision"),
    ("vlm", "model.vision.moe"),
    ("speech", "model"),
    ("speech", "model.moe"),
]


def _section(c, path):
    section = c
    for part in path.split("."):
        section = section[part]
    return section


@pytest.mark.parametrize("name,path", STRICT_SECTIONS)
def test_unknown_key_in_any_section_is_a_one_line_error_naming_it(name, path):
    c = load_config(name, "smoke")
    _section(c, path).num_expertz = 3
    with pytest.raises(ConfigError) as e:
        build_config(c)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"config.{path}.num_expertz is not a field; known: "), message


def test_a_moe_field_left_in_the_model_section_says_where_it_belongs():
    c = load_config("vlm", "smoke")
    c.model.vision.top_k = 1  # the flat layout of older configs
    with pytest.raises(
        ConfigError,
        match=r"^config.model.vision.top_k is not a field \(it belongs in "
        r"config.model.vision.moe\); known: ",
    ):
        build_config(c)


@pytest.mark.parametrize(
    "name,field,value,message",
    [
        ("translation", "model.moe.top_k", 9, "config.model.moe.top_k=9 must be in [1, num_experts=4]"),
        ("translation", "model.moe.num_experts", 0, "config.model.moe.num_experts=0 must be a positive"),
        ("translation", "model.moe.router", "topk", "config.model.moe.router='topk' is unknown; choose"),
        ("translation", "model.moe.capacity_factor", -1.0, "config.model.moe.capacity_factor=-1.0 must"),
        ("translation", "model.moe.eval_capacity_factor", "x", "config.model.moe.eval_capacity_factor='x'"),
        ("translation", "model.moe.layers", (7,), "config.model.moe.layers=(7,) has indices [7] outside"),
        ("translation", "model.moe.router", "expert_choice", "config.model.moe.router='expert_choice' lets"),
        ("translation", "model.num_heads", 5, "config.model.d_model=32 must be divisible by num_heads=5"),
        ("image_classification", "model.patch_size", 3, "config.model.image_size=8 is not divisible by"),
        ("image_classification", "model.moe.top_k", 5, "config.model.moe.top_k=5 must be in [1, num_ex"),
        ("vlm", "model.moe.batch_prioritized", True, "config.model.moe.batch_prioritized=True ranks"),
        ("vlm", "model.vision.moe.top_k", 9, "config.model.vision.moe.top_k=9 must be in [1, num_experts"),
        ("vlm", "model.vision.num_classes", 10, "config.model.vision.num_classes=10 must be 0"),
    ],
)
def test_bad_values_name_their_config_path(name, field, value, message):
    c = load_config(name, "smoke")
    path, name = field.rsplit(".", 1)
    setattr(_section(c, path), name, value)
    with pytest.raises(ConfigError) as e:
        build_config(c)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_moe_overrides_of_every_kind_are_accepted():
    """None / numbers / tuples for the fields whose kind varies (what ``--config.model.moe.X=`` sets)."""
    c = load_config("translation", "smoke")
    c.model.moe.update(capacity_factor=None, eval_capacity_factor=2.0, layers=(0, 1), d_ff=16, group_size=8)
    cfg = build_config(c)
    assert cfg.moe.capacity_factor is None and cfg.moe.eval_capacity_factor == 2.0
    assert cfg.moe_layers(2) == (0, 1) and cfg.moe.d_ff == 16 and cfg.moe.group_size == 8


@pytest.mark.slow
@pytest.mark.parametrize("name", ["summarization"])
def test_smoke_variant_trains_one_step(name, tmp_path):
    c = load_config(name, "smoke")
    c.data.source = "synthetic"
    c.train.update(num_train_steps=1, eval_every=0, checkpoint_every=0)
    c.eval.max_decode_examples = 8
    final = loop.train_and_evaluate(c, str(tmp_path))
    assert {"val_loss", "greedy_rouge1", "beam_rougeL"} <= set(final)
