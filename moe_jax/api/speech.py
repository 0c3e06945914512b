"""Speech recognition in the quick API (``task='speech_recognition'``): waveforms in, transcripts out.

``train(waveforms, transcripts, epochs=, learning_rate=, sample_rate=16000)`` takes a list of 1-D NumPy
arrays of samples (float in [-1, 1], or int16) of any lengths and their transcripts; ``predict(waveforms,
sample_rate=None)`` returns a list of strings. The model is the project's
:class:`~moe_jax.models.speech.SpeechTransformer` (log-mel features with librosa, SpecAugment in training,
convolutional subsampling, MoE encoder and decoder), every update is the one
:func:`moe_jax.train.step.train_step` over the speech task's loss (``moe_jax/tasks/speech.py``), and
prediction is the trainer's greedy decoding. Transcripts are lower-cased, whitespace folded, and tokenized
into characters (the project's SentencePiece tokenizer, ``char`` model) unless ``vocab_size`` asks for a
larger unigram vocabulary.

What the first ``train`` call decides (and ``save`` stores): the sample rate (features are defined at one
rate: ``predict`` refuses another, naming ``sample_rate`` and how to resample), the padded frame count
(the longest training utterance; longer inputs at ``predict`` are padded further, never cut) and the
decoding length (the longest training transcript plus EOS, at most 256 tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from moe_jax.api.saved import POSITIVE_INT, check_fields
from moe_jax.models.speech import SpeechTransformer

SPEECH_TASK = "speech_recognition"
# Quick-API options of this task that are not SpeechConfig fields (with their defaults).
SPEECH_OPTIONS = {
    "vocab_size": None,  # None: characters; an int > 64: a unigram SentencePiece vocabulary of that size
    "max_target_len": None,  # tokens decoded at most (EOS included); default: longest transcript + EOS
}
DEFAULT_SAMPLE_RATE = 16_000
_MAX_AUTO_TARGET = 256
_FRAME_MULTIPLE = 16  # padded frame counts are rounded up to this (fewer distinct compiled shapes)


def check_speech_meta(meta: dict) -> None:
    """Checks the stored data shaping (``ValueError`` naming the ``meta`` field)."""
    check_fields(
        "meta",
        meta,
        {"sample_rate": POSITIVE_INT, "max_frames": POSITIVE_INT, "max_target_len": POSITIVE_INT},
    )


def check_sample_rate(sample_rate) -> int:
    """``sample_rate`` as an int in Hz within the supported range, else a ``ValueError`` naming it."""
    from moe_jax.data.speech import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE

    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, int | np.integer)
        or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE
    ):
        raise ValueError(
            f"sample_rate={sample_rate!r} is not supported: pass the waveforms' rate in Hz, an integer in "
            f"[{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] (16000 for most speech corpora)"
        )
    return int(sample_rate)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class SpeechTask:
    """The speech half of :class:`~moe_jax.api.SparseMoeModel` (a mixin: state lives on the model)."""

    @staticmethod
    def _check_waveforms(values, sample_rate: int, name: str = "data") -> list[np.ndarray]:
        """A list of 1-D finite float (or int16) sample arrays, each at least one analysis window long."""
        from moe_jax.data.speech import as_float_samples, frame_params

        if isinstance(values, np.ndarray) and values.ndim == 2:
            values = list(values)  # [N, samples]: N waveforms of one length
        if isinstance(values, str | bytes | np.ndarray) or not isinstance(values, Sequence):
            shape = getattr(values, "shape", None)
            raise ValueError(
                f"{name} must be a list of 1-D NumPy arrays of audio samples (one per utterance); got "
                f"{type(values).__name__}{f' of shape {shape}' if shape is not None else ''}"
            )
        if not values:
            raise ValueError(f"{name} is empty; pass at least one waveform")
        window = frame_params(sample_rate)[0]
        out = []
        for i, v in enumerate(values):
            a = np.asarray(v) if isinstance(v, np.ndarray | list | tuple) else None
            if a is None:
                raise ValueError(f"{name}[{i}] is {type(v).__name__}, not a NumPy array of samples")
            if a.ndim != 1:
                raise ValueError(
                    f"{name}[{i}] has shape {a.shape}: a waveform must be 1-D (mono samples; average or pick "
                    "a channel first)"
                )
            if a.size == 0:
                raise ValueError(f"{name}[{i}] is empty audio (0 samples); every utterance needs samples")
            if not (a.dtype.kind == "f" or a.dtype == np.int16):
                raise ValueError(f"{name}[{i}] has dtype {a.dtype}; pass float samples in [-1, 1] (or int16)")
            if a.size < window:
                raise ValueError(
                    f"{name}[{i}] has {a.size} samples, shorter than one 25 ms analysis window ({window} "
                    f"samples at {sample_rate} Hz)"
                )
            a = as_float_samples(a)
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{name}[{i}] holds NaN or infinite samples")
            out.append(a)
        return out

    def _speech_rate(self, sample_rate) -> int:
        """The checked rate of this call: the model's (predict, second train) or the given one."""
        trained = self._meta.get("sample_rate")
        if sample_rate is None:
            return trained or DEFAULT_SAMPLE_RATE
        rate = check_sample_rate(sample_rate)
        if trained and rate != trained:
            raise ValueError(
                f"sample_rate={rate} differs from the {trained} Hz this model was trained on; resample the "
                f"waveforms first (e.g. librosa.resample(y, orig_sr={rate}, target_sr={trained}))"
            )
        return rate

    def _build_speech(self, cfg, rngs: nnx.Rngs) -> nnx.Module:
        return SpeechTransformer(cfg, bos_id=self._tokenizer.bos_id, rngs=rngs)

    @staticmethod
    def _speech_loss_sums(model, batch, *, dropout_key, deterministic):
        from moe_jax.tasks import speech

        return speech.loss_sums(model, batch, dropout_key=dropout_key, deterministic=deterministic)

    def _speech_data(self, examples, split: str, max_frames: int):
        from moe_jax.data.speech import SpeechData

        return SpeechData(
            tokenizer=self._tokenizer,
            sources={split: examples},
            sample_rate=int(self._meta["sample_rate"]),
            num_mel_bins=int(self._model.cfg.num_mel_bins),
            max_frames=max_frames,
            max_target_len=int(self._meta["max_target_len"]),
            name="in_memory",
            num_threads=1,
        )

    def _prepare_speech(self, waveforms, transcripts, batch_size, seed, sample_rate: int):
        from moe_jax.data.speech import normalize_text, num_frames, train_tokenizer

        texts = [normalize_text(t) for t in transcripts]
        frames = max(num_frames(len(w), sample_rate) for w in waveforms)
        if self._model is None:
            vocab = self._extras["vocab_size"]
            try:
                self._tokenizer = train_tokenizer(
                    texts, vocab or 64, "char" if vocab is None or vocab <= 64 else "unigram"
                )
            except RuntimeError as e:  # SentencePiece refused the corpus
                detail = str(e).split("] ", 1)[-1].strip()
                raise ValueError(
                    f"vocab_size={vocab}: SentencePiece cannot build a vocabulary from these transcripts "
                    f"({detail}); lower vocab_size or leave it None (characters)"
                ) from None
            longest = max(len(ids) for ids in self._tokenizer.encode_batch(texts)) + 1
            self._meta = {
                "sample_rate": sample_rate,
                "max_frames": _round_up(frames, _FRAME_MULTIPLE),
                "max_target_len": int(self._extras["max_target_len"] or min(longest, _MAX_AUTO_TARGET)),
            }
            cfg = self._model_config(
                vocab_size=self._tokenizer.vocab_size,
                max_len=max(self._model_fields.get("max_len", 512), self._meta["max_target_len"]),
            )
            self._model = self._init(cfg)
        max_frames = max(int(self._meta["max_frames"]), _round_up(frames, _FRAME_MULTIPLE))
        examples = [{"speech": w, "text": t} for w, t in zip(waveforms, texts)]
        it = self._speech_data(examples, "train", max_frames).train_iter(batch_size, seed=seed)

        def batches():
            for batch in it:
                yield {k: batch[k] for k in ("features", "num_frames", "targets")}

        return batches(), self._model

    def _predict_speech(self, waveforms: list[np.ndarray], batch_size: int) -> list[str]:
        from moe_jax.data.speech import num_frames
        from moe_jax.tasks import speech
        from moe_jax.train import decode as decode_lib

        tok, rate = self._tokenizer, int(self._meta["sample_rate"])
        longest = max(num_frames(len(w), rate) for w in waveforms)
        max_frames = max(int(self._meta["max_frames"]), _round_up(longest, _FRAME_MULTIPLE))
        data = self._speech_data([{"speech": w, "text": ""} for w in waveforms], "predict", max_frames)
        graphdef, state = nnx.split(self._model)
        if self._predict_fn is None:
            max_len = int(self._meta["max_target_len"])

            def greedy(state, features, frames):
                return speech.greedy_transcribe(
                    nnx.merge(graphdef, state),
                    features,
                    frames,
                    max_len=max_len,
                    bos_id=tok.bos_id,
                    eos_id=tok.eos_id,
                )

            self._predict_fn = jax.jit(greedy)
        out = []
        for batch in data.eval_batches("predict", min(batch_size, len(waveforms))):
            ids = self._predict_fn(state, batch["features"], batch["num_frames"])
            rows = decode_lib.to_token_lists(jax.device_get(ids), tok.eos_id)
            out += [tok.decode(row) for row, w in zip(rows, batch["row_weight"]) if w > 0]
        return out
