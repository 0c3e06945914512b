"""Language modelling in the quick API (``task='language_modeling'``): documents in, continuations out.

``train(texts)`` learns a decoder-only sparse-MoE language model from a Python list of strings, each string
one document; ``predict(prompts)`` returns the text each prompt continues with. The pieces are the
trainer's own, so the quick API and ``configs/lm.py`` train and generate the same way:

* data: :func:`moe_jax.data.lm.lm_data_from_texts` trains an exactly reversible byte-fallback SentencePiece
  vocabulary (BPE) on the texts and packs the documents, each ``[BOS] + ids + [EOS]``, end to end into rows
  of ``seq_len`` tokens (attention and MoE routing never cross documents);
* model: :class:`~moe_jax.models.DecoderLM` (``num_layers`` causal blocks, RoPE, every FFN an MoE layer
  unless ``moe_layers`` says otherwise);
* update: the one :func:`moe_jax.train.step.train_step` over :func:`moe_jax.tasks.lm.lm_loss_sums`;
* generation: :func:`moe_jax.train.decode.generate` with the KV cache (greedy at ``temperature=0``, else
  sampling with ``top_k`` / ``top_p``).

What the first ``train`` call decides (and ``save`` stores): the vocabulary (``tokenizer.model``; at most
``vocab_size`` ids, default 1024, fewer for a small corpus) and ``seq_len`` (unless given: the longest
document's tokens plus its EOS, capped at 128, at least 2). An epoch is one pass over the packed tokens:
``ceil(tokens / seq_len)`` rows, ``batch_size`` rows per update (capped at that row count).

Routing is dropless unless the user asks otherwise: ``capacity_factor`` defaults to ``None`` for this task
(the other tasks' default is 1.25) and ``eval_capacity_factor`` to ``None`` even when a training capacity is
given. Dropless routing of a token does not depend on the other tokens, so the cached token-by-token
generation gives exactly the logits of a full forward pass, and a prompt's greedy continuation does not
depend on the other prompts of its batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from moe_jax.api._common import check_int, check_nonnegative_float
from moe_jax.api.saved import check_fields
from moe_jax.models.transformer import DecoderLM

LM_TASK = "language_modeling"
# Quick-API options of this task that are not ModelConfig fields (with their defaults).
LM_OPTIONS = {
    "vocab_size": None,  # most SentencePiece ids; default 1024 (small corpora get fewer); > 260
    "seq_len": None,  # tokens per packed training row; default: longest document + EOS, capped at 128
}
_DEFAULT_VOCAB = 1024
# A byte-fallback vocabulary holds the 4 special ids and the 256 byte pieces before any learned piece.
MIN_VOCAB = 4 + 256 + 1
_MAX_AUTO_SEQ_LEN = 128
# Training rows are shuffled in windows of at most this many rows (a long document spans many rows).
_SHUFFLE_ROWS = 256
# Prompt buffers are padded to a multiple of this many tokens: prompts of similar lengths share one
# compiled generation program.
_PROMPT_MULTIPLE = 16
_SEQ_LEN = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2, "an integer >= 2")


def check_lm_meta(meta: dict) -> None:
    """Checks what ``save`` stored about the data (``ValueError`` naming the ``meta`` field)."""
    check_fields("meta", meta, {"seq_len": _SEQ_LEN})


def check_lm_labels(labels) -> None:
    """``labels`` must be ``None``: a language model learns from the texts alone."""
    if labels is not None:
        raise ValueError(
            f"labels must be None for task='language_modeling' (got {type(labels).__name__}): a language "
            "model learns from the texts alone; call train(texts) or train(texts, None)"
        )


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """``predict``'s generation arguments, checked (see :meth:`LanguageModelTask._predict_lm`)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def checked(cls, max_new_tokens=None, temperature=None, top_k=None, top_p=None, seed=None):
        """The options with defaults for ``None``; a ``ValueError`` naming the first bad argument."""
        d = cls()
        top_p = d.top_p if top_p is None else top_p
        if isinstance(top_p, bool) or not isinstance(top_p, int | float | np.integer | np.floating):
            raise ValueError(f"top_p={top_p!r} must be a number in (0, 1]")
        if not (math.isfinite(float(top_p)) and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 keeps every token)")
        return cls(
            max_new_tokens=check_int(
                "max_new_tokens", d.max_new_tokens if max_new_tokens is None else max_new_tokens, 1
            ),
            temperature=check_nonnegative_float(
                "temperature", d.temperature if temperature is None else temperature
            ),
            top_k=check_int("top_k", d.top_k if top_k is None else top_k, 0),
            top_p=float(top_p),
            seed=check_int("seed", d.seed if seed is None else seed, 0),
        )


class LanguageModelTask:
    """The language-modelling part of :class:`~moe_jax.api.SparseMoeModel` (a mixin: state lives there)."""

    @staticmethod
    def _check_documents(values, name: str, *, allow_empty: bool = False) -> list[str]:
        """``values`` as a list of strings; empty or whitespace-only ones only when ``allow_empty``."""
        what = "prompts" if allow_empty else "documents"
        if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
            raise ValueError(
                f"{name} must be a list of strings ({what}) for task='language_modeling'; got "
                f"{type(values).__name__}"
            )
        values = list(values)
        if not values:
            raise ValueError(f"{name} is empty; pass at least one {what[:-1]}")
        for i, v in enumerate(values):
            if not isinstance(v, str | np.str_):
                raise ValueError(f"{name}[{i}] is {type(v).__name__} ({v!r:.40}), not a string")
            if not allow_empty and not v.strip():
                raise ValueError(
                    f"{name}[{i}]={v!r:.40} is empty or only whitespace; every document needs some text"
                )
        return [str(v) for v in values]

    def _build_lm(self, cfg, rngs: nnx.Rngs) -> nnx.Module:
        return DecoderLM(cfg, rngs=rngs)

    @staticmethod
    def _lm_loss_sums(model, batch, *, dropout_key, deterministic):
        from moe_jax.tasks.lm import lm_loss_sums

        return lm_loss_sums(model, batch, dropout_key=dropout_key, deterministic=deterministic)

    def _prepare_lm(self, texts: list[str], batch_size: int, seed: int):
        """Packed training batches (and the model, built at the first call).

        Returns:
            ``(batches, model, batch_size, steps_per_epoch)``: ``batch_size`` capped at the rows of one
            epoch.
        """
        from moe_jax.data.lm import lm_data_from_texts

        vocab = self._extras["vocab_size"] or _DEFAULT_VOCAB
        try:
            data = lm_data_from_texts(
                {"train": texts},
                seq_len=self._meta.get("seq_len", 2),
                vocab_size=vocab,
                tokenizer=self._tokenizer,
            )
        except RuntimeError as e:  # SentencePiece training refused the corpus
            detail = str(e).split("] ", 1)[-1].strip()
            raise ValueError(
                f"vocab_size={vocab}: SentencePiece cannot build a vocabulary from these texts ({detail})"
            ) from None
        tok = data.tokenizer
        predictions = [len(ids) + 1 for ids in tok.encode_batch(texts)]  # ids plus one EOS per document
        if self._model is None:
            seq_len = int(self._extras["seq_len"] or max(2, min(max(predictions), _MAX_AUTO_SEQ_LEN)))
            self._tokenizer, self._meta = tok, {"seq_len": seq_len}
            cfg = self._model_config(
                vocab_size=tok.vocab_size, max_len=max(self._model_fields.get("max_len", 512), seq_len)
            )
            self._model = self._init(cfg)
        seq_len = self._meta["seq_len"]
        rows = math.ceil(sum(predictions) / seq_len)
        batch_size = min(batch_size, rows)
        shuffle_rows = min(rows, _SHUFFLE_ROWS)
        data = dataclasses.replace(data, seq_len=seq_len, num_threads=1, shuffle_rows=shuffle_rows)
        it = data.train_iter(batch_size, seed=seed)
        keys = ("inputs", "targets", "segment_ids", "positions", "token_weight")

        def batches():
            for batch in it:
                yield {k: batch[k] for k in keys}

        return batches(), self._model, batch_size, math.ceil(rows / batch_size)

    def _predict_lm(self, prompts: list[str], batch_size: int, options: GenerationOptions) -> list[str]:
        from moe_jax.train import decode as decode_lib

        tok, cfg = self._tokenizer, self._model.cfg
        encoded = [[tok.bos_id, *tok.encode(p)] for p in prompts]
        longest = max(len(ids) for ids in encoded)
        if cfg.positions == "learned" and longest + options.max_new_tokens > cfg.max_len:
            raise ValueError(
                f"max_new_tokens={options.max_new_tokens} plus the longest prompt ({longest} tokens with "
                f"BOS) exceed the model's learned positions max_len={cfg.max_len}"
            )
        top_k = options.top_k if options.top_k < cfg.vocab_size else 0  # k >= V keeps every token anyway
        graphdef, state = nnx.split(self._model)
        rows = min(batch_size, len(encoded))
        key = jax.random.key(options.seed)
        out = []
        for chunk_index, start in enumerate(range(0, len(encoded), rows)):
            chunk = encoded[start : start + rows]
            lengths_B = np.ones(rows, np.int32)  # rows past the chunk: a lone BOS, never read
            lengths_B[: len(chunk)] = [len(ids) for ids in chunk]
            width = _PROMPT_MULTIPLE * math.ceil(int(lengths_B.max()) / _PROMPT_MULTIPLE)
            if cfg.positions == "learned":
                width = min(width, max(int(lengths_B.max()), cfg.max_len - options.max_new_tokens))
            prompt_BL = np.zeros((rows, width), np.int32)
            prompt_BL[:, 0] = tok.bos_id
            for i, ids in enumerate(chunk):
                prompt_BL[i, : len(ids)] = ids
            new_BS = _generate(
                graphdef,
                state,
                prompt_BL,
                lengths_B,
                jax.random.fold_in(key, chunk_index),
                max_new_tokens=options.max_new_tokens,
                eos_id=tok.eos_id,
                temperature=options.temperature,
                top_k=top_k,
                top_p=options.top_p,
            )
            new_ids = decode_lib.to_token_lists(jax.device_get(new_BS), tok.eos_id)
            out += [_continuation(tok, ids, new) for ids, new in zip(chunk, new_ids)]
        return out


# Module level with a static graphdef: a loaded model (equal graphdef) reuses the compiled program.
@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "temperature", "top_k", "top_p")
)
def _generate(graphdef, state, prompt_BL, lengths_B, key, **options):
    from moe_jax.train import decode as decode_lib

    return decode_lib.generate(nnx.merge(graphdef, state), prompt_BL, lengths_B, key=key, **options)


def _continuation(tok, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text after the prompt: decoded together, so pieces (or bytes) across the boundary join."""
    head, full = tok.decode(prompt_ids), tok.decode(prompt_ids + new_ids)
    return full[len(head) :] if full.startswith(head) else tok.decode(new_ids)
