"""Data: offline TFDS builders, the SentencePiece tokenizer and the Grain pipeline the trainer reads.

Importing this package is cheap; TFDS, Grain and SentencePiece load when a submodule is used.
"""

import importlib

from moe_jax.data.errors import DatasetUnavailableError

_LAZY = {
    "LMData": "moe_jax.data.lm",
    "make_lm_data": "moe_jax.data.lm",
    "lm_data_from_texts": "moe_jax.data.lm",
    "Seq2SeqData": "moe_jax.data.pipeline",
    "make_seq2seq_data": "moe_jax.data.pipeline",
    "seq2seq_data_from_pairs": "moe_jax.data.pipeline",
    "Tokenizer": "moe_jax.data.tokenizer",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_jax.data' has no attribute {name!r}")


__all__ = [
    "DatasetUnavailableError",
    "LMData",
    "Seq2SeqData",
    "Tokenizer",
    "lm_data_from_texts",
    "make_lm_data",
    "make_seq2seq_data",
    "seq2seq_data_from_pairs",
]
