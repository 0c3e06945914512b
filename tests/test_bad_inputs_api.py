"""The quick API's catalogue of hostile inputs and faults: one table, each a ``ValueError`` naming it.

Every case asserts a ``ValueError`` (any other exception type fails the test) whose message holds each of its
needles (the argument, the index of the bad example, the file, the tensor and both shapes ...), raised by
the quick API's own checks (the last traceback frame is in ``moe_jax/api``), not by a library underneath.
Cases that need a trained model share three tiny ones, trained once per module; ``load()`` cases copy a
saved directory, damage the copy, and check that the failed load left every file byte-identical.
The CLI's catalogue is ``tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flax import serialization

from moe_jax import SparseMoeModel

# Tiny on purpose: the fixtures only have to exist, not to learn.
TINY = dict(num_experts=2, top_k=1, d_model=8, num_layers=1)
X = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
Y = np.array([0, 1] * 4)
IMAGES = np.random.default_rng(1).random((8, 4, 4, 1)).astype(np.float32)
PAIRS = (["good morning", "thank you"], ["guten Morgen", "danke"])


def _train_clf():
    m = SparseMoeModel(task="classification", **TINY)
    m.train(X, Y, epochs=1, batch_size=8)
    return m


def _train_vit():
    m = SparseMoeModel(task="image_classification", **TINY)
    m.train(IMAGES, Y, epochs=1, batch_size=8)
    return m


def _train_translation():
    # Dense blocks: the sequence model is here for its tokenizer file, and compiles twice as fast without MoE.
    m = SparseMoeModel(task="translation", moe_layers=(), **TINY)
    m.train(*PAIRS, epochs=1)
    return m


_TRAINERS = {"clf": _train_clf, "vit": _train_vit, "translation": _train_translation}


def _train_lm():
    # Dense blocks, like the translation model: here for its files and its predict() checks.
    m = SparseMoeModel(task="language_modeling", moe_layers=(), **TINY)
    m.train(list(PAIRS[0]), epochs=1)
    return m


_TRAINERS["lm"] = _train_lm


class Trained:
    """The tiny trained models and their saved directories, each built on first use, once per module."""

    def __init__(self, root: Path):
        self.root, self._models = root, {}

    def model(self, name: str) -> SparseMoeModel:
        if name not in self._models:
            self._models[name] = _TRAINERS[name]()
            self._models[name].save(self.root / name)
        return self._models[name]

    def saved(self, name: str) -> Path:
        self.model(name)
        return self.root / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    return Trained(tmp_path_factory.mktemp("saved"))


@dataclasses.dataclass(frozen=True)
class Ctx:
    trained: Trained
    tmp: Path

    def model(self, name: str) -> SparseMoeModel:
        return self.trained.model(name)


@dataclasses.dataclass(frozen=True)
class Case:
    """``call(ctx)`` must raise a ``ValueError`` holding every needle.

    A ``load()`` case instead names the saved model to copy (``source``) and how to ``damage`` the copy
    (``damage(dir, trained)``); the test then calls ``SparseMoeModel.load`` on it.
    """

    id: str
    needles: tuple[str, ...]
    call: Callable[[Ctx], Any] | None = None
    source: str | None = None
    damage: Callable[[Path, Trained], None] | None = None


def new(task: str, **kwargs) -> SparseMoeModel:
    return SparseMoeModel(task=task, **{**TINY, **kwargs})


def a_file(ctx: Ctx) -> Path:
    (ctx.tmp / "a_file").write_text("not a model directory")
    return ctx.tmp / "a_file"


def train(task: str, data, labels, **kwargs):
    return lambda ctx: new(task).train(data, labels, **kwargs)


# ------------------------------------------------------------------------------------ damage helpers


def edit_config(fn: Callable[[dict], None]):
    def damage(d: Path, trained: Trained) -> None:
        config = json.loads((d / "config.json").read_text())
        fn(config)
        (d / "config.json").write_text(json.dumps(config))

    return damage


def write(name: str, data: bytes):
    return lambda d, trained: (d / name).write_bytes(data)


def truncate(name: str, keep: float = 0.5):
    def damage(d: Path, trained: Trained) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def remove(name: str):
    return lambda d, trained: (d / name).unlink()


def copy_from(source: str, name: str):
    return lambda d, trained: shutil.copyfile(trained.saved(source) / name, d / name)


def poison_state(d: Path, trained: Trained) -> None:
    """A well-formed state whose first weight matrix holds a NaN (a bit flip inside a float)."""
    state = serialization.msgpack_restore((d / "state.msgpack").read_bytes())
    state["embed_w"] = state["embed_w"].copy()
    state["embed_w"][0, 0] = np.nan
    (d / "state.msgpack").write_bytes(serialization.msgpack_serialize(state))


def _setitem(path: tuple, value):
    def fn(config: dict) -> None:
        *parents, last = path
        node = config
        for key in parents:
            node = node[key]
        node[last] = value

    return fn


# ------------------------------------------------------------------------------------------ the table

_ragged = [[1.0, 2.0], [3.0]]

CASES = [
    # Constructor.
    Case(
        "ctor-unknown-task",
        ("task='regression'", "choose one of"),
        lambda c: SparseMoeModel(task="regression"),
    ),
    Case("ctor-task-none", ("task=None",), lambda c: SparseMoeModel(task=None)),
    Case(
        "ctor-top-k-above-experts",
        ("top_k=5", "num_experts=4"),
        lambda c: SparseMoeModel(num_experts=4, top_k=5),
    ),
    Case("ctor-unknown-override", ("not_a_field",), lambda c: SparseMoeModel(not_a_field=1)),
    Case("ctor-num-heads-string", ("num_heads='4'",), lambda c: SparseMoeModel(num_heads="4")),
    Case("ctor-lb-weight-nan", ("lb_weight=nan",), lambda c: SparseMoeModel(lb_weight=float("nan"))),
    Case("ctor-capacity-negative", ("capacity_factor=-1.0",), lambda c: SparseMoeModel(capacity_factor=-1.0)),
    Case("ctor-seed-float", ("seed=1.5",), lambda c: SparseMoeModel(seed=1.5)),
    # Sequence tasks.
    Case("translation-empty-texts", ("data[0]", "empty"), train("translation", [""], [""])),
    Case(
        "summarization-whitespace-label",
        ("labels[1]", "whitespace"),
        train("summarization", ["a b", "c d"], ["x", "  "]),
    ),
    Case("translation-none-text", ("data[1]", "NoneType"), train("translation", ["a", None], ["x", "y"])),
    Case(
        "translation-string-not-list", ("data must be a list of strings",), train("translation", "abc", "xyz")
    ),
    Case(
        "translation-length-mismatch",
        ("labels has 1 entries but data has 2",),
        train("translation", ["a", "b"], ["x"]),
    ),
    Case("translation-empty-list", ("data is empty",), train("translation", [], [])),
    Case(
        "translation-vocab-too-small",
        ("vocab_size=5", "raise vocab_size"),
        lambda c: new("translation", vocab_size=5).train(["abcdefgh ijk"], ["lmnop qrs"]),
    ),
    Case("train-epochs-zero", ("epochs=0",), train("translation", ["a"], ["x"], epochs=0)),
    Case(
        "train-learning-rate-string",
        ("learning_rate='1e-3'",),
        train("translation", ["a"], ["x"], learning_rate="1e-3"),
    ),
    Case(
        "train-learning-rate-inf",
        ("learning_rate=inf",),
        train("classification", X, Y, learning_rate=float("inf")),
    ),
    Case("train-batch-size-negative", ("batch_size=-4",), train("classification", X, Y, batch_size=-4)),
    Case("train-epochs-float", ("epochs=2.5",), train("classification", X, Y, epochs=2.5)),
    Case(
        "train-unknown-keyword",
        ("'lr'", "did you mean 'learning_rate'"),
        train("classification", X, Y, lr=1e-3),
    ),
    Case("train-verbose-string", ("verbose='yes'",), train("classification", X, Y, verbose="yes")),
    # Feature classification: labels.
    Case("labels-none", ("labels[1] is None",), train("classification", X[:3], [0, None, 1])),
    Case("labels-fractional", ("labels[0]=0.5",), train("classification", X[:2], [0.5, 1.0])),
    Case("labels-nan", ("labels[1]=nan",), train("classification", X[:2], np.array([0.0, np.nan]))),
    Case(
        "labels-mixed-kinds", ("labels mixes strings and numbers",), train("classification", X[:2], [0, "a"])
    ),
    Case("labels-2d", ("labels must be a 1-D", "(8, 2)"), train("classification", X, np.zeros((8, 2)))),
    Case(
        "labels-single-class", ("labels holds a single class",), train("classification", X, np.ones(8, int))
    ),
    Case("labels-missing", ("labels is None",), train("classification", X, None)),
    # Feature classification: data.
    Case(
        "features-nan-row",
        ("data[2]", "NaN"),
        train("classification", np.where(np.arange(8)[:, None] == 2, np.nan, X), Y),
    ),
    Case("features-inf", ("data[0]", "infinite"), train("classification", np.full((8, 4), np.inf), Y)),
    Case(
        "features-too-large-for-float32",
        ("data[0]", "float32"),
        train("classification", np.full((8, 4), 1e300), Y),
    ),
    Case(
        "features-strings",
        ("data must be numeric", "<U"),
        train("classification", [["1", "a"], ["2", "3"]], [0, 1]),
    ),
    Case("features-complex", ("complex",), train("classification", X * 1j, Y)),
    Case("features-ragged", ("data must be a numeric array",), train("classification", _ragged, [0, 1])),
    Case("features-rank-1", ("shape (8,)",), train("classification", np.zeros(8), Y)),
    Case(
        "features-images-to-classifier", ("task='image_classification'",), train("classification", IMAGES, Y)
    ),
    Case("features-zero-width", ("no features",), train("classification", np.zeros((8, 0)), Y)),
    Case("predict-before-train", ("not trained yet",), lambda c: new("classification").predict(X)),
    Case("save-before-train", ("nothing to save",), lambda c: new("classification").save(c.tmp / "m")),
    Case(
        "predict-wrong-feature-count",
        ("feature shape (3,)", "(4,)"),
        lambda c: c.model("clf").predict(X[:, :3]),
    ),
    Case(
        "train-again-unseen-class",
        ("labels holds classes [7]",),
        lambda c: c.model("clf").train(X, np.full(8, 7), epochs=1),
    ),
    Case(
        "train-again-string-labels",
        ("labels has dtype <U1", "integer classes"),
        lambda c: c.model("clf").train(X, ["a", "b"] * 4, epochs=1),
    ),
    Case("predict-batch-size-zero", ("batch_size=0",), lambda c: c.model("clf").predict(X, batch_size=0)),
    Case(
        "predict-unknown-keyword",
        ("'batchsize'", "did you mean 'batch_size'"),
        lambda c: c.model("clf").predict(X, batchsize=2),
    ),
    Case("save-to-existing-file", ("is an existing file",), lambda c: c.model("clf").save(a_file(c))),
    # Image classification.
    Case(
        "images-nan-pixels",
        ("data[1]", "NaN"),
        train("image_classification", np.where(np.arange(8)[:, None, None, None] == 1, np.nan, IMAGES), Y),
    ),
    Case(
        "images-not-square",
        ("8x6", "square"),
        train("image_classification", np.zeros((4, 8, 6, 1)), [0, 1, 0, 1]),
    ),
    Case("images-no-channel-axis", ("images[..., None]",), train("image_classification", IMAGES[..., 0], Y)),
    Case("images-strings", ("numeric",), train("image_classification", np.full((2, 4, 4, 1), "a"), [0, 1])),
    Case(
        "images-patch-not-dividing",
        ("patch_size=3", "4x4"),
        lambda c: new("image_classification", patch_size=3).train(IMAGES, Y),
    ),
    Case("images-labels-none", ("labels[0] is None",), train("image_classification", IMAGES[:2], [None, 1])),
    Case(
        "images-predict-wrong-size",
        ("8x8", "image_size=4"),
        lambda c: c.model("vit").predict(np.zeros((2, 8, 8, 1), np.float32)),
    ),
    Case(
        "images-predict-wrong-channels",
        ("3 channels", "channels=1"),
        lambda c: c.model("vit").predict(np.repeat(IMAGES, 3, -1)),
    ),
    Case(
        "images-predict-uint8-for-float",
        ("uint8",),
        lambda c: c.model("vit").predict(IMAGES.astype(np.uint8)),
    ),
    # load(): directories.
    Case("load-missing-directory", ("does not exist",), lambda c: SparseMoeModel.load(c.tmp / "nowhere")),
    Case("load-a-file", ("is a file",), lambda c: SparseMoeModel.load(a_file(c))),
    Case("load-not-a-path", ("directory=3", "must be a path"), lambda c: SparseMoeModel.load(3)),
    # load(): config.json.
    Case(
        "config-not-json",
        ("config.json is damaged", "not valid JSON"),
        source="clf",
        damage=write("config.json", b"{not json"),
    ),
    Case(
        "config-truncated",
        ("config.json is damaged", "not valid JSON"),
        source="clf",
        damage=truncate("config.json"),
    ),
    Case("config-empty", ("config.json is empty",), source="clf", damage=write("config.json", b"")),
    Case(
        "config-binary",
        ("config.json is damaged", "utf-8"),
        source="clf",
        damage=write("config.json", b"\xff\xfe\x00"),
    ),
    Case(
        "config-a-list",
        ("config.json is damaged", "JSON list"),
        source="clf",
        damage=write("config.json", b"[1, 2]"),
    ),
    Case("config-missing", ("config.json is missing",), source="clf", damage=remove("config.json")),
    Case(
        "config-unknown-format",
        ("config.json", "unknown saved-model format 99"),
        source="clf",
        damage=edit_config(_setitem(("format",), 99)),
    ),
    Case(
        "config-unknown-task",
        ("config.json", "init_args", "task='bogus'"),
        source="clf",
        damage=edit_config(_setitem(("init_args", "task"), "bogus")),
    ),
    Case(
        "config-bad-model-field",
        ("config.json", "model_config", "activation='nope'"),
        source="clf",
        damage=edit_config(_setitem(("model_config", "activation"), "nope")),
    ),
    Case(
        "config-meta-field-missing",
        ("config.json", "meta.classes is missing"),
        source="clf",
        damage=edit_config(lambda c: c["meta"].pop("classes")),
    ),
    Case(
        "config-meta-nan-mean",
        ("config.json", "meta.mean"),
        source="clf",
        damage=edit_config(_setitem(("meta", "mean"), [float("nan")] * 4)),
    ),
    Case(
        "config-train-calls-string",
        ("config.json", "train_calls='x'"),
        source="clf",
        damage=edit_config(_setitem(("train_calls",), "x")),
    ),
    Case(
        "config-image-size-edited",
        ("config.json", "meta.image_size=8", "model_config.image_size=4"),
        source="vit",
        damage=edit_config(_setitem(("meta", "image_size"), 8)),
    ),
    # load(): a state of another shape than config.json describes.
    Case(
        "config-other-d-model",
        ("state.msgpack does not match config.json", "'embed_b'", "(8,)", "(16,)"),
        source="clf",
        damage=edit_config(_setitem(("model_config", "d_model"), 16)),
    ),
    Case(
        "config-other-num-experts",
        ("state.msgpack", "'layers/0/ffn/router'", "(8, 2)", "(8, 3)"),
        source="clf",
        damage=edit_config(_setitem(("model_config", "moe", "num_experts"), 3)),
    ),
    Case(
        "config-other-classes",
        ("state.msgpack", "'head_b'", "(2,)", "(3,)"),
        source="clf",
        damage=edit_config(_setitem(("meta", "classes"), [0, 1, 2])),
    ),
    Case(
        "state-of-another-model",
        ("state.msgpack does not match config.json", "tensors"),
        source="clf",
        damage=copy_from("vit", "state.msgpack"),
    ),
    # load(): state.msgpack.
    Case(
        "state-truncated",
        ("state.msgpack is damaged or truncated",),
        source="clf",
        damage=truncate("state.msgpack"),
    ),
    Case(
        "state-garbage",
        ("state.msgpack is damaged",),
        source="clf",
        damage=write("state.msgpack", b"hello world" * 10),
    ),
    Case("state-empty", ("state.msgpack is empty",), source="clf", damage=write("state.msgpack", b"")),
    Case("state-missing", ("state.msgpack is missing",), source="clf", damage=remove("state.msgpack")),
    Case(
        "state-nan-weight",
        ("state.msgpack is damaged", "'embed_w'", "NaN"),
        source="clf",
        damage=poison_state,
    ),
    # load(): tokenizer.model (sequence tasks).
    Case(
        "tokenizer-missing",
        ("tokenizer.model is missing",),
        source="translation",
        damage=remove("tokenizer.model"),
    ),
    Case(
        "tokenizer-garbage",
        ("tokenizer.model is damaged",),
        source="translation",
        damage=write("tokenizer.model", b"garbage"),
    ),
    Case(
        "tokenizer-truncated",
        ("tokenizer.model",),
        source="translation",
        damage=truncate("tokenizer.model", 0.3),
    ),
    Case(
        "tokenizer-from-another-vocabulary",
        ("tokenizer.model does not match config.json", "vocab_size=50"),
        source="translation",
        damage=edit_config(_setitem(("model_config", "vocab_size"), 50)),
    ),
]

LM = "language_modeling"


def _other_vocabulary(d: Path, trained: Trained) -> None:
    """The translation model's tokenizer (normalizing, no byte fallback) and a config of its size."""
    copy_from("translation", "tokenizer.model")(d, trained)
    size = trained.model("translation").model.cfg.vocab_size
    edit_config(_setitem(("model_config", "vocab_size"), size))(d, trained)


# Language modelling (task='language_modeling').
CASES += [
    Case(
        "lm-labels-given",
        ("labels must be None", "learns from the texts alone"),
        train(LM, ["a b", "c d"], ["x", "y"]),
    ),
    Case("lm-texts-string", ("data must be a list of strings",), train(LM, "the cat sat", None)),
    Case("lm-texts-empty-list", ("data is empty",), train(LM, [], None)),
    Case("lm-texts-whitespace", ("data[1]", "whitespace"), train(LM, ["a b", " \n"], None)),
    Case("lm-texts-none", ("data[1]", "NoneType"), train(LM, ["a b", None], None)),
    Case("lm-texts-bytes", ("data[0]", "bytes"), train(LM, [b"a b"], None)),
    Case("lm-vocab-too-small", ("vocab_size=100", ">= 261"), lambda c: new(LM, vocab_size=100)),
    Case("lm-seq-len-one", ("seq_len=1",), lambda c: new(LM, seq_len=1)),
    Case("lm-encoder-layers", ("num_encoder_layers",), lambda c: new(LM, num_encoder_layers=2)),
    Case("lm-expert-choice", ("expert_choice",), lambda c: new(LM, router="expert_choice")),
    Case("lm-predict-before-train", ("not trained yet",), lambda c: new(LM).predict(["the"])),
    Case("lm-predict-no-prompts", ("data is empty",), lambda c: c.model("lm").predict([])),
    Case("lm-predict-prompt-string", ("data must be a list",), lambda c: c.model("lm").predict("the")),
    Case("lm-predict-prompt-int", ("data[1]", "int"), lambda c: c.model("lm").predict(["a", 3])),
    Case(
        "lm-max-new-tokens-zero",
        ("max_new_tokens=0",),
        lambda c: c.model("lm").predict(["a"], max_new_tokens=0),
    ),
    Case(
        "lm-temperature-negative",
        ("temperature=-1.0",),
        lambda c: c.model("lm").predict(["a"], temperature=-1.0),
    ),
    Case("lm-top-p-zero", ("top_p=0.0", "(0, 1]"), lambda c: c.model("lm").predict(["a"], top_p=0.0)),
    Case("lm-top-p-above-one", ("top_p=1.5",), lambda c: c.model("lm").predict(["a"], top_p=1.5)),
    Case("lm-top-k-negative", ("top_k=-1",), lambda c: c.model("lm").predict(["a"], top_k=-1)),
    Case("lm-seed-negative", ("seed=-1",), lambda c: c.model("lm").predict(["a"], seed=-1)),
    Case(
        "lm-predict-unknown-keyword",
        ("'max_tokens'", "did you mean 'max_new_tokens'"),
        lambda c: c.model("lm").predict(["a"], max_tokens=4),
    ),
    Case(
        "generation-option-for-classifier",
        ("temperature", "task='language_modeling' only"),
        lambda c: c.model("clf").predict(X, temperature=1.0),
    ),
    Case(
        "lm-tokenizer-missing",
        ("tokenizer.model is missing",),
        source="lm",
        damage=remove("tokenizer.model"),
    ),
    Case(
        "lm-tokenizer-not-byte-fallback",
        ("tokenizer.model is not a byte-fallback vocabulary",),
        source="lm",
        damage=_other_vocabulary,
    ),
    Case(
        "lm-meta-seq-len-missing",
        ("config.json", "meta.seq_len is missing"),
        source="lm",
        damage=edit_config(lambda c: c["meta"].pop("seq_len")),
    ),
    Case(
        "lm-meta-seq-len-one",
        ("config.json", "meta.seq_len=1"),
        source="lm",
        damage=edit_config(_setitem(("meta", "seq_len"), 1)),
    ),
    Case(
        "lm-state-of-another-model",
        ("state.msgpack does not match config.json",),
        source="lm",
        damage=copy_from("translation", "state.msgpack"),
    ),
]


def _hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_catalogue_is_large_and_covers_every_family():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(CASES) >= 25
    assert {c.source for c in CASES if c.source} == {"clf", "vit", "translation", "lm"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_a_value_error_naming_it(case: Case, trained: Trained, tmp_path: Path):
    if case.source is not None:
        directory = tmp_path / "model"
        shutil.copytree(trained.saved(case.source), directory)
        case.damage(directory, trained)
        before = _hashes(directory)
        with pytest.raises(ValueError) as info:
            SparseMoeModel.load(directory)
        assert _hashes(directory) == before, "a failed load() changed the saved files"
    else:
        with pytest.raises(ValueError) as info:
            case.call(Ctx(trained, tmp_path))
    message = str(info.value)
    for needle in case.needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    # Raised by the quick API's own checks, not re-labelled from deep inside a library.
    assert os.path.join("moe_jax", "api") in str(info.traceback[-1].path), info.traceback[-1]
