"""The quick API's speech recognizer: train on waveforms of varying length, predict strings, save / load,
and bad inputs as ``ValueError`` naming the argument."""

import numpy as np
import pytest

from moe_jax import SparseMoeModel
from moe_jax.data.builders import espeak_speech

WORDS = ["open file", "close window", "save file", "open window"]


@pytest.fixture(scope="module")
def corpus():
    """Eight utterances of four phrases from two espeak-ng voices (float32, 16 kHz, varying lengths)."""
    waves, texts = [], []
    for voice in ("en-us+m1", "en-gb+f1"):
        for text in WORDS:
            waves.append(espeak_speech.synthesize(text, voice, rate=180, pitch=50))
            texts.append(text)
    return waves, texts


def _model(**kw):
    return SparseMoeModel(
        task="speech_recognition", num_experts=4, top_k=2, d_model=32, num_layers=1, conv_channels=4, **kw
    )


@pytest.fixture(scope="module")
def trained(corpus):
    waves, texts = corpus
    m = _model()
    history = m.train(waves, texts, epochs=6, learning_rate=3e-3, batch_size=4, sample_rate=16_000)
    return m, history


def test_train_and_predict_strings(trained, corpus):
    m, history = trained
    waves, _ = corpus
    assert len({len(w) for w in waves}) > 1  # varying lengths
    assert len(history["loss"]) == 6 and history["loss"][-1] < history["loss"][0]
    out = m.predict(waves[:3])
    assert isinstance(out, list) and len(out) == 3 and all(isinstance(s, str) for s in out)
    # Batching does not change a transcript (one routing group per utterance, masked padding).
    assert m.predict(waves[:3], batch_size=1) == out
    # A longer input than any training utterance is padded further, not cut.
    assert len(m.predict([np.concatenate([waves[0], waves[1]])])) == 1


def test_save_load_predicts_the_same(trained, corpus, tmp_path):
    m, _ = trained
    waves, _ = corpus
    m.save(tmp_path / "asr")
    loaded = SparseMoeModel.load(tmp_path / "asr")
    assert loaded.task == "speech_recognition"
    assert loaded.predict(waves[:4]) == m.predict(waves[:4])
    assert loaded._meta["sample_rate"] == 16_000


@pytest.mark.parametrize(
    "data,labels,kw,match",
    [
        ("audio", ["x"], {}, "data must be a list of 1-D NumPy arrays"),
        ([np.zeros((2, 800), np.float32)], ["x"], {}, r"data\[0\] has shape \(2, 800\)"),
        ([np.zeros(0, np.float32)], ["x"], {}, r"data\[0\] is empty audio"),
        ([np.zeros(100, np.float32)], ["x"], {}, r"data\[0\] has 100 samples"),
        ([np.full(800, np.nan, np.float32)], ["x"], {}, r"data\[0\] holds NaN"),
        ([np.zeros(800, np.int32)], ["x"], {}, r"data\[0\] has dtype int32"),
        ([], [], {}, "data is empty"),
        ([np.zeros(800, np.float32)] * 2, ["x"], {}, "labels has 1 entries but data has 2"),
        ([np.zeros(800, np.float32)], [""], {}, r"labels\[0\]"),
        ([np.zeros(800, np.float32)], ["x"], {"sample_rate": 100}, "sample_rate=100 is not supported"),
        ([np.zeros(800, np.float32)], ["x"], {"sample_rate": 16000.5}, "sample_rate=16000.5"),
    ],
)
def test_bad_train_inputs_name_the_argument(data, labels, kw, match):
    m = _model()
    with pytest.raises(ValueError, match=match):
        m.train(data, labels, epochs=1, **kw)
    assert m.model is None  # nothing half-built


def test_bad_predict_inputs_name_the_argument(trained, corpus):
    m, _ = trained
    with pytest.raises(ValueError, match="sample_rate=22050 differs from the 16000 Hz"):
        m.predict(corpus[0][:1], sample_rate=22_050)
    with pytest.raises(ValueError, match=r"data\[1\] is empty audio"):
        m.predict([corpus[0][0], np.zeros(0, np.float32)])
    with pytest.raises(ValueError, match=r"data\[0\] has shape"):
        m.predict([np.zeros((800, 1), np.float32)])
    with pytest.raises(ValueError, match="sample_rate=22050 differs"):
        m.train(corpus[0], corpus[1], epochs=1, sample_rate=22_050)  # a second call keeps the rate


def test_sample_rate_belongs_to_speech_only():
    with pytest.raises(ValueError, match="sample_rate is an argument of task='speech_recognition' only"):
        SparseMoeModel(task="translation", d_model=16, num_layers=1).train(
            ["a b"], ["c d"], sample_rate=16000
        )
    with pytest.raises(ValueError, match="unknown model_overrides"):
        _model(patch_size=4)
