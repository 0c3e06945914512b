"""A deterministic synthetic seq2seq task (reverse a word sequence) for smoke tests and CLI checks.

Selected with ``config.data.source = 'synthetic'``; it needs no files, so tests of the trainer and the
command line run anywhere. It goes through the same tokenizer and Grain pipeline as the real corpora.
"""

from __future__ import annotations

import numpy as np

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "house",
    "green",
    "quick",
    "seven",
    "table",
    "music",
    "ocean",
    "paper",
    "light",
    "winter",
    "garden",
    "silver",
    "rocket",
    "forest",
    "candle",
    "mirror",
    "planet",
    "copper",
]


def reversal_pairs(num: int, seed: int, min_words: int = 2, max_words: int = 6) -> list[tuple[str, str]]:
    """``num`` (words, reversed words) pairs drawn from :data:`WORDS`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(min_words, max_words + 1))]
        out.append((" ".join(words), " ".join(reversed(words))))
    return out


def make_synthetic_data(data_config, seed: int = 0):
    """A :class:`~moe_jax.data.pipeline.Seq2SeqData` of the reversal task (train 2000, val/test 64 pairs)."""
    from moe_jax.data import seq2seq_data_from_pairs

    splits = {
        "train": reversal_pairs(2000, seed),
        "validation": reversal_pairs(64, seed + 1),
        "test": reversal_pairs(64, seed + 2),
    }
    return seq2seq_data_from_pairs(
        splits,
        max_input_len=int(data_config.max_input_len),
        max_target_len=int(data_config.max_target_len),
        vocab_size=min(int(data_config.vocab_size), 60),
    )
