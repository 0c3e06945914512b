"""``SparseMoeModel``: the class behind ``from moe_jax import SparseMoeModel`` (see the package docstring).

The task families live in their own modules as mixins that share this class's state (``_model``,
``_meta``, ``_extras`` ...): :mod:`moe_jax.api.seq2seq`, :mod:`moe_jax.api.lm`, :mod:`moe_jax.api.features`,
:mod:`moe_jax.api.vision` and :mod:`moe_jax.api.speech`; the constructor's argument checks are in
:mod:`moe_jax.api.arguments`. This module holds what is common: the checks of train and predict, the
training loop, save and load.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

from moe_jax.api import arguments, saved
from moe_jax.api._common import (
    NotTrainedError,
    build_config,
    check_bool,
    check_int,
    check_labels,
    check_no_unknown,
    check_positive_float,
)
from moe_jax.api.features import FeatureTask, check_features_meta
from moe_jax.api.lm import (
    LM_TASK,
    GenerationOptions,
    LanguageModelTask,
    check_lm_labels,
    check_lm_meta,
)
from moe_jax.api.seq2seq import SEQ2SEQ_TASKS, Seq2SeqTask, check_seq2seq_meta
from moe_jax.api.speech import SPEECH_TASK, SpeechTask, check_speech_meta
from moe_jax.api.vision import (
    IMAGE_TASK,
    ImageTask,
    check_images_meta,
)
from moe_jax.models.speech import SpeechConfig
from moe_jax.models.transformer import ModelConfig
from moe_jax.models.vit import ViTConfig

TASKS = arguments.TASKS
# 2: nested MoE config (model_config["moe"]) and one Block (ViT parameters self_attn / self_norm).
_FORMAT_VERSION = 2
_TRAIN_ARGS = ("data", "labels", "epochs", "learning_rate", "batch_size", "verbose", "sample_rate")
_PREDICT_ARGS = ("data", "batch_size", "sample_rate")
_GENERATION_ARGS = tuple(f.name for f in dataclasses.fields(GenerationOptions))


class SparseMoeModel(Seq2SeqTask, LanguageModelTask, FeatureTask, ImageTask, SpeechTask):
    """A sparse Mixture-of-Experts Transformer you can train, use and save in a few lines.

    Sequence-to-sequence tasks (``'translation'``, ``'summarization'``, ``'seq2seq'``; the three are the
    same encoder-decoder) learn from Python lists of strings and predict strings by greedy decoding;
    ``'language_modeling'`` learns a decoder-only language model from a list of documents (strings) and
    predicts each prompt's continuation (greedy or sampled, with a KV cache);
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
    >>> lm = SparseMoeModel(task="language_modeling", num_experts=4, top_k=2, d_model=16, num_layers=1)
    >>> _ = lm.train(["the cat sat on the mat", "the dog sat on the log"], epochs=1)
    >>> [type(s).__name__ for s in lm.predict(["the cat"], max_new_tokens=4)]
    ['str']

    Images go the same way: ``SparseMoeModel(task="image_classification", ...).train(images, labels)`` with
    ``images`` ``[N, H, W, C]`` (the README and ``tests/test_vision_api.py`` train one on the 8×8 digits).

    Args:
        task: ``'translation'``, ``'summarization'``, ``'seq2seq'``, ``'language_modeling'``,
            ``'classification'``, ``'image_classification'`` or ``'speech_recognition'`` (waveforms and
            transcripts; any :class:`~moe_jax.models.speech.SpeechConfig` field may be overridden, see
            :mod:`moe_jax.api.speech`).
        num_experts: experts per MoE layer.
        top_k: experts each token is routed to (1 ≤ top_k ≤ num_experts).
        d_model: model width.
        num_layers: Transformer blocks (per stack: the encoder-decoder has ``num_layers`` of each, the
            language model ``num_layers`` decoder blocks).
        capacity_factor: expert capacity relative to a perfectly balanced load; ``None`` is dropless.
            ``'auto'`` (the default) is 1.25, except for ``'language_modeling'``: ``None``.
        seed: initialisation, dropout and data-order seed.
        **model_overrides: flat keyword arguments. Any :class:`~moe_jax.models.MoeConfig` field by its name
            (``router``, ``eval_capacity_factor``, ``group_size``, ``batch_prioritized``, ``jitter_noise``
            ...), except ``moe_d_ff`` (expert width, default ``d_ff``) and ``moe_layers`` (the MoE blocks,
            default every block). For the Transformer tasks, any other :class:`~moe_jax.models.ModelConfig`
            field (``num_heads`` default 4, ``d_ff`` default ``2 * d_model``, ``activation``,
            ``dropout_rate``, ``num_encoder_layers``/``num_decoder_layers`` ...), and ``vocab_size``
            (SentencePiece size, default 1000; smaller corpora get fewer pieces),
            ``max_input_len``/``max_target_len`` (default: the longest training example, capped at 128),
            ``patch_size`` (classification of ``[N, F]``: values per token). For the language model, any
            :class:`~moe_jax.models.ModelConfig` field but ``num_encoder_layers`` (``num_kv_heads``,
            ``qk_norm``, ``rope_theta``, ``logits_soft_cap``, ``norm_eps`` ...; ``eval_capacity_factor``
            defaults to ``None``, so generation is dropless), ``vocab_size`` (most byte-fallback SentencePiece
            ids, default 1024, > 260) and ``seq_len`` (tokens per packed training row, default: the longest
            document plus EOS, capped at 128). For images, any
            :class:`~moe_jax.models.ViTConfig` field except those the data decides (``num_heads``,
            ``d_ff`` ...; ``eval_capacity_factor`` defaults to ``2 * capacity_factor``, ``group_size`` to
            one image, ``batch_prioritized`` to True) and ``patch_size`` (pixels; default: the divisor of
            the image side giving about 16 patches). Every task: ``lb_weight``, ``z_weight``,
            ``warmup_steps``.

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
        capacity_factor: float | str | None = "auto",
        seed: int = 0,
        **model_overrides,
    ):
        r = arguments.resolve(
            task, num_experts, top_k, d_model, num_layers, capacity_factor, seed, model_overrides
        )
        self.task, self.seed = r.task, r.seed
        self._init_args = {
            "task": r.task,
            "num_experts": r.num_experts,
            "top_k": r.top_k,
            "d_model": r.d_model,
            "num_layers": r.num_layers,
            "capacity_factor": r.capacity_factor,
            "seed": r.seed,
            **model_overrides,
        }
        self._model_fields, self._extras = r.model, r.extras
        self._model: nnx.Module | None = None
        self._tokenizer = None  # seq2seq and language modelling
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
        labels=None,
        *,
        epochs: int = 10,
        learning_rate: float = 1e-3,
        batch_size: int = 32,
        verbose: bool = False,
        sample_rate: int | None = None,
        **unknown,
    ) -> dict[str, list[float]]:
        """Trains the model (a second call continues from the current weights with a fresh optimizer).

        Args:
            data: seq2seq: a list of input strings; language modelling: a list of documents (non-empty
                strings); classification: float array ``[N, F]`` or ``[N, L, F]``; image classification:
                square images ``[N, H, W, C]``, uint8 (0-255) or float.
            labels: seq2seq: a list of target strings; classification: ``[N]`` labels (ints or strings);
                language modelling: ``None`` (the texts are all it learns from).
            epochs: passes over the data (≥ 1); for the language model, over its packed tokens.
            learning_rate: peak AdamW learning rate (> 0; linear warmup, cosine decay to 10%).
            batch_size: examples per update (≥ 1; capped at N); for the language model, packed rows of
                ``seq_len`` tokens (capped at the rows of one epoch).
            verbose: print one line per epoch.
            sample_rate: speech recognition only: the waveforms' rate in Hz (default 16000; fixed by the
                first call; speech ``data`` is a list of 1-D sample arrays, ``labels`` their transcripts).

        Returns:
            ``{'loss': [...], 'accuracy': [...]}``: per-epoch means of the training loss (cross-entropy plus
            the weighted router losses) and of the (token) accuracy.

        Raises:
            ValueError: naming the argument and, for a bad example, its index: empty ``data``, empty or
                whitespace-only texts, ``None``/NaN/fractional labels, a single class, NaN or infinite
                features or pixels, ``len(data) != len(labels)``, wrong types, ranks or shapes,
                non-positive ``epochs``/``learning_rate``/``batch_size``, unknown keyword arguments, a
                ``patch_size`` that does not divide the image size, a ``vocab_size`` too small for the texts,
                ``labels`` other than ``None`` for the language model. A call that raises leaves the model
                as it was.
        """
        check_no_unknown("train", unknown, _TRAIN_ARGS)
        epochs = check_int("epochs", epochs, 1)
        learning_rate = check_positive_float("learning_rate", learning_rate)
        batch_size = check_int("batch_size", batch_size, 1)
        verbose = check_bool("verbose", verbose)
        self._check_speech_only(sample_rate)
        if self.task == SPEECH_TASK:
            rate = self._speech_rate(sample_rate)
            inputs = self._check_waveforms(data, rate)
            targets = self._check_texts(labels, "labels")
        elif self.task == LM_TASK:
            check_lm_labels(labels)
            inputs, targets = self._check_documents(data, "data"), None
        elif self.is_seq2seq:
            inputs, targets = self._check_texts(data, "data"), self._check_texts(labels, "labels")
        elif self.task == IMAGE_TASK:
            inputs, targets = self._check_images(data), check_labels(labels)
        else:
            inputs, targets = self._check_features(data), check_labels(labels)
        if targets is not None and len(inputs) != len(targets):
            raise ValueError(f"labels has {len(targets)} entries but data has {len(inputs)}; they must match")
        if self.task != LM_TASK:  # the language model's rows are known once the texts are tokenized
            batch_size = min(batch_size, len(inputs))
            steps_per_epoch = math.ceil(len(inputs) / batch_size)
        seed = self.seed + self._train_calls
        # A call that fails (a label unseen at a second call, a model the data cannot build, a step that
        # does not compile, e.g. a group_size that does not divide the batch) leaves the model as it was:
        # no half-set data shaping, no tokenizer without a model.
        before = (self._model, self._meta, self._tokenizer, self._train_calls, self._predict_fn)
        try:
            self._train_calls += 1
            if self.task == LM_TASK:
                batches, model, batch_size, steps_per_epoch = self._prepare_lm(inputs, batch_size, seed)
            elif self.is_seq2seq:
                batches, model = self._prepare_seq2seq(inputs, targets, batch_size, seed)
            elif self.task == SPEECH_TASK:
                batches, model = self._prepare_speech(inputs, targets, batch_size, seed, rate)
            elif self.task == IMAGE_TASK:
                batches, model = self._prepare_images(inputs, targets, batch_size, seed, epochs)
            else:
                batches, model = self._prepare_features(inputs, targets, batch_size, seed, epochs)
            total = epochs * steps_per_epoch
            history = self._fit(model, batches, total, steps_per_epoch, learning_rate, seed, verbose)
        except Exception:
            self._model, self._meta, self._tokenizer, self._train_calls, self._predict_fn = before
            raise
        self._predict_fn = None
        return history

    def predict(
        self,
        data,
        *,
        batch_size: int = 64,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        sample_rate: int | None = None,
        **unknown,
    ):
        """Predicts outputs for ``data``.

        Args:
            data: as in :meth:`train` (images: the training size, channel count and kind of dtype); for the
                language model, a list of prompts (strings; ``""`` generates a document from its start).
            batch_size: examples per forward pass (results do not depend on it, except sampled
                continuations, whose draws depend on the batch a prompt falls in).
            max_new_tokens: language model only: tokens generated at most per prompt (default 32; fewer
                when the model ends the document with EOS).
            temperature: language model only: 0 (the default) is greedy, > 0 samples from the softmax of
                the logits divided by it.
            top_k: language model only: when sampling, keep the ``top_k`` most likely tokens (default 0:
                all).
            top_p: language model only: when sampling, keep the smallest set of most likely tokens whose
                probability reaches ``top_p`` (nucleus; default 1: all), in (0, 1].
            seed: language model only: sampling randomness (default 0); the same seed, prompts and
                ``batch_size`` give the same continuations.

        Returns:
            seq2seq: a list of strings (greedy decoding, at most ``max_target_len`` tokens each);
            language modelling: a list of strings, the text each prompt continues with (the prompt itself
            left out); classification: a NumPy array ``[N]`` of labels.

        Raises:
            NotTrainedError: (a ``ValueError`` and a ``RuntimeError``) the model is not trained yet.
            ValueError: ``data`` has the wrong type or shape (the feature shape the model was trained on;
                images: names ``channels`` or ``image_size``; an empty list of prompts), an unknown keyword
                argument, a generation option out of range (``max_new_tokens`` < 1, ``temperature`` < 0,
                ``top_k`` < 0, ``top_p`` outside (0, 1]) or passed to a task other than the language model.
        """
        generation = {
            name: value
            for name, value in zip(_GENERATION_ARGS, (max_new_tokens, temperature, top_k, top_p, seed))
            if value is not None
        }
        lm = self.task == LM_TASK
        check_no_unknown("predict", unknown, _PREDICT_ARGS + (_GENERATION_ARGS if lm else ()))
        if generation and not lm:
            raise ValueError(
                f"predict() got {', '.join(generation)}: generation options of task='language_modeling' only "
                f"(task={self.task!r} takes {list(_PREDICT_ARGS)})"
            )
        if self._model is None:
            raise NotTrainedError(
                "the model is not trained yet: call train() (or SparseMoeModel.load()) before predict()"
            )
        batch_size = check_int("batch_size", batch_size, 1)
        self._check_speech_only(sample_rate)
        if self.task == SPEECH_TASK:
            return self._predict_speech(
                self._check_waveforms(data, self._speech_rate(sample_rate)), batch_size
            )
        if lm:
            options = GenerationOptions.checked(**generation)
            prompts = self._check_documents(data, "data", allow_empty=True)
            return self._predict_lm(prompts, batch_size, options)
        if self.is_seq2seq:
            return self._predict_seq2seq(self._check_texts(data, "data"), batch_size)
        if self.task == IMAGE_TASK:
            return self._predict_images(self._check_images(data), batch_size)
        return self._predict_features(self._check_features(data), batch_size)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the trained model into ``directory`` (created if missing).

        Files: ``config.json`` (constructor arguments, architecture, data shaping: lengths, feature or pixel
        standardization, image size and patch size, classes), ``state.msgpack`` (every model variable, Flax
        msgpack) and, for seq2seq and the language model, ``tokenizer.model`` (SentencePiece; the language
        model's is the byte-fallback vocabulary, and its ``meta`` holds ``seq_len``). Each file is written to
        a temporary name and renamed, so a failed save never leaves a half-written file in place of a good
        one.

        Raises:
            NotTrainedError: (a ``ValueError`` and a ``RuntimeError``) the model is not trained yet.
            ValueError: ``directory`` is an existing file or cannot be created or written.
        """
        if self._model is None:
            raise NotTrainedError("the model is not trained yet: nothing to save; call train() first")
        directory = saved.save_directory(directory)
        config = {
            "format": _FORMAT_VERSION,
            "init_args": self._init_args,
            "model_config": dataclasses.asdict(self._model.cfg),
            "meta": self._meta,
            "train_calls": self._train_calls,
        }
        config_bytes = saved.config_bytes(config)
        pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(self._model)))
        state_bytes = serialization.msgpack_serialize(pure)
        # The state first and config.json last: a directory with a new config.json has its new state too.
        saved.write_atomic(os.path.join(directory, saved.STATE), state_bytes)
        if self._tokenizer is not None:
            saved.write_atomic(os.path.join(directory, saved.TOKENIZER), self._tokenizer.model_proto)
        saved.write_atomic(os.path.join(directory, saved.CONFIG), config_bytes)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SparseMoeModel:
        """Restores a model written by :meth:`save`; it predicts exactly as the saved one did.

        Every file is checked before the model is returned, and loading only reads the directory.

        Raises:
            ValueError: naming the directory or file and what is wrong: a missing directory, a missing,
                empty or damaged ``config.json`` / ``state.msgpack`` / ``tokenizer.model``, an unknown
                format version, a config that does not describe a valid model, or a state that does not
                fit it (the tensor and both shapes).
        """
        directory = saved.load_directory(directory)
        config_path = os.path.join(directory, saved.CONFIG)
        config = saved.read_config(directory, _FORMAT_VERSION)
        try:
            m = cls(**config["init_args"])
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{config_path}: init_args are not valid SparseMoeModel arguments ({e})"
            ) from None
        cfg_cls = {IMAGE_TASK: ViTConfig, SPEECH_TASK: SpeechConfig}.get(m.task, ModelConfig)
        try:
            cfg = cfg_cls.from_mapping(config["model_config"], path="model_config")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_path}: model_config is not a valid {cfg_cls.__name__} ({e})") from None
        meta = config["meta"]
        if m.is_seq2seq or m.task in (LM_TASK, SPEECH_TASK):
            from moe_jax.data.tokenizer import Tokenizer

            tokenizer_path = os.path.join(directory, saved.TOKENIZER)
            proto = saved.read_bytes(directory, saved.TOKENIZER)
            try:
                m._tokenizer = Tokenizer(proto)
            except Exception as e:  # SentencePiece raises RuntimeError (or worse) on a bad proto
                raise ValueError(
                    f"{tokenizer_path} is damaged: not a SentencePiece model of this project ({e})"
                ) from None
            if m._tokenizer.vocab_size != cfg.vocab_size:
                raise ValueError(
                    f"{tokenizer_path} does not match {saved.CONFIG}: it has {m._tokenizer.vocab_size} "
                    f"pieces but model_config.vocab_size={cfg.vocab_size} (damaged, or from another model)"
                )
            if m.task == LM_TASK and not m._tokenizer.byte_fallback:
                raise ValueError(
                    f"{tokenizer_path} is not a byte-fallback vocabulary, which a language model of this "
                    "project always has (from another model?)"
                )
        try:
            if m.task == LM_TASK:
                check_lm_meta(meta)
            elif m.is_seq2seq:
                check_seq2seq_meta(meta)
            elif m.task == SPEECH_TASK:
                check_speech_meta(meta)
            elif m.task == IMAGE_TASK:
                check_images_meta(meta, cfg)
            else:
                check_features_meta(meta)
        except ValueError as e:
            raise ValueError(f"{config_path} is damaged or edited: {e}") from None
        m._meta, m._train_calls = meta, int(config.get("train_calls", 1))
        try:
            abstract = nnx.eval_shape(lambda: m._build(cfg))
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{config_path}: the model it describes cannot be built ({e})") from None
        graphdef, state = nnx.split(abstract)
        state_path = os.path.join(directory, saved.STATE)
        pure = saved.restore_state(
            state_path, saved.read_bytes(directory, saved.STATE), nnx.to_pure_dict(state)
        )
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
        m._model = nnx.merge(graphdef, state)
        return m

    # ------------------------------------------------------------------ models

    def _build(self, cfg) -> nnx.Module:
        # RBG keys: initialising with threefry compiles ~4x slower on CPU (seconds for a tiny model). The
        # values are reproducible on one backend; save() stores the weights, so load() never re-draws them.
        rngs = nnx.Rngs(params=jax.random.key(self.seed, impl="rbg"))
        if self.task == LM_TASK:
            return self._build_lm(cfg, rngs)
        if self.is_seq2seq:
            return self._build_seq2seq(cfg, rngs)
        if self.task == SPEECH_TASK:
            return self._build_speech(cfg, rngs)
        if self.task == IMAGE_TASK:
            return self._build_images(cfg, rngs)
        return self._build_features(cfg, rngs)

    def _init(self, cfg) -> nnx.Module:
        """Builds and initialises the model in one compiled program (eager init compiles every op)."""
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: self._build(cfg)))
        return nnx.merge(graphdef, jax.jit(lambda: nnx.state(self._build(cfg)))())

    def _model_config(self, **fields) -> ModelConfig:
        cls = SpeechConfig if self.task == SPEECH_TASK else ModelConfig
        return build_config(cls, self._model_fields, **fields)

    def _check_speech_only(self, sample_rate) -> None:
        if sample_rate is not None and self.task != SPEECH_TASK:
            raise ValueError(
                f"sample_rate is an argument of task='speech_recognition' only (task={self.task!r})"
            )

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
        loss_sums = (
            self._lm_loss_sums
            if self.task == LM_TASK
            else self._seq2seq_loss_sums
            if self.is_seq2seq
            else self._speech_loss_sums
            if self.task == SPEECH_TASK
            else self._images_loss_sums
            if self.task == IMAGE_TASK
            else self._features_loss_sums
        )
        step_fn = functools.partial(
            step_lib.train_step,
            graphdef,
            loss_sums=loss_sums,
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
