"""The espeak-ng speech builder and the speech pipeline: deterministic, disjoint splits; a held-out voice;
batches; and the one-line error when espeak-ng is missing."""

import collections
import os

import numpy as np
import pytest

from moe_jax.data import DatasetUnavailableError
from moe_jax.data.builders import espeak_speech
from moe_jax.data.speech import make_speech_data
from tests.test_bad_inputs import assert_one_error, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "validation", "test", "test_voice")


def _prepare(data_dir):
    builder = espeak_speech.EspeakSpeech(config="tiny", data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return {s: [builder.as_data_source(s)[i] for i in range(len(builder.as_data_source(s)))] for s in SPLITS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("speech_a"))


def _text(e):
    return e["text"].decode() if isinstance(e["text"], bytes) else str(e["text"])


def _voice(e):
    return e["voice"].decode() if isinstance(e["voice"], bytes) else str(e["voice"])


def test_no_sentence_in_two_splits(tiny):
    by_split = {s: {_text(e) for e in tiny[s]} for s in ("train", "validation", "test")}
    assert all(by_split.values())
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["validation"] & by_split["test"]
    # The held-out voice speaks exactly the held-out test sentences.
    assert {_text(e) for e in tiny["test_voice"]} == by_split["test"]


def test_held_out_voice_is_absent_from_training(tiny):
    held_out = {_voice(e) for e in tiny["test_voice"]}
    assert len(held_out) == 1
    voice = held_out.pop()
    accent, variant = voice.split("+")
    for split in ("train", "validation", "test"):
        voices = {_voice(e) for e in tiny[split]}
        assert voice not in voices
        assert not any(v.startswith(accent + "+") for v in voices), "the held-out accent leaked"
        assert not any(v.endswith("+" + variant) for v in voices), "the held-out variant leaked"
    # Training uses several voices, rates and noise levels.
    train = tiny["train"]
    assert len({_voice(e) for e in train}) >= 3
    assert len({int(e["rate"]) for e in train}) >= 2
    snrs = collections.Counter(float(e["snr_db"]) for e in train)
    assert np.inf in snrs and len(snrs) >= 3


def test_preparation_is_deterministic(tiny, tmp_path):
    again = _prepare(tmp_path / "speech_b")
    for split in SPLITS:
        assert len(again[split]) == len(tiny[split])
        key = lambda e: (_text(e), _voice(e))
        first = sorted(tiny[split], key=key)
        second = sorted(again[split], key=key)
        for a, b in zip(first, second):
            assert (
                key(a) == key(b) and int(a["rate"]) == int(b["rate"]) and int(a["pitch"]) == int(b["pitch"])
            )
            np.testing.assert_array_equal(a["speech"], b["speech"])  # noise included


def test_audio_is_16k_int16_speech(tiny):
    e = tiny["train"][0]
    assert e["speech"].dtype == np.int16
    seconds = len(e["speech"]) / espeak_speech.SAMPLE_RATE
    assert 0.3 < seconds < 5
    assert np.abs(e["speech"]).max() > 1000  # not silence


def test_transcripts_are_normalised():
    norm = espeak_speech.normalize_transcript
    assert norm("Can't open file: permission denied.") == "can't open file permission denied"
    assert norm("Re-scan the disk") == "re scan the disk"
    assert norm("Open 3 files") is None  # digits are spoken, not spelled
    assert norm("Invalid URL") is None  # acronyms are spelled letter by letter
    assert norm("Größe") is None


def test_pipeline_batches(tiny, tmp_path):
    import ml_collections

    c = ml_collections.ConfigDict(
        dict(
            source="espeak_speech",
            builder_config="tiny",
            splits={s: s for s in SPLITS},
            sample_rate=16_000,
            num_mel_bins=40,
            max_frames=240,
            max_target_len=24,
            vocab_size=64,
            tokenizer_model_type="char",
            num_threads=1,
        )
    )
    data = make_speech_data(c, data_dir=str(tmp_path / "speech_b"))
    assert data.tokenizer.vocab_size < 40  # characters
    batch = next(data.train_iter(4, seed=0))
    assert batch["features"].shape == (4, 240, 40) and batch["features"].dtype == np.float32
    assert batch["targets"].shape == (4, 24)
    for row, n in zip(batch["features"], batch["num_frames"]):
        assert 0 < n <= 240 and not row[n:].any()
    batches = list(data.eval_batches("test_voice", 5))
    assert sum(int(b["row_weight"].sum()) for b in batches) == len(tiny["test_voice"])
    last = batches[-1]
    pad = last["row_weight"] == 0
    assert not last["num_frames"][pad].any() and not last["targets"][pad].any()
    assert data.tokenizer.decode(batches[0]["targets"][0]) == batches[0]["text"][0]


def test_missing_espeak_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DatasetUnavailableError, match="apt-get install espeak-ng"):
        espeak_speech.find_espeak()
    code, err, _ = run_cli(
        [
            "--config=configs/speech.py:smoke",
            f"--workdir={tmp_path / 'work'}",
            f"--config.data_dir={tmp_path / 'data'}",
        ]
    )
    assert_one_error(code, err, 2, "espeak-ng is not installed", "apt-get install espeak-ng")


@pytest.mark.parametrize(
    "buckets, needle",
    [("(0,)", "distinct positive lengths"), ("(160,300)", "above config.data.max_frames=240")],
)
def test_bad_frame_buckets_are_one_error_line(tmp_path, buckets, needle):
    work = tmp_path / "work"
    code, err, _ = run_cli(
        [
            "--config=configs/speech.py:smoke",
            f"--workdir={work}",
            f"--config.data_dir={tmp_path / 'data'}",
            f"--config.data.frame_buckets={buckets}",
        ]
    )
    assert_one_error(code, err, 2, "config.data.frame_buckets", needle)
    assert not (tmp_path / "data").exists()  # refused before any corpus is prepared
