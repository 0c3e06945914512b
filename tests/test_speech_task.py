"""The speech task through the one trainer: the smoke config from the command line on a relative workdir
(as a user types it), the metrics it logs, and the LibriSpeech variant for one step on mock data."""

import json
import math
import os

import pytest

from tests.test_bad_inputs import run_cli
from tests.test_real_data_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ~40 s on a loaded 2-core machine (compiles the train and eval steps and greedy + beam decoding): slow set.
@pytest.mark.slow
def test_smoke_trains_from_the_command_line_on_a_relative_workdir(tmp_path):
    code, err, out = run_cli(
        [
            f"--config={os.path.join(ROOT, 'configs', 'speech.py')}:smoke",
            "--workdir=runs/speech",
            f"--config.data_dir={tmp_path / 'data'}",
        ],
        cwd=tmp_path,
    )
    assert code in (0, None), err[-3000:]
    workdir = tmp_path / "runs" / "speech"
    final = json.loads((workdir / "final_metrics.json").read_text())
    for split in ("test", "test_voice"):
        for decoder in ("greedy", "beam"):
            for rate in ("wer", "cer"):
                assert math.isfinite(final[f"{split}_{decoder}_{rate}"])
    assert math.isfinite(final["test_voice_loss"]) and math.isfinite(final["val_loss"])
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    start = [r for r in rows if r.get("kind") == "decode"]
    assert start and start[0]["step"] == 0 and "test_voice_greedy_wer" in start[0]
    train = [r for r in rows if r.get("kind") == "train"]
    # Routing metrics per MoE layer, encoder and decoder, as every task logs them.
    assert any(k.startswith("moe/encoder/layer_1/expert_load") for k in train[-1])
    assert any(k.startswith("moe/decoder/layer_1/dropped_fraction") for k in train[-1])
    assert "--- test_voice sample 0" in out and "reference:" in out


@pytest.mark.slow
def test_librispeech_variant_trains_one_step_on_mock_data(tmp_path):
    """Needs TensorFlow (the ``tf`` extra): TFDS's librispeech feature spec (Audio) is built with it."""
    import tensorflow  # noqa: F401  (imported here so a missing extra fails, never skips)
    import tensorflow_datasets as tfds

    from moe_jax.train import loop

    c = load_config("speech", "librispeech")
    assert c.data.source == "librispeech" and set(c.data.splits) >= {"train", "test", "test_other"}
    c.data_dir = str(tmp_path / "data")
    c.data.update(max_frames=64, max_target_len=16, vocab_size=40, tokenizer_model_type="char")
    c.data.frame_buckets = (32,)  # length-bucketed training batches of 32 or 64 frames
    c.model.update(d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=1)
    c.model.update(conv_channels=4, dtype="float32", freq_mask_width=4, time_mask_width=8)
    c.model.moe.update(layers=(0,), num_experts=4, top_k=2)
    c.optim.warmup_steps = 1
    c.train.update(batch_size=8, num_train_steps=1, log_every=1, eval_every=0, checkpoint_every=0)
    c.train.update(tensorboard=False, async_checkpoints=False)
    c.eval.update(batch_size=8, max_eval_examples=8, max_decode_examples=8, beam_size=0, num_samples=1)
    c.eval.update(max_decode_len=8, decode_at_start=False)
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        final = loop.train_and_evaluate(c, str(tmp_path / "work"))
    assert math.isfinite(final["val_loss"]) and math.isfinite(final["test_other_loss"])
    assert "test_greedy_wer" in final and "test_other_greedy_cer" in final
