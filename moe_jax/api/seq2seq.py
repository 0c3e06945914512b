"""Sequence-to-sequence tasks of the quick API: lists of strings in, strings out.

A SentencePiece vocabulary is trained on the training strings
(:func:`moe_jax.data.pipeline.seq2seq_data_from_pairs`), the model is the project's
:class:`~moe_jax.models.Seq2SeqTransformer`, every update is the one :func:`moe_jax.train.step.train_step`
over the seq2seq task's loss (same loss, load-balancing and z-loss terms, non-finite guard) and
prediction is the trainer's greedy decoding (:func:`moe_jax.train.decode.greedy_decode`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from moe_jax.api.saved import POSITIVE_INT, check_fields
from moe_jax.models.transformer import Seq2SeqTransformer

SEQ2SEQ_TASKS = ("translation", "summarization", "seq2seq")
# Quick-API options of these tasks that are not ModelConfig fields (with their defaults).
SEQ2SEQ_OPTIONS = {
    "vocab_size": None,  # requested SentencePiece size; default 1000 (small corpora get fewer)
    "max_input_len": None,  # input tokens (EOS included); default: longest training input
    "max_target_len": None,  # target/decoding tokens; default: longest training target
}
_MAX_AUTO_LEN = 128


def check_seq2seq_meta(meta: dict) -> None:
    """Checks the stored lengths (``ValueError`` naming the ``meta`` field)."""
    check_fields("meta", meta, {"max_input_len": POSITIVE_INT, "max_target_len": POSITIVE_INT})


class Seq2SeqTask:
    """The seq2seq half of :class:`~moe_jax.api.SparseMoeModel` (a mixin: state lives on the model)."""

    @staticmethod
    def _check_texts(values, name: str) -> list[str]:
        if isinstance(values, str) or not isinstance(values, Sequence | np.ndarray):
            raise ValueError(
                f"{name} must be a list of strings for a seq2seq task; got {type(values).__name__}"
            )
        values = list(values)
        if not values:
            raise ValueError(f"{name} is empty; pass at least one example")
        for i, v in enumerate(values):
            if not isinstance(v, str | np.str_):
                raise ValueError(f"{name}[{i}] is {type(v).__name__} ({v!r:.40}), not a string")
            if not v.strip():
                raise ValueError(
                    f"{name}[{i}]={v!r:.40} is empty or only whitespace; every example needs some text"
                )
        return [str(v) for v in values]

    def _build_seq2seq(self, cfg, rngs: nnx.Rngs) -> nnx.Module:
        return Seq2SeqTransformer(cfg, bos_id=self._tokenizer.bos_id, rngs=rngs)

    @staticmethod
    def _seq2seq_loss_sums(model, batch, *, dropout_key, deterministic):
        from moe_jax.tasks import seq2seq

        return seq2seq.loss_sums(model, batch, dropout_key=dropout_key, deterministic=deterministic)

    def _prepare_seq2seq(self, inputs, targets, batch_size, seed):
        from moe_jax.data.pipeline import seq2seq_data_from_pairs

        pairs = list(zip(inputs, targets))
        vocab = self._extras["vocab_size"] or 1000
        try:
            data = seq2seq_data_from_pairs(
                {"train": pairs},
                max_input_len=self._meta.get("max_input_len", 1),
                max_target_len=self._meta.get("max_target_len", 1),
                vocab_size=vocab,
                tokenizer=self._tokenizer,
            )
        except RuntimeError as e:  # SentencePiece training refused the corpus
            detail = str(e).split("] ", 1)[-1].strip()
            hint = "raise vocab_size" if "Vocabulary size" in detail else "check data and labels"
            raise ValueError(
                f"vocab_size={vocab}: SentencePiece cannot build a vocabulary from these texts "
                f"({detail}); {hint}"
            ) from None
        if self._model is None:
            self._tokenizer = data.tokenizer
            lengths = [len(ids) + 1 for ids in data.tokenizer.encode_batch(inputs)]
            t_lengths = [len(ids) + 1 for ids in data.tokenizer.encode_batch(targets)]
            self._meta = {
                "max_input_len": int(self._extras["max_input_len"] or min(max(lengths), _MAX_AUTO_LEN)),
                "max_target_len": int(self._extras["max_target_len"] or min(max(t_lengths), _MAX_AUTO_LEN)),
            }
            data.max_input_len = self._meta["max_input_len"]
            data.max_target_len = self._meta["max_target_len"]
            max_len = max(self._meta.values())
            cfg = self._model_config(
                vocab_size=data.tokenizer.vocab_size,
                max_len=max(self._model_fields.get("max_len", 512), max_len),
            )
            self._model = self._init(cfg)
        data.num_threads = 1
        it = data.train_iter(batch_size, seed=seed)

        def batches():
            for batch in it:
                yield {"inputs": batch["inputs"], "targets": batch["targets"]}

        return batches(), self._model

    def _predict_seq2seq(self, texts: list[str], batch_size: int) -> list[str]:
        from moe_jax.data.pipeline import seq2seq_data_from_pairs
        from moe_jax.train import decode as decode_lib

        tok = self._tokenizer
        data = seq2seq_data_from_pairs(
            {"predict": [(t, "") for t in texts]},
            max_input_len=self._meta["max_input_len"],
            max_target_len=1,
            tokenizer=tok,
        )
        graphdef, state = nnx.split(self._model)
        if self._predict_fn is None:
            max_len = self._meta["max_target_len"]

            def greedy(state, inputs):
                model = nnx.merge(graphdef, state)
                return decode_lib.greedy_decode(
                    model, inputs, max_len=max_len, bos_id=tok.bos_id, eos_id=tok.eos_id
                )

            self._predict_fn = jax.jit(greedy)
        out = []
        for batch in data.eval_batches("predict", min(batch_size, len(texts))):
            ids = decode_lib.to_token_lists(
                jax.device_get(self._predict_fn(state, batch["inputs"])), tok.eos_id
            )
            out += [tok.decode(row) for row, w in zip(ids, batch["row_weight"]) if w > 0]
        return out
