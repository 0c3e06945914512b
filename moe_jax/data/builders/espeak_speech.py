"""TFDS builder: English speech synthesised offline with ``espeak-ng`` from the machine's gettext sentences.

Sentences are the English side of the gettext catalogs the translation builder reads
(:func:`moe_jax.data.builders.gettext_translation.load_pairs`), normalised to an ASR transcript (lower
case, letters, apostrophes and spaces; punctuation dropped, hyphens spoken as spaces) and kept when they are
short (``max_words``, ``max_chars``) and every word occurs at least ``min_word_count`` times in the corpus,
which drops the long tail of language and place names whose spelling no recognizer could infer from sound.

Every utterance is ``espeak-ng -v VOICE+VARIANT -s RATE -p PITCH --stdout`` (22,050 Hz WAV on stdout, read
with the stdlib ``wave`` module), resampled to 16 kHz with librosa (soxr), and, for most utterances, mixed
with white noise at one of a few SNRs. Voice, variant, rate, pitch and SNR are drawn from a hash of the
utterance key, so preparation is identical on every machine (the noise too: seeded by the same hash).

Splits, deterministic and disjoint:

* by sentence (a hash of the transcript, as the text builders split): ``train``, ``validation``, ``test``;
  no sentence is in two of them.
* by voice: ``train``, ``validation`` and ``test`` use the training voices only (accents × variants);
  ``test_voice`` speaks the ``test`` sentences with a held-out voice (an accent and a variant that no
  training utterance uses), so ``test`` vs ``test_voice`` isolates the voice.

Prepare (the trainer does this on first use)::

    EspeakSpeech(config='small', data_dir=DIR, file_format='array_record').download_and_prepare()

espeak-ng is a Debian/Ubuntu package (``apt-get install espeak-ng``), not a pip one; without it preparation
raises :class:`~moe_jax.data.errors.DatasetUnavailableError` saying so (the trainer prints it as one
``error:`` line and exits 2).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import os
import re
import shutil
import subprocess
import wave

import numpy as np
import tensorflow_datasets as tfds

from moe_jax.data.builders import common, gettext_translation
from moe_jax.data.errors import DatasetUnavailableError

SAMPLE_RATE = 16_000
ESPEAK = "espeak-ng"
INSTALL_HINT = (
    "espeak-ng is not installed (the offline speech corpus is synthesised with it): install it with "
    "`apt-get install espeak-ng` (Debian/Ubuntu; `brew install espeak-ng` on macOS), or use "
    "--config=configs/speech.py:librispeech with prepared TFDS data"
)
EVAL_SPLITS = ("train", "validation", "test", "test_voice")

_ALLOWED_RE = re.compile(r"[A-Za-z '’,.!?:;-]+")
_ACRONYM_RE = re.compile(r"\b[A-Z]{2,}")
_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


@dataclasses.dataclass(eq=False)
class EspeakSpeechConfig(tfds.core.BuilderConfig):
    """Corpus size, voices and acoustic conditions.

    Attributes:
      num_sentences: sentences taken (in hash order) from the filtered catalog sentences.
      split_permille: per-mille cut points (train end, validation end) of the sentence hash.
      train_repeats: utterances per training sentence, each with its own voice, rate, pitch and noise.
      accents, variants: the training voices are every ``accent+variant`` pair.
      held_out_voice: the ``test_voice`` split's voice (its accent and variant are in neither list).
      rates: speaking rates (words per minute) drawn from.
      pitches: pitches (0-99) drawn from.
      snrs_db: signal-to-noise ratios of the added white noise; ``None`` entries leave an utterance clean.
      max_words, max_chars, min_word_count: sentence filters (see the module docstring).
    """

    num_sentences: int = 2600
    split_permille: tuple[int, int] = (850, 900)
    train_repeats: int = 2
    accents: tuple[str, ...] = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp")
    variants: tuple[str, ...] = ("m1", "m3", "f1", "f3")
    held_out_voice: str = "en-gb-x-gbcwmd+f4"
    rates: tuple[int, ...] = (150, 170, 190, 210)
    pitches: tuple[int, ...] = (35, 50, 65)
    snrs_db: tuple[float | None, ...] = (None, 30.0, 20.0, 10.0)
    max_words: int = 6
    max_chars: int = 40
    min_word_count: int = 5


def normalize_transcript(text: str) -> str | None:
    """A catalog message as an ASR transcript, or None when it holds what speech cannot spell.

    Digits, symbols and all-capital acronyms (espeak spells them letter by letter) reject the sentence;
    punctuation is dropped, hyphens become spaces, curly apostrophes straight ones.
    """
    if not _ALLOWED_RE.fullmatch(text) or _ACRONYM_RE.search(text):
        return None
    text = text.replace("’", "'").replace("-", " ")
    text = " ".join(re.sub(r"[,.!?:;]", " ", text).lower().split())
    words = text.split()
    if not words or not all(_WORD_RE.fullmatch(w) for w in words):
        return None
    return text


def english_sentences(locale_dir: str, config: EspeakSpeechConfig) -> list[str]:
    """The filtered, deduplicated transcripts, in hash order (so taking the first N is a stable sample)."""
    pairs, _ = gettext_translation.load_pairs(
        locale_dir, gettext_translation.GettextTranslationConfig(name="en_de")
    )
    texts = sorted({t for en, _ in pairs if (t := normalize_transcript(en))})
    counts = collections.Counter(w for t in texts for w in t.split())
    kept = [
        t
        for t in texts
        if 2 <= len(t.split()) <= config.max_words
        and len(t) <= config.max_chars
        and all(counts[w] >= config.min_word_count for w in t.split())
    ]
    return sorted(kept, key=lambda t: hashlib.sha1(t.encode()).hexdigest())


def _pick(options, key: str, salt: str):
    digest = hashlib.sha1(f"{salt}\x00{key}".encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.sha1(f"noise\x00{key}".encode()).digest()[:8], "big")


def find_espeak() -> str:
    """Path of the espeak-ng program (looked up on PATH).

    Raises:
      DatasetUnavailableError: it is not installed (one line saying what to install).
    """
    path = shutil.which(ESPEAK)
    if path is None:
        raise DatasetUnavailableError(INSTALL_HINT)
    return path


def synthesize(text: str, voice: str, *, rate: int, pitch: int, espeak: str = ESPEAK) -> np.ndarray:
    """``text`` spoken by espeak-ng: float32 samples in [-1, 1] at 16 kHz.

    The text goes through stdin, so a sentence starting with ``-`` is never read as an option.
    """
    out = subprocess.run(
        [espeak, "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout"],
        input=text.encode("utf-8"),
        capture_output=True,
        check=True,
    ).stdout
    with wave.open(io.BytesIO(out)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise DatasetUnavailableError(
                f"{espeak} wrote {w.getnchannels()}-channel {8 * w.getsampwidth()}-bit audio; expected mono "
                "16-bit (reinstall espeak-ng)"
            )
        sr = w.getframerate()
        # The header's frame count is a placeholder when espeak-ng writes to a pipe: read what is there.
        samples = np.frombuffer(w.readframes(1 << 30), np.int16).astype(np.float32) / 32768.0
    if sr != SAMPLE_RATE:
        import librosa

        samples = librosa.resample(samples, orig_sr=sr, target_sr=SAMPLE_RATE)
    return samples.astype(np.float32)


def add_noise(samples: np.ndarray, snr_db: float | None, seed: int) -> np.ndarray:
    """White Gaussian noise at ``snr_db`` relative to the utterance's mean power (None: unchanged)."""
    if snr_db is None:
        return samples
    power = float(np.mean(samples.astype(np.float64) ** 2)) or 1e-8
    noise = np.random.default_rng(seed).standard_normal(samples.shape) * np.sqrt(power / 10 ** (snr_db / 10))
    return (samples + noise).astype(np.float32)


def _to_int16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)


class EspeakSpeech(tfds.core.GeneratorBasedBuilder):
    """English speech synthesised by espeak-ng from gettext sentences (offline, deterministic)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        EspeakSpeechConfig(name="small", description="~4k training utterances, 16 voices."),
        EspeakSpeechConfig(
            name="tiny",
            description="A few dozen utterances (tests).",
            num_sentences=60,
            split_permille=(600, 800),
            train_repeats=1,
            accents=("en-us", "en-gb"),
            variants=("m1", "f1"),
            max_words=3,
            max_chars=20,
        ),
    ]
    DEFAULT_CONFIG_NAME = "small"

    def __init__(self, *, locale_dir: str | None = None, workers: int | None = None, **kwargs):
        """Creates the builder.

        Args:
          locale_dir: where the gettext catalogs live (default ``/usr/share/locale``).
          workers: espeak-ng processes run at once (default: the CPU count, at most 4).
          **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (``config``, ``data_dir``, ``file_format``).
        """
        self._locale_dir = locale_dir or gettext_translation.DEFAULT_LOCALE_DIR
        self._workers = workers or min(4, os.cpu_count() or 1)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            # The feature names of TFDS's librispeech, so one pipeline reads both.
            features=tfds.features.FeaturesDict(
                {
                    # Raw int16 samples at SAMPLE_RATE (tfds.features.Audio would need TensorFlow to encode).
                    "speech": tfds.features.Tensor(shape=(None,), dtype=np.int16),
                    "text": tfds.features.Text(),
                    "voice": tfds.features.Text(),
                    "rate": np.int32,
                    "pitch": np.int32,
                    "snr_db": np.float32,  # +inf: clean
                }
            ),
            supervised_keys=("speech", "text"),
            homepage="https://github.com/espeak-ng/espeak-ng",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        cfg = self.builder_config
        espeak = find_espeak()
        sentences = english_sentences(self._locale_dir, cfg)[: cfg.num_sentences]
        by_split = {s: [] for s in common.SPLITS}
        for text in sentences:
            by_split[common.split_of(text, cfg.split_permille)].append(text)
        empty = [s for s, texts in by_split.items() if not texts]
        if empty:
            raise DatasetUnavailableError(
                f"espeak_speech/{cfg.name}: {len(sentences)} usable English sentences in "
                f"{self._locale_dir} leave the {'/'.join(empty)} split(s) empty; install language packs "
                "(gettext catalogs) or use --config=configs/speech.py:librispeech"
            )
        voices = [f"{a}+{v}" for a in cfg.accents for v in cfg.variants]
        if cfg.held_out_voice in voices:
            raise DatasetUnavailableError(f"held_out_voice={cfg.held_out_voice} is also a training voice")
        plans = {
            "train": [(t, r, voices) for t in by_split["train"] for r in range(cfg.train_repeats)],
            "validation": [(t, 0, voices) for t in by_split["validation"]],
            "test": [(t, 0, voices) for t in by_split["test"]],
            "test_voice": [(t, 0, [cfg.held_out_voice]) for t in by_split["test"]],
        }
        return {split: self._generate_examples(split, plan, espeak) for split, plan in plans.items()}

    def _generate_examples(self, split, plan, espeak):
        cfg = self.builder_config

        def one(item):
            text, repeat, voices = item
            key = f"{split}\x00{repeat}\x00{text}"
            voice = _pick(voices, key, "voice")
            rate, pitch = _pick(cfg.rates, key, "rate"), _pick(cfg.pitches, key, "pitch")
            snr = _pick(cfg.snrs_db, key, "snr")
            samples = add_noise(
                synthesize(text, voice, rate=rate, pitch=pitch, espeak=espeak), snr, _seed(key)
            )
            example = {
                "speech": _to_int16(samples),
                "text": text,
                "voice": voice,
                "rate": rate,
                "pitch": pitch,
                "snr_db": np.inf if snr is None else snr,
            }
            return common.example_key(split, str(repeat), text), example

        # espeak-ng is a separate process per utterance: threads only wait on it (and on soxr, which
        # releases the GIL), so a few of them keep the cores busy.
        with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
            yield from pool.map(one, plan)
