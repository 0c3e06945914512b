"""Summarization with a sparse-MoE encoder-decoder: Python docstring bodies → their summary line.

Run (CPU, offline; the corpus is read with ``ast`` from the standard library and installed packages)::

    python -m moe_jax.main --config=configs/summarization.py --workdir=/tmp/moe_summarization

Variants (``--config=configs/summarization.py:VARIANT``):
    default: d_model 256, 3+3 layers, 8 experts top-2 every other layer, inputs 96 / summaries 24 tokens.
        Hardware: 2 CPU cores; not yet timed (sized like the translation default). Expected:
        ROUGE-L rises clearly above its step-0 value (not yet measured).
    smoke: tiny model, a few steps (tests).
    cnn_dailymail: CNN/DailyMail (TFDS, prepared once with TensorFlow installed); 8 accelerators, ~1 day;
        expected ROUGE-L in the mid 30s.
    xsum: XSum (TFDS, prepared once); 8 accelerators, ~1 day; expected ROUGE-L around 25-30.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_moe_jax_config_base", os.path.join(os.path.dirname(__file__), "base.py")
)
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def get_config(variant: str = "default"):
    c = base.get_base_config()
    c.task = "summarization"
    c.data.source = "docstring_summarization"
    c.data.builder_config = None
    c.data.vocab_size = 4000
    c.data.max_input_len = 96
    c.data.max_target_len = 24
    c.model.update(num_encoder_layers=3, num_decoder_layers=3)
    c.train.batch_size = 32
    c.eval.update(batch_size=32, max_decode_examples=300, beam_size=2)
    if variant in ("default", "", None):
        c.eval.decode_at_start = True
    elif variant == "smoke":
        base.smoke(c)
        c.data.max_input_len = 24
        c.data.max_target_len = 8
    elif variant in ("cnn_dailymail", "xsum"):
        c.data.source = variant
        c.data.vocab_size = 32_000
        c.data.max_input_len = 512
        c.data.max_target_len = 128 if variant == "cnn_dailymail" else 64
        c.data.tokenizer_train_examples = 300_000
        c.model.update(
            d_model=512,
            num_heads=8,
            d_ff=2048,
            num_encoder_layers=6,
            num_decoder_layers=6,
            num_experts=32,
            top_k=2,
            dtype="bfloat16",
            dropout_rate=0.1,
            max_len=1024,
        )
        c.loss.label_smoothing = 0.1
        c.optim.update(learning_rate=5e-4, warmup_steps=4000)
        c.train.update(
            batch_size=128,
            num_train_steps=100_000,
            log_every=100,
            eval_every=5000,
            checkpoint_every=5000,
            keep_checkpoints=3,
        )
        c.eval.update(
            batch_size=64, max_decode_examples=2000, beam_size=4, max_decode_len=c.data.max_target_len
        )
    else:
        raise ValueError(f"unknown variant {variant!r}; choose default, smoke, cnn_dailymail or xsum")
    return c
