"""Speech data: waveforms → log-mel features (librosa) and transcripts → tokens, batched with Grain.

Offline ``espeak_speech`` (synthesised here, ``moe_jax/data/builders/espeak_speech.py``) or a prepared TFDS
dataset with the same feature names (``librispeech``: ``speech`` int16 samples at 16 kHz, ``text``)::

    data = make_speech_data(config.data, data_dir=DIR)
    batch = next(data.train_iter(32, seed=0))
    # {'features': float32[B, T, F] log-mel, per-utterance normalised, 0 past each row's end,
    #  'num_frames': int32[B], 'targets': int32[B, L] tokens + EOS, pad 0}
    for batch in data.eval_batches('test', 64):  # + 'row_weight' float32[B], 'text' [str]

Features are computed per batch on the host (Grain's reader threads run them while the device trains):
a 25 ms Hann window every 10 ms, the power spectrum through librosa's Slaney mel filterbank, log(· + 1e-6),
then each mel bin standardised over the utterance's frames (per-utterance mean and variance normalisation:
no corpus statistics to compute or store, and loudness and noise-floor differences between voices cancel).
Utterances longer than ``max_frames`` are cut there (the configs size it to the corpus), transcripts
longer than ``max_target_len`` tokens likewise (EOS kept).

Training batches pad to ``max_frames`` or, with ``frame_buckets`` set, are length-bucketed
(``moe_jax/data/bucketing.py``): utterances of similar length share a batch, padded to the smallest bucket
that holds the longest, so the step compiles once per bucket and little compute goes to padding. The
per-utterance frame counts this needs are read once and cached beside the tokenizers. Evaluation batches
always pad to ``max_frames``: a transcript then never depends on which utterances share its batch (the MoE
capacity of an utterance's routing group follows its padded length).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from moe_jax.data.bucketing import bucket_length, bucketed_train_iterator, check_buckets
from moe_jax.data.pipeline import _pad_rows, prepared_source, shuffled_train_iterator
from moe_jax.data.tokenizer import Tokenizer

OFFLINE_SPEECH = ("espeak_speech",)
LOG_OFFSET = 1e-6
# librosa's mel filterbank needs room below Nyquist; below 8 kHz 80 bins would leave some empty.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 48_000


def frame_params(sample_rate: int, window_ms: float = 25.0, hop_ms: float = 10.0) -> tuple[int, int]:
    """``(window, hop)`` in samples: 400 and 160 at 16 kHz."""
    return int(round(sample_rate * window_ms / 1000)), int(round(sample_rate * hop_ms / 1000))


def num_frames(num_samples: int, sample_rate: int) -> int:
    """Frames :func:`log_mel` gives for ``num_samples`` (centred frames: 1 + n // hop)."""
    return 1 + num_samples // frame_params(sample_rate)[1]


def log_mel(samples: np.ndarray, sample_rate: int, num_mel_bins: int = 80) -> np.ndarray:
    """Log-mel power spectrogram ``float32[T, F]`` (librosa; centred frames, zero padding at the ends)."""
    import librosa

    window, hop = frame_params(sample_rate)
    mel_FT = librosa.feature.melspectrogram(
        y=np.asarray(samples, np.float32),
        sr=sample_rate,
        n_fft=window,
        hop_length=hop,
        win_length=window,
        window="hann",
        center=True,
        pad_mode="constant",
        power=2.0,
        n_mels=num_mel_bins,
        fmin=0.0,
        fmax=sample_rate / 2,
    )
    return np.log(mel_FT + LOG_OFFSET).T.astype(np.float32)


def normalize_features(feats_TF: np.ndarray) -> np.ndarray:
    """Each mel bin standardised over the utterance's frames (mean 0, variance 1)."""
    mean_F = feats_TF.mean(axis=0, keepdims=True)
    std_F = feats_TF.std(axis=0, keepdims=True)
    return ((feats_TF - mean_F) / (std_F + 1e-5)).astype(np.float32)


def as_float_samples(speech: Any) -> np.ndarray:
    """int16 samples → float32 in [-1, 1); float samples unchanged."""
    a = np.asarray(speech)
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    return a.astype(np.float32)


def _to_str(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def normalize_text(text: str, lowercase: bool = True) -> str:
    """Transcript as the tokenizer sees it: whitespace folded, lower case (LibriSpeech's is upper)."""
    text = " ".join(text.split())
    return text.lower() if lowercase else text


@dataclasses.dataclass(frozen=True)
class _Featurize:
    """Grain batch_fn: examples (``speech``, ``text``) → padded features, frame counts and tokens."""

    tokenizer: Tokenizer
    sample_rate: int
    num_mel_bins: int
    max_frames: int
    max_target_len: int
    lowercase: bool = True
    frame_buckets: tuple[int, ...] = ()  # pad to the smallest that fits the batch; () pads to max_frames

    def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        B = len(examples)
        feats = [
            normalize_features(log_mel(as_float_samples(e["speech"]), self.sample_rate, self.num_mel_bins))[
                : self.max_frames
            ]
            for e in examples
        ]
        padded = bucket_length(max((len(f) for f in feats), default=0), self.frame_buckets, self.max_frames)
        features = np.zeros((B, padded, self.num_mel_bins), np.float32)
        frames = np.zeros((B,), np.int32)
        for i, feats_TF in enumerate(feats):
            features[i, : len(feats_TF)] = feats_TF
            frames[i] = len(feats_TF)
        texts = [normalize_text(_to_str(e["text"]), self.lowercase) for e in examples]
        targets = _pad_rows(self.tokenizer.encode_batch(texts), self.max_target_len)
        return {"features": features, "num_frames": frames, "targets": targets}


@dataclasses.dataclass
class SpeechData:
    """Speech splits and the batching the trainer uses.

    Attributes:
      tokenizer: characters (SentencePiece ``char`` model) or pieces of the transcripts.
      sources: split role (``train``, ``validation``, ``test``, ``test_voice`` ...) → random-access examples
        with ``speech`` (int16 or float samples at ``sample_rate``) and ``text``.
      sample_rate, num_mel_bins, max_frames, max_target_len: feature and target shaping.
      lowercase: fold transcripts to lower case.
      name: the dataset, for logs.
      num_threads: Grain reader threads for training batches.
      frame_buckets: padded lengths of length-bucketed training batches (``()``: random batches padded to
        ``max_frames``).
      bucket_window: batches whose utterances are sorted by length together.
      lengths_dir: where the per-utterance frame counts are cached (``None``: computed, not stored).
    """

    tokenizer: Tokenizer
    sources: dict[str, Sequence[dict]]
    sample_rate: int
    num_mel_bins: int
    max_frames: int
    max_target_len: int
    lowercase: bool = True
    name: str = ""
    num_threads: int = 2
    frame_buckets: tuple[int, ...] = ()
    bucket_window: int = 32
    lengths_dir: str | None = None

    def featurizer(self, frame_buckets: tuple[int, ...] = ()) -> _Featurize:
        return _Featurize(
            self.tokenizer,
            self.sample_rate,
            self.num_mel_bins,
            self.max_frames,
            self.max_target_len,
            self.lowercase,
            frame_buckets,
        )

    def frame_counts(self, split: str) -> np.ndarray:
        """Log-mel frames of every utterance of ``split`` (cut at ``max_frames``), cached when possible."""
        source = self.sources[split]
        path = None
        if self.lengths_dir:
            path = os.path.join(
                self.lengths_dir, self.name.replace("/", "_"), f"{split}_frames_{self.sample_rate}hz.npy"
            )
            if os.path.exists(path):
                cached = np.load(path)
                if len(cached) == len(source):
                    return np.minimum(cached, self.max_frames)
        counts = np.array(
            [num_frames(len(source[i]["speech"]), self.sample_rate) for i in range(len(source))], np.int64
        )
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}.npy"
            np.save(tmp, counts)
            os.replace(tmp, path)  # a reader never sees a half-written file
        return np.minimum(counts, self.max_frames)

    def train_iter(
        self, batch_size: int, *, seed: int, shard_index: int = 0, num_shards: int = 1
    ) -> grain.DatasetIterator:
        """An endless, checkpointable iterator of training batches (a fresh permutation every epoch)."""
        if self.frame_buckets:
            return bucketed_train_iterator(
                self.sources["train"],
                self.name,
                batch_size,
                self.featurizer(self.frame_buckets),
                lengths_N=self.frame_counts("train"),
                seed=seed,
                shard_index=shard_index,
                num_shards=num_shards,
                num_threads=self.num_threads,
                window_batches=self.bucket_window,
            )
        return shuffled_train_iterator(
            self.sources["train"],
            self.name,
            batch_size,
            self.featurizer(),
            seed=seed,
            shard_index=shard_index,
            num_shards=num_shards,
            num_threads=self.num_threads,
        )

    def eval_batches(
        self, split: str, batch_size: int, *, max_examples: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yields a split once, in stored order; the last batch is filled with empty rows (weight 0)."""
        source = self.sources[split]
        n = len(source) if max_examples is None else min(int(max_examples), len(source))
        featurize = self.featurizer()
        for start in range(0, n, batch_size):
            examples = [source[i] for i in range(start, min(start + batch_size, n))]
            pad = batch_size - len(examples)
            arrays = featurize(examples)
            # Padding rows: no frames and no target tokens, so they weigh nothing anywhere.
            arrays = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in arrays.items()}
            arrays["row_weight"] = np.array([1.0] * len(examples) + [0.0] * pad, np.float32)
            texts = [normalize_text(_to_str(e["text"]), self.lowercase) for e in examples]
            arrays["text"] = texts + [""] * pad
            yield arrays


def _tokenizer(config, data_dir: str, name: str, train: Sequence[dict], lowercase: bool) -> Tokenizer:
    """The transcripts' tokenizer, trained on (up to ``tokenizer_train_examples``) train texts once."""
    model_type = str(getattr(config, "tokenizer_model_type", "char") or "char")
    vocab_size = int(getattr(config, "vocab_size", 64) or 64)
    path = os.path.join(
        data_dir, "tokenizers", name.replace("/", "_"), f"{model_type}_v{vocab_size}", "spm.model"
    )
    if os.path.exists(path):
        return Tokenizer.load(path)
    count = min(len(train), int(getattr(config, "tokenizer_train_examples", 50_000) or 50_000))
    texts = [normalize_text(_to_str(train[i]["text"]), lowercase) for i in range(count)]
    return train_tokenizer(texts, vocab_size, model_type, path)


def train_tokenizer(texts: Sequence[str], vocab_size: int, model_type: str = "char", path=None) -> Tokenizer:
    """The project's SentencePiece tokenizer over transcripts; ``char`` keeps every character (~30)."""
    coverage = 1.0 if model_type == "char" else 0.9995
    return Tokenizer.train(texts, vocab_size, path, model_type=model_type, character_coverage=coverage)


def make_speech_data(data_config, *, data_dir: str) -> SpeechData:
    """Speech data from ``config.data``.

    Fields: ``source`` (``espeak_speech`` or a TFDS name such as ``librispeech``), ``builder_config``,
    ``splits`` (role → split name), ``sample_rate``, ``num_mel_bins``, ``max_frames``, ``max_target_len``,
    ``vocab_size``, ``tokenizer_model_type`` (``char`` or ``unigram``), ``tokenizer_train_examples``,
    ``lowercase``, ``num_threads``, ``frame_buckets`` (length-bucketed training batches; empty: off) and
    ``bucket_window``; optional ``builder_kwargs`` for the offline builder.

    Raises:
        DatasetUnavailableError: espeak-ng or the catalogs are missing, or a TFDS dataset is not prepared.
        ValueError: ``frame_buckets`` is not a list of distinct lengths up to ``max_frames``.
    """
    data_dir = os.path.expanduser(data_dir)
    splits = dict(getattr(data_config, "splits", None) or {s: s for s in ("train", "validation", "test")})
    lowercase = bool(getattr(data_config, "lowercase", True))
    buckets = check_buckets(
        getattr(data_config, "frame_buckets", None) or (),
        int(data_config.max_frames),
        "config.data.frame_buckets",
        "config.data.max_frames",
    )
    if data_config.source in OFFLINE_SPEECH:
        from moe_jax.data.builders.espeak_speech import EspeakSpeech

        builder = EspeakSpeech(
            config=getattr(data_config, "builder_config", None) or EspeakSpeech.DEFAULT_CONFIG_NAME,
            data_dir=data_dir,
            file_format="array_record",
            **dict(getattr(data_config, "builder_kwargs", None) or {}),
        )
        builder.download_and_prepare()
        sources = {role: builder.as_data_source(split) for role, split in splits.items()}
        name = f"{data_config.source}/{builder.builder_config.name}"
    else:
        name = data_config.source
        if getattr(data_config, "builder_config", None):
            name = f"{name}/{data_config.builder_config}"
        sources = {role: prepared_source(name, split, data_dir) for role, split in splits.items()}
    return SpeechData(
        tokenizer=_tokenizer(data_config, data_dir, name, sources["train"], lowercase),
        sources=sources,
        sample_rate=int(data_config.sample_rate),
        num_mel_bins=int(data_config.num_mel_bins),
        max_frames=int(data_config.max_frames),
        max_target_len=int(data_config.max_target_len),
        lowercase=lowercase,
        name=name,
        num_threads=int(getattr(data_config, "num_threads", 2) or 2),
        frame_buckets=buckets,
        bucket_window=int(getattr(data_config, "bucket_window", 32) or 32),
        lengths_dir=os.path.join(data_dir, "lengths"),
    )
