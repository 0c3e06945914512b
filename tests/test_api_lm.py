"""The quick API's language model (``task='language_modeling'``): learning, generation, save/load, defaults.

One tiny model is trained once for the module (five sentences, ten copies each) and every test reads it.
Hostile inputs and damaged saved files of this task are in the catalogue, ``tests/test_bad_inputs_api.py``.
"""

import json

import pytest

from moe_jax import SparseMoeModel
from moe_jax.models import DecoderLM

SENTENCES = (
    "the cat sat on the mat",
    "the dog ran in the park",
    "a bird flew over the tall tree",
    "my friend reads a good book",
    "one two three four five six",
)
TEXTS = [SENTENCES[i % len(SENTENCES)] for i in range(50)]
# Each prompt has one continuation in the corpus (its leading space included).
CONTINUATIONS = {
    "the cat sat": " on the mat",
    "the dog ran": " in the park",
    "a bird flew": " over the tall tree",
    "my friend": " reads a good book",
    "one two three": " four five six",
}
# The empty prompt generates a document from its start: one of the sentences.
PROMPTS = [*CONTINUATIONS, ""]
# The einsum dispatch routes dropless exactly as the default dispatch does, and compiles ~3x faster on CPU
# (train step 7 s against 19 s, generation 3 s against 14 s, here).
ARCH = dict(num_experts=4, top_k=2, d_model=32, num_layers=1, dispatch="einsum")
EPOCHS = 15


@pytest.fixture(scope="module")
def lm():
    m = SparseMoeModel(task="language_modeling", **ARCH)
    history = m.train(TEXTS, epochs=EPOCHS, learning_rate=1e-2, batch_size=8)
    return m, history


def test_routing_is_dropless_unless_asked_otherwise():
    moe = SparseMoeModel(task="language_modeling")._model_fields["moe"]
    assert moe["capacity_factor"] is None and moe["eval_capacity_factor"] is None
    # A training capacity the user asks for; generation stays dropless (the KV cache then matches the
    # full forward exactly) unless eval_capacity_factor is given too.
    moe = SparseMoeModel(task="language_modeling", capacity_factor=1.25)._model_fields["moe"]
    assert moe["capacity_factor"] == 1.25 and moe["eval_capacity_factor"] is None
    moe = SparseMoeModel(task="language_modeling", eval_capacity_factor=2.0)._model_fields["moe"]
    assert moe["eval_capacity_factor"] == 2.0
    # The other tasks keep their default capacity.
    assert SparseMoeModel(task="seq2seq")._model_fields["moe"]["capacity_factor"] == 1.25
    fields = SparseMoeModel(task="language_modeling", num_layers=3)._model_fields
    assert fields["num_encoder_layers"] == 0 and fields["num_decoder_layers"] == 3
    assert fields["moe"]["layers"] == (0, 1, 2)


def test_learns_and_continues_memorised_sentences(lm):
    m, history = lm
    assert isinstance(m.model, DecoderLM) and m.model.cfg.num_encoder_layers == 0
    assert m.model.cfg.vocab_size == m._tokenizer.vocab_size <= 1024
    longest = max(len(m._tokenizer.encode(s)) + 1 for s in SENTENCES)
    assert m._meta == {"seq_len": longest}
    assert len(history["loss"]) == EPOCHS and len(history["accuracy"]) == EPOCHS
    # Measured 6.2 -> 0.26: what is left is the first word of each sentence, which nothing predicts.
    assert history["loss"][-1] < 0.1 * history["loss"][0], history["loss"]
    out = m.predict(PROMPTS)
    assert out[:-1] == list(CONTINUATIONS.values()) and out[-1] in SENTENCES, out
    # At most max_new_tokens tokens: a prefix of the full continuation.
    short = m.predict(PROMPTS, max_new_tokens=2)
    for got, want in zip(short, out):
        assert got and want.startswith(got) and len(m._tokenizer.encode(got)) <= 2, (got, want)
    # The same continuations whatever the batch (dropless routing: rows never compete for capacity).
    assert m.predict(PROMPTS, batch_size=4) == out


def test_sampling_is_reproducible_and_differs_from_greedy(lm):
    m, _ = lm
    greedy = m.predict(PROMPTS)
    hot = m.predict(PROMPTS, temperature=10.0, seed=0)
    assert all(isinstance(s, str) for s in hot)
    assert m.predict(PROMPTS, temperature=10.0, seed=0) == hot
    assert hot != greedy
    assert m.predict(PROMPTS, temperature=10.0, seed=1) != hot
    # top_k=1 keeps only the most likely token, so sampling picks what greedy does.
    assert m.predict(PROMPTS, temperature=1.0, top_k=1, seed=3) == greedy


def test_save_load_continues_identically(lm, tmp_path):
    m, _ = lm
    m.save(tmp_path / "lm")
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == [
        "config.json",
        "state.msgpack",
        "tokenizer.model",
    ]
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert config["meta"] == m._meta and config["init_args"]["task"] == "language_modeling"
    assert config["init_args"]["capacity_factor"] is None
    loaded = SparseMoeModel.load(tmp_path / "lm")
    assert loaded.task == "language_modeling" and loaded._meta == m._meta
    assert loaded.predict(PROMPTS) == m.predict(PROMPTS)
    sample = dict(temperature=10.0, seed=0)
    assert loaded.predict(PROMPTS, **sample) == m.predict(PROMPTS, **sample)
