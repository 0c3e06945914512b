"""``SparseMoeModel``: a quick API that trains sparse Mixture-of-Experts Transformers on in-memory data.

Two model families sit behind one class:

* Sequence-to-sequence (``task='translation' | 'summarization' | 'seq2seq'``): lists of input and target
  strings. A SentencePiece vocabulary is trained on the training strings
  (:func:`moe_jax.data.pipeline.seq2seq_data_from_pairs`), the model is the project's
  :class:`~moe_jax.models.Seq2SeqTransformer`, and every update is the trainer's own
  :func:`moe_jax.train.step.train_step` (same loss, load-balancing and z-loss terms, non-finite guard) with
  the trainer's Optax optimizer (:func:`moe_jax.train.optim.make_optimizer`). Prediction is the trainer's
  greedy decoding (:func:`moe_jax.train.decode.greedy_decode`).
* Classification (``task='classification'``): NumPy features ``X`` of shape ``[N, F]`` or ``[N, L, F]``
  and labels ``y`` of shape ``[N]``, through a
  :class:`~moe_jax.models.feature_classifier.FeatureClassifier` (how features become tokens is described
  there).

Both families run on one device (no mesh); everything else (mesh, checkpoints, logging) is the job of
``python -m moe_jax.main``. Unless overridden, every Transformer block's FFN is an MoE layer
(``moe_every=1``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

from moe_jax.models.feature_classifier import FeatureClassifier
from moe_jax.models.transformer import ModelConfig, Seq2SeqTransformer

__all__ = ["FeatureClassifier", "SparseMoeModel", "TASKS"]

TASKS = ("translation", "summarization", "seq2seq", "classification")
_SEQ2SEQ = ("translation", "summarization", "seq2seq")
_FORMAT_VERSION = 1
# Options that are not ModelConfig fields: data shaping and loss/optimizer knobs.
_EXTRA_OPTIONS = {
    "vocab_size": None,  # requested SentencePiece size (seq2seq); default 1000 (small corpora get fewer)
    "max_input_len": None,  # seq2seq input tokens (EOS included); default: longest training input
    "max_target_len": None,  # seq2seq target/decoding tokens; default: longest training target
    "patch_size": None,  # classification of [N, F] features: values per token; default ceil(F / 8)
    "lb_weight": 0.01,  # load-balancing loss weight
    "z_weight": 1e-3,  # router z-loss weight
    "warmup_steps": None,  # linear warmup; default 10% of the steps (at most 100)
}
_MAX_AUTO_LEN = 128
_MAX_AUTO_TOKENS = 8


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{name}={value!r} must be a positive number")
    if not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"{name}={value!r} must be a positive number")
    return float(value)


class SparseMoeModel:
    """A sparse Mixture-of-Experts Transformer you can train, use and save in a few lines.

    Sequence-to-sequence tasks (``'translation'``, ``'summarization'``, ``'seq2seq'``; the three are the
    same encoder-decoder) learn from Python lists of strings and predict strings by greedy decoding;
    ``'classification'`` learns from NumPy features ``[N, F]`` or ``[N, L, F]`` and integer (or string)
    labels and predicts labels. See the module docstring for the architectures.

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

    Args:
        task: ``'translation'``, ``'summarization'``, ``'seq2seq'`` or ``'classification'``.
        num_experts: experts per MoE layer.
        top_k: experts each token is routed to (1 ≤ top_k ≤ num_experts).
        d_model: model width.
        num_layers: Transformer blocks (per stack: the encoder-decoder has ``num_layers`` of each).
        capacity_factor: expert capacity relative to a perfectly balanced load; ``None`` is dropless.
        seed: initialisation, dropout and data-order seed.
        **model_overrides: any other :class:`~moe_jax.models.ModelConfig` field (``num_heads`` default 4,
            ``d_ff`` default ``2 * d_model``, ``moe_every`` default 1 = every block MoE, ``router``,
            ``activation``, ``dropout_rate``, ``num_encoder_layers``/``num_decoder_layers`` ...), and
            ``vocab_size`` (SentencePiece size, default 1000; smaller corpora get fewer pieces),
            ``max_input_len``/``max_target_len`` (default: the longest training example, capped at 128),
            ``patch_size`` (classification of ``[N, F]``), ``lb_weight``, ``z_weight``, ``warmup_steps``.

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
        num_experts = _check_int("num_experts", num_experts, 1)
        if (
            isinstance(top_k, bool)
            or not isinstance(top_k, int | np.integer)
            or not 1 <= top_k <= num_experts
        ):
            raise ValueError(f"top_k={top_k!r} must be an integer in [1, num_experts={num_experts}]")
        d_model = _check_int("d_model", d_model, 1)
        num_layers = _check_int("num_layers", num_layers, 1)
        if capacity_factor is not None:
            capacity_factor = _check_positive_float("capacity_factor", capacity_factor)
        seed = _check_int("seed", seed, 0)
        fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
        unknown = sorted(set(model_overrides) - fields - set(_EXTRA_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown model_overrides {unknown}; choose ModelConfig fields {sorted(fields)} or "
                f"{sorted(_EXTRA_OPTIONS)}"
            )
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
        extras = dict(_EXTRA_OPTIONS)
        for k, v in model_overrides.items():
            (extras if k in _EXTRA_OPTIONS else model)[k] = v
        if not model.get("head_dim") and d_model % model["num_heads"]:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={model['num_heads']}")
        for name in ("vocab_size", "max_input_len", "max_target_len", "patch_size", "warmup_steps"):
            if extras[name] is not None:
                _check_int(name, extras[name], 0 if name == "warmup_steps" else 1)
        for name in ("lb_weight", "z_weight"):
            if not isinstance(extras[name], int | float) or extras[name] < 0:
                raise ValueError(f"{name}={extras[name]!r} must be a number >= 0")
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
        return self.task in _SEQ2SEQ

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
            data: seq2seq: a list of input strings; classification: float array ``[N, F]`` or ``[N, L, F]``.
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
                ``epochs``/``learning_rate``/``batch_size``, wrong types or shapes).
        """
        epochs = _check_int("epochs", epochs, 1)
        learning_rate = _check_positive_float("learning_rate", learning_rate)
        batch_size = _check_int("batch_size", batch_size, 1)
        if self.is_seq2seq:
            inputs, targets = self._check_texts(data, "data"), self._check_texts(labels, "labels")
        else:
            inputs, targets = self._check_features(data), self._check_labels(labels)
        if len(inputs) != len(targets):
            raise ValueError(f"labels has {len(targets)} entries but data has {len(inputs)}; they must match")
        batch_size = min(batch_size, len(inputs))
        steps_per_epoch = math.ceil(len(inputs) / batch_size)
        total = epochs * steps_per_epoch
        seed = self.seed + self._train_calls
        self._train_calls += 1
        if self.is_seq2seq:
            batches, model = self._prepare_seq2seq(inputs, targets, batch_size, seed)
        else:
            batches, model = self._prepare_classification(inputs, targets, batch_size, seed, epochs)
        history = self._fit(model, batches, total, steps_per_epoch, learning_rate, seed, verbose)
        self._predict_fn = None
        return history

    def predict(self, data, *, batch_size: int = 64):
        """Predicts outputs for ``data``.

        Args:
            data: as in :meth:`train`.
            batch_size: examples per forward pass (results do not depend on it).

        Returns:
            seq2seq: a list of strings (greedy decoding, at most ``max_target_len`` tokens each);
            classification: a NumPy array ``[N]`` of labels.

        Raises:
            RuntimeError: the model is not trained yet.
            ValueError: ``data`` has the wrong type or shape.
        """
        if self._model is None:
            raise RuntimeError("the model is not trained yet: call train() (or SparseMoeModel.load()) first")
        batch_size = _check_int("batch_size", batch_size, 1)
        if self.is_seq2seq:
            texts = self._check_texts(data, "data")
            return self._predict_seq2seq(texts, batch_size)
        x = self._check_features(data)
        return self._predict_classification(x, batch_size)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the trained model into ``directory`` (created if missing).

        Files: ``config.json`` (constructor arguments, architecture, data shaping: lengths, feature
        standardization, classes), ``state.msgpack`` (every model variable, Flax msgpack) and, for seq2seq,
        ``tokenizer.model`` (SentencePiece).

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
        cfg = ModelConfig(**config["model_config"])
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

    # ------------------------------------------------------------------ checks

    @staticmethod
    def _check_texts(values, name: str) -> list[str]:
        if isinstance(values, str) or not isinstance(values, Sequence | np.ndarray):
            raise ValueError(
                f"{name} must be a list of strings for a seq2seq task; got {type(values).__name__}"
            )
        values = list(values)
        if not values:
            raise ValueError(f"{name} is empty; pass at least one example")
        bad = [i for i, v in enumerate(values) if not isinstance(v, str | np.str_)]
        if bad:
            raise ValueError(f"{name}[{bad[0]}] is {type(values[bad[0]]).__name__}, not a string")
        return [str(v) for v in values]

    def _check_features(self, data) -> np.ndarray:
        try:
            x = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"data must be a numeric array [N, features] or [N, L, features] ({e})"
            ) from None
        if x.ndim not in (2, 3):
            raise ValueError(f"data must have shape [N, features] or [N, L, features]; got shape {x.shape}")
        if x.shape[0] == 0:
            raise ValueError("data is empty; pass at least one example")
        if not np.all(np.isfinite(x)):
            raise ValueError("data holds NaN or infinite values")
        if self._meta:
            want = tuple(self._meta["feature_shape"])
            if x.shape[1:] != want:
                raise ValueError(f"data has feature shape {x.shape[1:]} but the model was trained on {want}")
        return x

    @staticmethod
    def _check_labels(labels) -> np.ndarray:
        y = np.asarray(labels)
        if y.ndim != 1:
            raise ValueError(f"labels must be a 1-D array of class labels; got shape {y.shape}")
        if y.size == 0:
            raise ValueError("labels is empty; pass one label per example")
        if not (np.issubdtype(y.dtype, np.integer) or y.dtype.kind in "UO" or y.dtype == bool):
            raise ValueError(f"labels must be integers or strings; got dtype {y.dtype}")
        return y

    # ------------------------------------------------------------------ models

    def _build(self, cfg: ModelConfig) -> nnx.Module:
        # RBG keys: initialising with threefry compiles ~4x slower on CPU (seconds for a tiny model). The
        # values are reproducible on one backend; save() stores the weights, so load() never re-draws them.
        rngs = nnx.Rngs(params=jax.random.key(self.seed, impl="rbg"))
        if self.is_seq2seq:
            return Seq2SeqTransformer(cfg, bos_id=self._tokenizer.bos_id, rngs=rngs)
        meta = self._meta
        return FeatureClassifier(
            cfg,
            token_dim=meta["token_dim"],
            num_tokens=meta["num_tokens"],
            num_classes=len(meta["classes"]),
            rngs=rngs,
        )

    def _init(self, cfg: ModelConfig) -> nnx.Module:
        """Builds and initialises the model in one compiled program (eager init compiles every op)."""
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: self._build(cfg)))
        return nnx.merge(graphdef, jax.jit(lambda: nnx.state(self._build(cfg)))())

    def _model_config(self, **fields) -> ModelConfig:
        return ModelConfig.from_mapping({**self._model_fields, **fields})

    # ------------------------------------------------------------------ seq2seq

    def _prepare_seq2seq(self, inputs, targets, batch_size, seed):
        from moe_jax.data.pipeline import seq2seq_data_from_pairs

        pairs = list(zip(inputs, targets))
        vocab = self._extras["vocab_size"] or 1000
        data = seq2seq_data_from_pairs(
            {"train": pairs},
            max_input_len=self._meta.get("max_input_len", 1),
            max_target_len=self._meta.get("max_target_len", 1),
            vocab_size=vocab,
            tokenizer=self._tokenizer,
        )
        if self._model is None:
            self._tokenizer = data.tokenizer
            lengths = [len(ids) + 1 for ids in data.tokenizer.encode_batch(inputs)]
            t_lengths = [len(ids) + 1 for ids in data.tokenizer.encode_batch(targets)]
            self._meta = {
                "max_input_len": int(self._extras["max_input_len"] or min(max(lengths), _MAX_AUTO_LEN)),
                "max_target_len": int(self._extras["max_target_len"] or min(max(t_lengths), _MAX_AUTO_LEN)),
            }
            data.max_input_len = self._meta["max_input_len"]
            data.max_target_len = self._meta["max_target_len"]
            max_len = max(self._meta.values())
            cfg = self._model_config(
                vocab_size=data.tokenizer.vocab_size,
                max_len=max(self._model_fields.get("max_len", 512), max_len),
            )
            self._model = self._init(cfg)
        data.num_threads = 1
        it = data.train_iter(batch_size, seed=seed)

        def batches():
            for batch in it:
                yield {"inputs": batch["inputs"], "targets": batch["targets"]}

        return batches(), self._model

    def _predict_seq2seq(self, texts: list[str], batch_size: int) -> list[str]:
        from moe_jax.data.pipeline import seq2seq_data_from_pairs
        from moe_jax.train import decode as decode_lib

        tok = self._tokenizer
        data = seq2seq_data_from_pairs(
            {"predict": [(t, "") for t in texts]},
            max_input_len=self._meta["max_input_len"],
            max_target_len=1,
            tokenizer=tok,
        )
        graphdef, state = nnx.split(self._model)
        if self._predict_fn is None:
            max_len = self._meta["max_target_len"]

            def greedy(state, inputs):
                model = nnx.merge(graphdef, state)
                return decode_lib.greedy_decode(
                    model, inputs, max_len=max_len, bos_id=tok.bos_id, eos_id=tok.eos_id
                )

            self._predict_fn = jax.jit(greedy)
        out = []
        for batch in data.eval_batches("predict", min(batch_size, len(texts))):
            ids = decode_lib.to_token_lists(
                jax.device_get(self._predict_fn(state, batch["inputs"])), tok.eos_id
            )
            out += [tok.decode(row) for row, w in zip(ids, batch["weights"]) if w > 0]
        return out

    # ------------------------------------------------------------------ classification

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

    def _prepare_classification(self, x, y, batch_size, seed, epochs):
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
                "classes": np.unique(y).tolist(),
            }
            cfg = self._model_config(vocab_size=1, positions="learned", max_len=num_tokens)
            self._model = self._init(cfg)
        classes = np.asarray(self._meta["classes"])
        idx = np.searchsorted(classes, y)
        if np.any(idx >= len(classes)) or np.any(classes[np.minimum(idx, len(classes) - 1)] != y):
            unseen = sorted(set(np.asarray(y).tolist()) - set(classes.tolist()))
            raise ValueError(f"labels holds classes {unseen[:5]} the model was not built for")
        tokens, idx = self._tokens(x), idx.astype(np.int32)
        rng = np.random.default_rng(seed)
        n = len(tokens)

        def batches():
            for _ in range(epochs):
                order = rng.permutation(n)
                # The last batch of an epoch is filled up with examples from the start of the order, so
                # every batch has the same shape (one compiled step).
                order = np.resize(order, math.ceil(n / batch_size) * batch_size)
                for i in range(0, len(order), batch_size):
                    sel = order[i : i + batch_size]
                    yield {"x": tokens[sel], "y": idx[sel]}

        return batches(), self._model

    def _predict_classification(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        graphdef, state = nnx.split(self._model)
        if self._predict_fn is None:
            self._predict_fn = jax.jit(
                lambda state, x: jnp.argmax(nnx.merge(graphdef, state)(x, deterministic=True)[0], axis=-1)
            )
        tokens = self._tokens(x)
        n, b = len(tokens), min(batch_size, len(tokens))
        preds = []
        for i in range(0, n, b):
            chunk = tokens[i : i + b]
            # Rows are routed independently (one routing group per example), so padding changes nothing.
            chunk = np.pad(chunk, ((0, b - len(chunk)), (0, 0), (0, 0)))
            preds.append(np.asarray(self._predict_fn(state, chunk)))
        idx = np.concatenate(preds)[:n]
        return np.asarray(self._meta["classes"])[idx]

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
        weights = {"lb_weight": float(self._extras["lb_weight"]), "z_weight": float(self._extras["z_weight"])}
        if self.is_seq2seq:
            step_fn = functools.partial(
                step_lib.train_step, graphdef, schedule=schedule, seed=seed, skip_nonfinite=True, **weights
            )
        else:
            step_fn = functools.partial(step_lib.classification_train_step, graphdef, seed=seed, **weights)
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
