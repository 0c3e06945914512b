"""``SparseMoeModel``: the class behind ``from moe_jax import SparseMoeModel`` (see the package docstring).

The task families live in their own modules as mixins that share this class's state (``_model``,
``_meta``, ``_extras`` ...): :mod:`moe_jax.api.seq2seq`, :mod:`moe_jax.api.features` and
:mod:`moe_jax.api.vision`. This module holds what is common: argument checks, the training loop, save and
load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

from moe_jax.api._common import check_int, check_labels, check_positive_float
from moe_jax.api.features import FEATURE_OPTIONS, FEATURE_TASK, FeatureTask
from moe_jax.api.seq2seq import SEQ2SEQ_OPTIONS, SEQ2SEQ_TASKS, Seq2SeqTask
from moe_jax.api.vision import (
    IMAGE_OPTIONS,
    IMAGE_TASK,
    ImageTask,
    check_image_model_fields,
    image_model_fields,
)
from moe_jax.models.transformer import ModelConfig
from moe_jax.models.vit import ViTConfig

TASKS = (*SEQ2SEQ_TASKS, FEATURE_TASK, IMAGE_TASK)
_FORMAT_VERSION = 1
# Options of every task that are not architecture fields: loss and optimizer knobs.
_COMMON_OPTIONS = {
    "lb_weight": 0.01,  # load-balancing loss weight
    "z_weight": 1e-3,  # router z-loss weight
    "warmup_steps": None,  # linear warmup; default 10% of the steps (at most 100)
}
# The Transformer tasks (seq2seq and feature classification) have always accepted each other's options.
_TRANSFORMER_OPTIONS = {**SEQ2SEQ_OPTIONS, **FEATURE_OPTIONS, **_COMMON_OPTIONS}
_IMAGE_OPTIONS = {**IMAGE_OPTIONS, **_COMMON_OPTIONS}


class SparseMoeModel(Seq2SeqTask, FeatureTask, ImageTask):
    """A sparse Mixture-of-Experts Transformer you can train, use and save in a few lines.

    Sequence-to-sequence tasks (``'translation'``, ``'summarization'``, ``'seq2seq'``; the three are the
    same encoder-decoder) learn from Python lists of strings and predict strings by greedy decoding;
    ``'classification'`` learns from NumPy features ``[N, F]`` or ``[N, L, F]`` and integer (or string)
    labels and predicts labels; ``'image_classification'`` does the same from NumPy images
    ``[N, H, W, C]`` (uint8 or float) with a V-MoE Vision Transformer. See the package docstring for the
    architectures.

    Example:

    >>> import numpy as np
    >>> from moe_jax import SparseMoeModel
    >>> X = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(int)
    >>> clf = SparseMoeModel(task="classification", num_experts=4, top_k=2, d_model=16, num_layers=1)
    >>> history = clf.train(X, y, epochs=2, learning_rate=3e-3, batch_size=16)
    >>> len(history["loss"])
    2
    >>> clf.predict(X[:3]).shape
    (3,)
    >>> tr = SparseMoeModel(task="translation", num_experts=4, top_k=1, d_model=16, num_layers=1)
    >>> _ = tr.train(["one two", "two three", "three one"], ["eins zwei", "zwei drei", "drei eins"], epochs=1)
    >>> [type(s).__name__ for s in tr.predict(["one two"])]
    ['str']

    Images go the same way: ``SparseMoeModel(task="image_classification", ...).train(images, labels)`` with
    ``images`` ``[N, H, W, C]`` (the README and ``tests/test_vision_api.py`` train one on the 8×8 digits).

    Args:
        task: ``'translation'``, ``'summarization'``, ``'seq2seq'``, ``'classification'`` or
            ``'image_classification'``.
        num_experts: experts per MoE layer.
        top_k: experts each token is routed to (1 ≤ top_k ≤ num_experts).
        d_model: model width.
        num_layers: Transformer blocks (per stack: the encoder-decoder has ``num_layers`` of each).
        capacity_factor: expert capacity relative to a perfectly balanced load; ``None`` is dropless.
        seed: initialisation, dropout and data-order seed.
        **model_overrides: for the Transformer tasks, any other :class:`~moe_jax.models.ModelConfig` field
            (``num_heads`` default 4, ``d_ff`` default ``2 * d_model``, ``moe_every`` default 1 = every
            block MoE, ``router``, ``activation``, ``dropout_rate``,
            ``num_encoder_layers``/``num_decoder_layers`` ...), and ``vocab_size`` (SentencePiece size,
            default 1000; smaller corpora get fewer pieces), ``max_input_len``/``max_target_len`` (default:
            the longest training example, capped at 128), ``patch_size`` (classification of ``[N, F]``:
            values per token). For images, any :class:`~moe_jax.models.vit.ViTConfig` field except those
            the data decides (``num_heads``, ``d_ff``, ``moe_layers`` default every block,
            ``eval_capacity_factor`` default ``2 * capacity_factor``, ``group_size`` default one image,
            ``batch_prioritized`` ...) and ``patch_size`` (pixels; default: the divisor of the image side
            giving about 16 patches). Every task: ``lb_weight``, ``z_weight``, ``warmup_steps``.

    Raises:
        ValueError: naming the offending argument (unknown task, ``top_k > num_experts``, unknown override,
            non-positive sizes, ...).
    """

    def __init__(
        self,
        task: str = "seq2seq",
        num_experts: int = 8,
        top_k: int = 2,
        d_model: int = 64,
        num_layers: int = 2,
        capacity_factor: float | None = 1.25,
        seed: int = 0,
        **model_overrides,
    ):
        if task not in TASKS:
            raise ValueError(f"task={task!r} is unknown; choose one of {TASKS}")
        num_experts = check_int("num_experts", num_experts, 1)
        if (
            isinstance(top_k, bool)
            or not isinstance(top_k, int | np.integer)
            or not 1 <= top_k <= num_experts
        ):
            raise ValueError(f"top_k={top_k!r} must be an integer in [1, num_experts={num_experts}]")
        d_model = check_int("d_model", d_model, 1)
        num_layers = check_int("num_layers", num_layers, 1)
        if capacity_factor is not None:
            capacity_factor = check_positive_float("capacity_factor", capacity_factor)
        seed = check_int("seed", seed, 0)
        if task == IMAGE_TASK:
            fields, model = image_model_fields(
                d_model=d_model,
                num_layers=num_layers,
                num_experts=num_experts,
                top_k=int(top_k),
                capacity_factor=capacity_factor,
            )
            options, kind = _IMAGE_OPTIONS, "ViTConfig"
        else:
            fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
            model = {
                "d_model": d_model,
                "num_heads": 4 if d_model % 4 == 0 else 1,
                "d_ff": 2 * d_model,
                "num_encoder_layers": num_layers,
                "num_decoder_layers": num_layers,
                "moe_every": 1,
                "moe_offset": 0,
                "num_experts": num_experts,
                "top_k": int(top_k),
                "capacity_factor": capacity_factor,
            }
            options, kind = _TRANSFORMER_OPTIONS, "ModelConfig"
        unknown = sorted(set(model_overrides) - fields - set(options))
        if unknown:
            raise ValueError(
                f"unknown model_overrides {unknown} for task={task!r}; choose {kind} fields {sorted(fields)} "
                f"or {sorted(options)}"
            )
        extras = dict(options)
        for k, v in model_overrides.items():
            (extras if k in options else model)[k] = v
        if not model.get("head_dim") and d_model % model["num_heads"]:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={model['num_heads']}")
        for name in ("vocab_size", "max_input_len", "max_target_len", "patch_size", "warmup_steps"):
            if extras.get(name) is not None:
                check_int(name, extras[name], 0 if name == "warmup_steps" else 1)
        for name in ("lb_weight", "z_weight"):
            if not isinstance(extras[name], int | float) or extras[name] < 0:
                raise ValueError(f"{name}={extras[name]!r} must be a number >= 0")
        if task == IMAGE_TASK:
            check_image_model_fields(model)
        self.task, self.seed = task, seed
        self._init_args = {
            "task": task,
            "num_experts": num_experts,
            "top_k": int(top_k),
            "d_model": d_model,
            "num_layers": num_layers,
            "capacity_factor": capacity_factor,
            "seed": seed,
            **model_overrides,
        }
        self._model_fields, self._extras = model, extras
        self._model: nnx.Module | None = None
        self._tokenizer = None  # seq2seq
        self._meta: dict[str, Any] = {}  # data shaping decided at the first train() call
        self._train_calls = 0
        self._predict_fn = None

    # ------------------------------------------------------------------ public API

    @property
    def is_seq2seq(self) -> bool:
        return self.task in SEQ2SEQ_TASKS

    @property
    def model(self) -> nnx.Module | None:
        """The underlying NNX module (``None`` before the first :meth:`train`)."""
        return self._model

    def train(
        self,
        data,
        labels,
        *,
        epochs: int = 10,
        learning_rate: float = 1e-3,
        batch_size: int = 32,
        verbose: bool = False,
    ) -> dict[str, list[float]]:
        """Trains the model (a second call continues from the current weights with a fresh optimizer).

        Args:
            data: seq2seq: a list of input strings; classification: float array ``[N, F]`` or ``[N, L, F]``;
                image classification: square images ``[N, H, W, C]``, uint8 (0-255) or float.
            labels: seq2seq: a list of target strings; classification: ``[N]`` labels (ints or strings).
            epochs: passes over the data (≥ 1).
            learning_rate: peak AdamW learning rate (> 0; linear warmup, cosine decay to 10%).
            batch_size: examples per update (≥ 1; capped at N).
            verbose: print one line per epoch.

        Returns:
            ``{'loss': [...], 'accuracy': [...]}``: per-epoch means of the training loss (cross-entropy plus
            the weighted router losses) and of the (token) accuracy.

        Raises:
            ValueError: naming the argument (empty ``data``, ``len(data) != len(labels)``, non-positive
                ``epochs``/``learning_rate``/``batch_size``, wrong types or shapes, a ``patch_size`` that
                does not divide the image size).
        """
        epochs = check_int("epochs", epochs, 1)
        learning_rate = check_positive_float("learning_rate", learning_rate)
        batch_size = check_int("batch_size", batch_size, 1)
        if self.is_seq2seq:
            inputs, targets = self._check_texts(data, "data"), self._check_texts(labels, "labels")
        elif self.task == IMAGE_TASK:
            inputs, targets = self._check_images(data), check_labels(labels)
        else:
            inputs, targets = self._check_features(data), check_labels(labels)
        if len(inputs) != len(targets):
            raise ValueError(f"labels has {len(targets)} entries but data has {len(inputs)}; they must match")
        batch_size = min(batch_size, len(inputs))
        steps_per_epoch = math.ceil(len(inputs) / batch_size)
        total = epochs * steps_per_epoch
        seed = self.seed + self._train_calls
        self._train_calls += 1
        if self.is_seq2seq:
            batches, model = self._prepare_seq2seq(inputs, targets, batch_size, seed)
        elif self.task == IMAGE_TASK:
            batches, model = self._prepare_images(inputs, targets, batch_size, seed, epochs)
        else:
            batches, model = self._prepare_features(inputs, targets, batch_size, seed, epochs)
        history = self._fit(model, batches, total, steps_per_epoch, learning_rate, seed, verbose)
        self._predict_fn = None
        return history

    def predict(self, data, *, batch_size: int = 64):
        """Predicts outputs for ``data``.

        Args:
            data: as in :meth:`train` (images: the training size, channel count and kind of dtype).
            batch_size: examples per forward pass (results do not depend on it).

        Returns:
            seq2seq: a list of strings (greedy decoding, at most ``max_target_len`` tokens each);
            classification: a NumPy array ``[N]`` of labels.

        Raises:
            RuntimeError: the model is not trained yet.
            ValueError: ``data`` has the wrong type or shape (images: names ``channels`` or ``image_size``).
        """
        if self._model is None:
            raise RuntimeError("the model is not trained yet: call train() (or SparseMoeModel.load()) first")
        batch_size = check_int("batch_size", batch_size, 1)
        if self.is_seq2seq:
            return self._predict_seq2seq(self._check_texts(data, "data"), batch_size)
        if self.task == IMAGE_TASK:
            return self._predict_images(self._check_images(data), batch_size)
        return self._predict_features(self._check_features(data), batch_size)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the trained model into ``directory`` (created if missing).

        Files: ``config.json`` (constructor arguments, architecture, data shaping: lengths, feature or pixel
        standardization, image size and patch size, classes), ``state.msgpack`` (every model variable, Flax
        msgpack) and, for seq2seq, ``tokenizer.model`` (SentencePiece).

        Raises:
            RuntimeError: the model is not trained yet.
        """
        if self._model is None:
            raise RuntimeError("the model is not trained yet: nothing to save")
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        config = {
            "format": _FORMAT_VERSION,
            "init_args": self._init_args,
            "model_config": dataclasses.asdict(self._model.cfg),
            "meta": self._meta,
            "train_calls": self._train_calls,
        }
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=1, default=str)
        pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(self._model)))
        with open(os.path.join(directory, "state.msgpack"), "wb") as f:
            f.write(serialization.msgpack_serialize(pure))
        if self._tokenizer is not None:
            self._tokenizer.save(os.path.join(directory, "tokenizer.model"))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SparseMoeModel:
        """Restores a model written by :meth:`save`; it predicts exactly as the saved one did.

        Raises:
            FileNotFoundError: ``directory`` holds no saved model.
            ValueError: the files are from an unknown format version.
        """
        directory = os.fspath(directory)
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        if config.get("format") != _FORMAT_VERSION:
            raise ValueError(f"{directory}: unknown saved-model format {config.get('format')!r}")
        m = cls(**config["init_args"])
        m._meta, m._train_calls = config["meta"], int(config.get("train_calls", 1))
        cfg = (ViTConfig if m.task == IMAGE_TASK else ModelConfig)(**config["model_config"])
        if m.is_seq2seq:
            from moe_jax.data.tokenizer import Tokenizer

            m._tokenizer = Tokenizer.load(os.path.join(directory, "tokenizer.model"))
        abstract = nnx.eval_shape(lambda: m._build(cfg))
        graphdef, state = nnx.split(abstract)
        with open(os.path.join(directory, "state.msgpack"), "rb") as f:
            pure = serialization.msgpack_restore(f.read())
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
        m._model = nnx.merge(graphdef, state)
        return m

    # ------------------------------------------------------------------ models

    def _build(self, cfg) -> nnx.Module:
        # RBG keys: initialising with threefry compiles ~4x slower on CPU (seconds for a tiny model). The
        # values are reproducible on one backend; save() stores the weights, so load() never re-draws them.
        rngs = nnx.Rngs(params=jax.random.key(self.seed, impl="rbg"))
        if self.is_seq2seq:
            return self._build_seq2seq(cfg, rngs)
        if self.task == IMAGE_TASK:
            return self._build_images(cfg, rngs)
        return self._build_features(cfg, rngs)

    def _init(self, cfg) -> nnx.Module:
        """Builds and initialises the model in one compiled program (eager init compiles every op)."""
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: self._build(cfg)))
        return nnx.merge(graphdef, jax.jit(lambda: nnx.state(self._build(cfg)))())

    def _model_config(self, **fields) -> ModelConfig:
        return ModelConfig.from_mapping({**self._model_fields, **fields})

    # ------------------------------------------------------------------ the loop

    def _fit(self, model, batches, total, steps_per_epoch, learning_rate, seed, verbose):
        from moe_jax.train import optim
        from moe_jax.train import step as step_lib

        warmup = self._extras["warmup_steps"]
        warmup = min(100, total // 10) if warmup is None else int(warmup)
        tx, schedule = optim.make_optimizer(
            {
                "name": "adamw",
                "learning_rate": learning_rate,
                "schedule": "cosine",
                "warmup_steps": warmup,
                "end_lr_ratio": 0.1,
                "b1": 0.9,
                "b2": 0.98,
                "eps": 1e-9,
                "clip_norm": 1.0,
            },
            total,
        )
        graphdef, state = step_lib.create_train_state(model, tx)
        make_step = (
            self._seq2seq_step
            if self.is_seq2seq
            else self._images_step
            if self.task == IMAGE_TASK
            else self._features_step
        )
        step_fn = make_step(
            graphdef,
            schedule=schedule,
            seed=seed,
            lb_weight=float(self._extras["lb_weight"]),
            z_weight=float(self._extras["z_weight"]),
        )
        step_fn = jax.jit(step_fn, donate_argnums=0)
        history: dict[str, list[float]] = {"loss": [], "accuracy": []}
        losses, accs, skipped = [], [], 0
        for step in range(1, total + 1):
            state, metrics = step_fn(state, next(batches))
            metrics = jax.device_get({k: metrics[k] for k in ("loss", "accuracy", "finite")})
            if bool(metrics["finite"]):
                losses.append(float(metrics["loss"]))
                accs.append(float(metrics["accuracy"]))
            else:
                skipped += 1
            if step % steps_per_epoch == 0:
                history["loss"].append(float(np.mean(losses)) if losses else float("nan"))
                history["accuracy"].append(float(np.mean(accs)) if accs else float("nan"))
                if verbose:
                    print(
                        f"epoch {step // steps_per_epoch}: loss {history['loss'][-1]:.4f} "
                        f"accuracy {history['accuracy'][-1]:.3f}",
                        flush=True,
                    )
                losses, accs = [], []
        if skipped:
            print(f"warning: {skipped} updates with a non-finite loss were skipped", flush=True)
        model, _ = nnx.merge(graphdef, state)
        self._model = model
        return history
