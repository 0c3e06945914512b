"""Real-data config variants train one step on ``tfds.testing.mock_data``.

``configs/translation.py:wmt14_de_en``, ``configs/summarization.py:cnn_dailymail`` and ``:xsum`` read prepared
TFDS datasets that our machines do not have; ``mock_data(policy=USE_CODE)`` patches ``tfds.data_source`` to
return random examples built from each dataset's feature spec, so the whole path (TFDS source → text pairs →
SentencePiece → Grain → model → one update → validation → decoding) runs. The model, batch, vocabulary and
evaluation are shrunk here so each case takes seconds; the data fields (source, keys) stay the config's.
"""

import importlib.util
import json
import math
import os

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from moe_jax.train import loop  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, variant):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def shrink(c, data_dir, *, decode):
    """Tiny model and run; the data section keeps the config's source and feature keys."""
    c.data_dir = str(data_dir)
    c.data.update(vocab_size=200, max_input_len=16, max_target_len=8, tokenizer_train_examples=64)
    c.model.update(
        d_model=16,
        num_heads=2,
        d_ff=32,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dtype="float32",
        dropout_rate=0.0,
        max_len=64,
    )
    c.model.moe.update(layers=(0,), num_experts=4, top_k=2)
    c.optim.warmup_steps = 1
    c.train.update(
        batch_size=8,
        num_train_steps=1,
        log_every=1,
        eval_every=0,
        checkpoint_every=0,
        tensorboard=False,
        async_checkpoints=False,
    )
    c.eval.update(
        batch_size=8,
        max_eval_examples=8,
        max_decode_examples=8 if decode else 0,
        beam_size=0,  # greedy decoding only (beam search is tested in test_decode.py)
        num_samples=1,
        max_decode_len=8,
        decode_at_start=False,
    )
    return c


@pytest.mark.parametrize(
    "name,variant,source,decode",
    [
        # ~30 s each (a one-step train + decode on mock data); CI runs them in its slow set (suite time).
        pytest.param("translation", "wmt14_de_en", "wmt14_translate/de-en", True, marks=pytest.mark.slow),
        pytest.param("summarization", "cnn_dailymail", "cnn_dailymail", False, marks=pytest.mark.slow),
        pytest.param("summarization", "xsum", "xsum", False, marks=pytest.mark.slow),
    ],
)
def test_real_data_variant_trains_one_step_on_mock_data(name, variant, source, decode, tmp_path):
    c = shrink(load_config(name, variant), tmp_path / "data", decode=decode)
    assert c.data.source == source
    workdir = tmp_path / "work"
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        final = loop.train_and_evaluate(c, str(workdir))
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    assert [r["step"] for r in train_rows] == [1]
    assert math.isfinite(train_rows[0]["loss"]) and train_rows[0]["loss"] > 0
    assert math.isfinite(final["val_loss"])
    if decode:
        metric = "greedy_bleu" if name == "translation" else "greedy_rouge1"
        assert metric in final
    # The tokenizer was trained on the (mock) train split and saved under the data dir.
    assert any(f == "spm.model" for _, _, files in os.walk(tmp_path / "data") for f in files)


@pytest.mark.parametrize(
    "variant,source",
    [
        pytest.param("lm1b", "lm1b", marks=pytest.mark.slow),
        pytest.param("c4", "c4/en", marks=pytest.mark.slow),
    ],
)
def test_real_data_lm_variant_trains_one_step_on_mock_data(variant, source, tmp_path):
    """``configs/lm.py:lm1b`` / ``:c4``: evaluation reads halves of the split the dataset has."""
    c = load_config("lm", variant)
    assert c.data.source == source and set(c.data.splits) == {"validation", "test"}
    c.data_dir = str(tmp_path / "data")
    c.data.update(vocab_size=300, seq_len=16, tokenizer_train_chars=20_000)
    c.model.update(d_model=16, num_heads=2, num_kv_heads=1, d_ff=32, num_decoder_layers=2, dtype="float32")
    c.model.moe.update(layers=(1,), num_experts=4, top_k=2, d_ff=16)
    c.optim.warmup_steps = 1
    c.train.update(batch_size=8, num_train_steps=1, log_every=1, eval_every=0, checkpoint_every=0)
    c.train.update(tensorboard=False, async_checkpoints=False)
    c.eval.update(batch_size=8, max_eval_examples=8, num_samples=1, prompt_tokens=4, max_new_tokens=4)
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        final = loop.train_and_evaluate(c, str(tmp_path / "work"))
    assert math.isfinite(final["val_loss"]) and final["val_bits_per_byte"] > 0
    assert math.isfinite(final["test_loss"])
