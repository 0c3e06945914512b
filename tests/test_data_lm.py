"""Language-model data: the python_source builder, the lossless tokenizer, packing, resume, shards, eval."""

import io
import json
import os
import random
import time

import grain
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from moe_jax.data import DatasetUnavailableError, Tokenizer
from moe_jax.data.builders import common
from moe_jax.data.builders import python_source as ps
from moe_jax.data.lm import LMData, lm_data_from_texts, make_lm_data, training_sentences
from moe_jax.data.testing import fake_pairs
from moe_jax.data.tokenizer import BOS_ID, EOS_ID
from moe_jax.errors import ConfigError

SEQ_LEN = 64
# Code the tokenizer must give back byte for byte: tabs, runs of spaces, CRLF, trailing blanks, non-ASCII
# identifiers and strings, an emoji, a NUL, and a literal U+2581 (SentencePiece's own space symbol).
TRICKY = [
    "def f(x):\n\tif x:\n\t\treturn  x   # two  spaces\r\n",
    "    indented\n\n\n        deeper   \n",
    " leading space and trailing newlines\n\n",
    "naïve = 'Grüße, 世界 😀'\x00\n",
    "literal \u2581 meta \u2581\u2581 space\u2581",
    "\n",
    "",
]


def _module_source(rng: random.Random, index: int) -> str:
    names = ["alpha", "beta", "gamma", "delta", "größe", "value", "items", "résumé"]
    lines = [f'"""Module {index}: {rng.choice(names)} helpers."""', "", "import os", ""]
    for f in range(rng.randint(1, 4)):
        lines.append(f"def {rng.choice(names)}_{index}_{f}(x, y={rng.randint(0, 9)}):")
        lines.append(f'    """Return {rng.choice(names)} of x."""')
        for _ in range(rng.randint(1, 5)):
            indent = " " * (4 * rng.randint(1, 3))
            lines.append(f"{indent}x = x + {rng.choice(names)!r}  # {rng.choice(names)}")
        lines.append("\treturn x" if rng.random() < 0.2 else "    return x")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_python_tree(root, num_files: int = 120) -> dict[str, str]:
    """A package of small modules plus files the builder must skip; returns the expected documents."""
    rng = random.Random(0)
    expected = {}
    for i in range(num_files):
        rel = f"pkg{i % 3}/{'tests/' if i % 5 == 0 else ''}mod_{i}.py"
        text = _module_source(rng, i) + TRICKY[i % len(TRICKY)]
        expected[rel] = text
    for rel, text in expected.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    skipped = {
        "pkg0/empty.py": b"",
        "pkg0/blank.py": b"\n  \n",
        "pkg1/latin1.py": "x = 'caf\xe9'\n".encode("latin-1"),
        "pkg1/zz_copy_of_mod_1.py": expected["pkg1/mod_1.py"].encode(),
        "pkg2/__pycache__/cached.py": b"x = 1\n",
        "site-packages/installed.py": b"x = 2\n",
        "pkg2/notes.txt": b"not python\n",
    }
    for rel, data in skipped.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return expected


def _config(root, **overrides):
    config = ml_collections.ConfigDict(
        dict(
            source="python_source",
            builder_config=None,
            builder_kwargs={"roots": [str(root)], "min_documents": 20},
            text_key="text",
            vocab_size=400,
            seq_len=SEQ_LEN,
            tokenizer_train_chars=100_000,
            num_threads=2,
        )
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm")
    expected = write_python_tree(base / "src")
    data = make_lm_data(_config(base / "src"), data_dir=str(base / "data"))
    return data, expected, base


def _doc_pairs(tokenizer: Tokenizer, text: str) -> list[tuple[int, int]]:
    ids = [BOS_ID, *tokenizer.encode(text), EOS_ID]
    return list(zip(ids[:-1], ids[1:]))


def _row_pairs(rows) -> list[tuple[int, int]]:
    pairs = []
    for row in rows:
        real = row["token_weight"] > 0
        pairs.extend(zip(row["inputs"][real].tolist(), row["targets"][real].tolist()))
    return pairs


def _documents_in(batches, tokenizer: Tokenizer) -> list[str]:
    """Decodes the documents a stream of packed rows holds (each starts with input BOS at position 0)."""
    docs, current = [], None
    for batch in batches:
        for inputs, segments, positions in zip(batch["inputs"], batch["segment_ids"], batch["positions"]):
            for token, segment, position in zip(inputs, segments, positions):
                if segment == 0:
                    continue
                if token == BOS_ID:
                    assert position == 0
                    if current is not None:
                        docs.append(tokenizer.decode(current[1:]))
                    current = []
                current.append(int(token))
    return docs  # The last, possibly unfinished document is left out.


# -- builder ---------------------------------------------------------------------------------------------


def test_builder_reads_every_python_file_once_and_splits_by_path(corpus):
    data, expected, _ = corpus
    by_split = {split: data.sources[split] for split in common.SPLITS}
    assert all(by_split.values()), "every split holds documents"
    stored = [text for texts in by_split.values() for text in texts]
    # Empty, non-UTF-8, duplicate, __pycache__, site-packages and non-.py files are not documents.
    assert sorted(stored) == sorted(expected.values())
    for split, texts in by_split.items():
        want = {text for rel, text in expected.items() if common.split_of(rel) == split}
        assert set(texts) == want
    assert data.num_documents == {split: len(texts) for split, texts in by_split.items()}
    assert data.name == "python_source/with_tests"


def test_document_listing_is_deterministic_and_configurable(corpus):
    _, expected, base = corpus
    config = ps.PythonSourceConfig(name="t")
    docs, stats = ps.load_documents([str(base / "src")], config)
    assert [path for path, _ in docs] == sorted(p for p in expected)  # sorted walk, posix relative paths
    # empty.py, blank.py, latin1.py and zz_copy_of_mod_1.py are seen and skipped; __pycache__ and
    # site-packages are never walked.
    assert stats == {"files": len(expected) + 4, "documents": len(expected), "skipped": 4}
    no_tests = ps.PythonSourceConfig(name="t2", include_tests=False)
    assert all("/tests/" not in path for path, _ in ps.load_documents([str(base / "src")], no_tests)[0])
    small = ps.PythonSourceConfig(name="t3", max_file_bytes=300)
    assert all(len(text.encode()) <= 300 for _, text in ps.load_documents([str(base / "src")], small)[0])


def test_real_standard_library_prepares_in_seconds(tmp_path):
    start = time.time()
    builder = ps.PythonSource(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    seconds = time.time() - start
    paths = {split: [e["path"].decode() for e in builder.as_data_source(split)] for split in common.SPLITS}
    assert sum(map(len, paths.values())) > 1000 and len(paths["validation"]) > 20 and len(paths["test"]) > 20
    assert all(common.split_of(p) == split for split, ps_ in paths.items() for p in ps_)
    assert any(p.startswith("test/") for p in paths["train"])  # the test suites are documents too
    assert seconds < 30


def test_missing_or_tiny_roots_are_one_clear_line(tmp_path):
    for kwargs, needle in (
        ({"roots": [str(tmp_path / "nowhere")]}, "no directory"),
        ({"roots": [str(tmp_path)]}, "found 0 usable .py files"),
    ):
        builder = ps.PythonSource(data_dir=str(tmp_path / "data"), file_format="array_record", **kwargs)
        with pytest.raises(DatasetUnavailableError) as info:
            builder.download_and_prepare()
        assert "\n" not in str(info.value) and needle in str(info.value) and "roots" in str(info.value)


# -- tokenizer -------------------------------------------------------------------------------------------


def test_tokenizer_round_trip_is_exact_for_code(corpus):
    data, _, _ = corpus
    tok = data.tokenizer
    assert tok.byte_fallback and (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    texts = TRICKY + list(data.sources["validation"]) + list(data.sources["test"])
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts
    assert tok.encode("\u2581") == [tok._sp.piece_to_id(f"<0x{b:02X}>") for b in "\u2581".encode()]
    assert 1 not in {i for text in texts for i in tok.encode(text)}  # no UNK: bytes instead


def test_piece_byte_lengths_sum_to_the_utf8_length(corpus):
    data, _, _ = corpus
    lengths = data.tokenizer.piece_byte_lengths()
    assert lengths.dtype == np.int32 and lengths.shape == (data.tokenizer.vocab_size,)
    assert lengths[[0, 1, 2]].tolist() == [0, 0, 0] and lengths[EOS_ID] == 1
    for text in TRICKY + list(data.sources["validation"]):
        ids = data.tokenizer.encode(text, add_eos=True)
        assert lengths[ids].sum() == len(text.encode("utf-8")) + 1


def test_tokenizer_training_is_deterministic_and_reused(corpus):
    data, _, base = corpus
    mtime = os.path.getmtime(data.tokenizer_path)
    assert data.tokenizer_path.endswith(
        os.path.join("tokenizers", "python_source_with_tests", "v400", "spm.model")
    )
    again = make_lm_data(_config(base / "src"), data_dir=str(base / "data"))
    assert os.path.getmtime(again.tokenizer_path) == mtime
    retrained = make_lm_data(
        _config(base / "src", tokenizer_path=str(base / "again.model")), data_dir=str(base / "data")
    )
    assert retrained.tokenizer.model_proto == data.tokenizer.model_proto


def test_training_sentences_keep_lines_whole_and_respect_the_cap():
    text = "a = 1\n" * 1000 + "x" * 4500 + "\n"
    sentences = list(training_sentences([text, "never read"], max_chars=len(text)))
    assert "".join(sentences) == text and max(map(len, sentences)) <= 2000
    assert all(s.endswith("\n") for s in sentences[:2])
    assert "".join(training_sentences(["abc", "def"], max_chars=4)) == "abcd"


def test_default_tokenizer_options_leave_seq2seq_models_bit_identical():
    sentences = [s for pair in fake_pairs(200) for s in pair]
    buf = io.BytesIO()
    # Tokenizer.train's call before the lossless options existed.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=120,
        model_type="unigram",
        character_coverage=0.9995,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        hard_vocab_limit=False,
        shuffle_input_sentence=False,
        max_sentence_length=16384,
        num_threads=1,
        minloglevel=2,
    )
    assert Tokenizer.train(sentences, 120).model_proto == buf.getvalue()
    assert not Tokenizer(buf.getvalue()).byte_fallback


def test_vocabulary_too_small_for_byte_fallback_is_a_config_error():
    with pytest.raises(ConfigError, match="vocab_size=200 is too small"):
        lm_data_from_texts({"train": ["x = 1\n"]}, seq_len=8, vocab_size=200)


# -- packing, iteration, resume --------------------------------------------------------------------------


def test_packing_loses_and_duplicates_nothing(corpus):
    data, _, _ = corpus
    tok = data.tokenizer
    rows = list(data.eval_rows("train"))
    expected = [pair for text in data.sources["train"] for pair in _doc_pairs(tok, text)]
    assert _row_pairs(rows) == expected  # every (input, target) pair once, in order
    for i, row in enumerate(rows):
        for key in ("inputs", "targets", "segment_ids", "positions"):
            assert row[key].dtype == np.int32 and row[key].shape == (SEQ_LEN,)
        assert row["token_weight"].dtype == np.float32
        seg, pos, inputs, targets = row["segment_ids"], row["positions"], row["inputs"], row["targets"]
        real = seg > 0
        if i < len(rows) - 1:
            assert real.all()  # only the split's last row has padding
        assert (inputs[~real] == 0).all() and (targets[~real] == 0).all() and (pos[~real] == 0).all()
        ids = seg[real]
        assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1}  # 1, 2, ... in order
        starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
        for a, b in zip(starts, [*starts[1:], real.sum()]):
            np.testing.assert_array_equal(pos[a:b], np.arange(b - a))  # positions restart per segment
            # Within a segment each target is the next input (a causal LM's shift).
            np.testing.assert_array_equal(targets[a : b - 1], inputs[a + 1 : b])
            # A segment ends at a document's end (target EOS) or at the row's end (cut, continues next row).
            assert targets[b - 1] == EOS_ID or b == SEQ_LEN
        # BOS is only ever the first input of a segment.
        assert all(pos[j] == 0 for j in np.flatnonzero(inputs == BOS_ID))
    assert sum(int(r["token_weight"].sum()) for r in rows) == data.count_tokens("train")


def test_one_training_epoch_holds_every_document_once(corpus):
    data, _, _ = corpus
    unshuffled = LMData(data.tokenizer, data.sources, SEQ_LEN, name="t", shuffle_rows=0)
    total_rows = data.count_tokens("train") // SEQ_LEN + 2
    it = unshuffled.train_iter(8, seed=3)
    batches = [next(it) for _ in range(2 * total_rows // 8 + 4)]  # a bit over two epochs
    assert all(b["token_weight"].all() for b in batches)  # training rows are always full
    docs = _documents_in(batches, data.tokenizer)
    n = data.num_documents["train"]
    epoch1, epoch2 = docs[:n], docs[n : 2 * n]
    assert sorted(epoch1) == sorted(data.sources["train"]) == sorted(epoch2)
    assert epoch1 != epoch2  # reshuffled each epoch
    again = unshuffled.train_iter(8, seed=3)
    np.testing.assert_array_equal(next(again)["inputs"], batches[0]["inputs"])
    assert not np.array_equal(next(unshuffled.train_iter(8, seed=4))["inputs"], batches[0]["inputs"])


def test_row_shuffling_permutes_rows_within_a_window(corpus):
    data, _, _ = corpus
    windowed = LMData(data.tokenizer, data.sources, SEQ_LEN, shuffle_rows=64)
    batch = next(windowed.train_iter(16, seed=0))
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "token_weight"}
    assert batch["inputs"].shape == (16, SEQ_LEN) and batch["token_weight"].dtype == np.float32
    unshuffled = LMData(data.tokenizer, data.sources, SEQ_LEN, shuffle_rows=0).train_iter(16, seed=0)
    first_window = [tuple(row) for _ in range(4) for row in next(unshuffled)["inputs"].tolist()]
    rows = [tuple(row) for row in batch["inputs"].tolist()]
    # The first batch draws from the first 64 packed rows, not just the first 16.
    assert set(rows) <= set(first_window) and rows != first_window[:16]


def _assert_same_batches(restored, expected):
    for want in expected:
        got = next(restored)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_iterator_state_resumes_at_the_exact_next_batch(corpus):
    data, _, _ = corpus
    small_windows = LMData(data.tokenizer, data.sources, SEQ_LEN, shuffle_rows=24)
    epoch_batches = data.count_tokens("train") // SEQ_LEN // 8
    for skip in (0, 5, epoch_batches - 2):  # at the start, mid-window, across the epoch boundary
        it = small_windows.train_iter(8, seed=7)
        assert isinstance(it, grain.DatasetIterator)
        for _ in range(skip):
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(6)]
        restored = small_windows.train_iter(8, seed=7)
        restored.set_state(json.loads(json.dumps(state)))  # what grain.checkpoint writes and reads
        _assert_same_batches(restored, expected)


def test_grain_checkpoint_with_orbax_restores_the_data_position(corpus, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    data, _, _ = corpus
    it = data.train_iter(8, seed=1)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    restored = data.train_iter(8, seed=1)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same_batches(restored, expected)


def test_process_shards_are_disjoint_and_cover_the_documents(corpus):
    data, _, _ = corpus
    unshuffled = LMData(data.tokenizer, data.sources, SEQ_LEN, shuffle_rows=0)
    train = data.sources["train"]
    shards = []
    for index in range(2):
        mine = train[index::2]
        tokens = sum(len(_doc_pairs(data.tokenizer, text)) for text in mine)
        it = unshuffled.train_iter(4, seed=0, shard_index=index, num_shards=2)
        # One epoch of this shard's rows, plus a batch to reach the BOS that closes its last document.
        batches = [next(it) for _ in range(tokens // (4 * SEQ_LEN) + 2)]
        shards.append(_documents_in(batches, data.tokenizer)[: len(mine)])
        assert sorted(shards[-1]) == sorted(mine)
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(train)
    with pytest.raises(DatasetUnavailableError, match="no document for shard 999 of 1000"):
        unshuffled.train_iter(4, seed=0, shard_index=999, num_shards=1000)


def test_eval_batches_pad_the_last_batch_and_repeat_exactly(corpus):
    data, _, _ = corpus
    batches = list(data.eval_batches("validation", 4, max_examples=6))
    assert len(batches) == 2
    last = batches[-1]
    assert set(last) == {"inputs", "targets", "segment_ids", "positions", "token_weight", "row_weight"}
    np.testing.assert_array_equal(last["row_weight"], [1, 1, 0, 0])
    assert last["row_weight"].dtype == np.float32
    for key in ("inputs", "targets", "segment_ids", "positions", "token_weight"):
        assert (last[key][2:] == 0).all() and last[key].shape == (4, SEQ_LEN)
    full = list(data.eval_batches("validation", 4))
    assert sum(b["row_weight"].sum() for b in full) == len(list(data.eval_rows("validation")))
    assert sum(b["token_weight"].sum() for b in full) == data.count_tokens("validation")
    for a, b in zip(full, data.eval_batches("validation", 4)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(DatasetUnavailableError, match="no 'dev' split"):
        list(data.eval_batches("dev", 4))


def test_in_memory_data_from_texts():
    texts = [f"def f_{i}(x):\n    return x * {i}\n" for i in range(40)]
    data = lm_data_from_texts({"train": texts, "test": texts[:3]}, seq_len=16, vocab_size=300)
    assert data.num_documents == {"train": 40, "test": 3} and data.tokenizer_path is None
    batch = next(data.train_iter(4, seed=0))
    assert batch["inputs"].shape == (4, 16)
    assert _row_pairs(data.eval_rows("test")) == [p for t in texts[:3] for p in _doc_pairs(data.tokenizer, t)]


# -- real TFDS corpora -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source,builder_config", [("lm1b", None), ("c4", "en")])
def test_real_tfds_text_datasets_under_mock_data(tmp_path, source, builder_config):
    import tensorflow_datasets as tfds

    config = ml_collections.ConfigDict(
        dict(source=source, builder_config=builder_config, text_key="text", vocab_size=300, seq_len=16)
    )
    config.tokenizer_train_chars = 20_000
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        data = make_lm_data(config, data_dir=str(tmp_path))
        batch = next(data.train_iter(4, seed=0))
        evals = list(data.eval_batches("test", 4, max_examples=6))
    assert data.name in ("lm1b", "c4/en")
    assert data.num_documents["train"] == 12
    assert batch["inputs"].shape == (4, 16) and batch["token_weight"].all()
    assert len(evals) == 2 and evals[-1]["row_weight"].tolist() == [1, 1, 0, 0]
    assert os.path.exists(data.tokenizer_path)


def test_missing_real_dataset_is_one_clear_line(tmp_path):
    config = ml_collections.ConfigDict(dict(source="lm1b", vocab_size=300, seq_len=16))
    with pytest.raises(DatasetUnavailableError) as info:
        make_lm_data(config, data_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "lm1b" in message and str(tmp_path) in message
    assert "tfds build lm1b" in message


def test_wrong_text_key_is_one_clear_line(tmp_path):
    import tensorflow_datasets as tfds

    config = ml_collections.ConfigDict(dict(source="lm1b", text_key="body", vocab_size=300, seq_len=16))
    mock = tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE)
    with mock, pytest.raises(DatasetUnavailableError, match="no text feature 'body'.*set data.text_key"):
        make_lm_data(config, data_dir=str(tmp_path))
