"""The trainer's data interface: tokenizer, batch shapes/padding/EOS, exact iterator resume, eval padding."""

import os
import time

import grain
import ml_collections
import numpy as np
import pytest

from moe_jax.data import DatasetUnavailableError, Tokenizer, make_seq2seq_data, seq2seq_data_from_pairs
from moe_jax.data.testing import fake_pairs, write_fake_catalogs
from moe_jax.data.tokenizer import EOS_ID, PAD_ID

SENTENCES = [s for pair in fake_pairs(300) for s in pair]


def _config(locale_dir, **overrides):
    config = ml_collections.ConfigDict(
        dict(
            source="gettext_translation",
            builder_config="en_de",
            builder_kwargs={"locale_dir": str(locale_dir), "min_pairs": 100},
            vocab_size=200,
            max_input_len=8,
            max_target_len=10,
            tokenizer_train_examples=1000,
        )
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def data_and_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    write_fake_catalogs(root / "locale", num_pairs=400)
    data = make_seq2seq_data(_config(root / "locale"), data_dir=str(root / "data"))
    return data, root


def test_tokenizer_round_trip_and_special_ids(tmp_path):
    path = tmp_path / "spm.model"
    tok = Tokenizer.train(SENTENCES, 150, path)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert 4 < tok.vocab_size <= 150
    text = "Open the window"
    ids = tok.encode(text)
    assert min(ids) > EOS_ID and tok.decode(ids) == text
    assert tok.encode(text, add_eos=True) == ids + [EOS_ID]
    # decode stops at EOS and skips PAD/BOS.
    assert tok.decode([2] + ids + [EOS_ID] + tok.encode("garbage") + [PAD_ID, PAD_ID]) == text
    loaded = Tokenizer.load(path)
    assert loaded.encode(text) == ids and loaded.model_proto == tok.model_proto
    # Same sentences, same model (single-threaded training).
    assert Tokenizer.train(SENTENCES, 150).model_proto == tok.model_proto


def test_train_batches_shapes_padding_and_eos(data_and_dirs):
    data, _ = data_and_dirs
    assert sum(data.num_examples.values()) == 400 and data.num_examples["train"] > 300
    batch = next(data.train_iter(16, seed=0))
    assert set(batch) == {"inputs", "targets"}
    assert batch["inputs"].shape == (16, 8) and batch["inputs"].dtype == np.int32
    assert batch["targets"].shape == (16, 10) and batch["targets"].dtype == np.int32
    for row in [*batch["inputs"], *batch["targets"]]:
        eos = np.flatnonzero(row == EOS_ID)
        assert len(eos) == 1, row  # Exactly one EOS, also in truncated rows.
        assert (row[: eos[0]] > EOS_ID).all() and (row[eos[0] + 1 :] == PAD_ID).all()
    truncated = [r for r in batch["inputs"] if r[-1] == EOS_ID]
    assert truncated, "8-word sentences plus EOS overflow 8 tokens"


def test_second_call_reuses_prepared_data_and_tokenizer(data_and_dirs):
    data, root = data_and_dirs
    mtime = os.path.getmtime(data.tokenizer_path)
    start = time.time()
    again = make_seq2seq_data(_config(root / "locale"), data_dir=str(root / "data"))
    assert time.time() - start < 5
    assert os.path.getmtime(again.tokenizer_path) == mtime
    assert again.tokenizer.model_proto == data.tokenizer.model_proto


def test_iterator_state_restores_the_exact_next_batches(data_and_dirs):
    data, _ = data_and_dirs
    it = data.train_iter(32, seed=7)
    assert isinstance(it, grain.DatasetIterator)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(15)]  # 20 * 32 examples: crosses the ~360-example epoch boundary.
    restored = data.train_iter(32, seed=7)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        np.testing.assert_array_equal(got["targets"], want["targets"])


def test_epochs_reshuffle_and_cover_everything():
    pairs = [(f"in {i}", f"out {i}") for i in range(10)]
    data = seq2seq_data_from_pairs({"train": pairs}, max_input_len=6, max_target_len=6, vocab_size=40)
    it = data.train_iter(5, seed=0)
    rows = [tuple(r) for _ in range(4) for r in next(it)["inputs"]]
    epoch1, epoch2 = rows[:10], rows[10:]
    assert len(set(epoch1)) == 10 and set(epoch1) == set(epoch2)
    assert epoch1 != epoch2
    first = next(data.train_iter(5, seed=0))["inputs"]
    np.testing.assert_array_equal(first, next(data.train_iter(5, seed=0))["inputs"])
    assert not np.array_equal(first, next(data.train_iter(5, seed=1))["inputs"])


def test_shards_are_disjoint():
    pairs = [(f"in {i}", f"out {i}") for i in range(12)]
    data = seq2seq_data_from_pairs({"train": pairs}, max_input_len=6, max_target_len=6, vocab_size=40)
    shards = [
        {tuple(r) for r in next(data.train_iter(6, seed=0, shard_index=i, num_shards=2))["inputs"]}
        for i in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 6 and not shards[0] & shards[1]


def test_eval_batches_pad_the_last_batch(data_and_dirs):
    data, _ = data_and_dirs
    batches = list(data.eval_batches("validation", 4, max_examples=10))
    assert len(batches) == 3
    last = batches[-1]
    np.testing.assert_array_equal(last["row_weight"], [1, 1, 0, 0])
    assert last["row_weight"].dtype == np.float32
    assert (last["inputs"][2:] == PAD_ID).all() and (last["targets"][2:] == PAD_ID).all()
    assert last["inputs_text"][2:] == ["", ""] and last["targets_text"][2:] == ["", ""]
    texts = [t for b in batches for t in b["targets_text"]][:10]
    assert texts == [data.sources["validation"][i][1] for i in range(10)]
    # Non-truncated rows decode back to their text.
    for row, text in zip(batches[0]["targets"], batches[0]["targets_text"]):
        if row[-1] == PAD_ID:
            assert data.tokenizer.decode(row) == text
    full = list(data.eval_batches("test", 8))
    assert sum(b["row_weight"].sum() for b in full) == data.num_examples["test"]


@pytest.mark.parametrize(
    "source,builder_config",
    [("wmt14_translate", "de-en"), ("xsum", None), ("cnn_dailymail", None)],
)
def test_real_tfds_datasets_under_mock_data(tmp_path, source, builder_config):
    import tensorflow_datasets as tfds

    config = ml_collections.ConfigDict(
        dict(
            source=source,
            builder_config=builder_config,
            vocab_size=100,
            max_input_len=16,
            max_target_len=8,
            tokenizer_train_examples=50,
        )
    )
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        data = make_seq2seq_data(config, data_dir=str(tmp_path))
        batch = next(data.train_iter(4, seed=0))
        evals = list(data.eval_batches("test", 5))
    assert data.num_examples == {"train": 12, "validation": 12, "test": 12}
    assert batch["inputs"].shape == (4, 16) and batch["targets"].shape == (4, 8)
    assert len(evals) == 3 and evals[-1]["row_weight"].tolist() == [1, 1, 0, 0, 0]


def test_missing_real_dataset_is_one_clear_line(tmp_path):
    config = ml_collections.ConfigDict(
        dict(source="xsum", vocab_size=100, max_input_len=16, max_target_len=8, tokenizer_train_examples=50)
    )
    with pytest.raises(DatasetUnavailableError) as info:
        make_seq2seq_data(config, data_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "xsum" in message and str(tmp_path) in message
    assert "tfds build xsum" in message
