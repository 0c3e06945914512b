"""A SentencePiece tokenizer shared by source and target text (tied embeddings need one vocabulary).

Special ids are fixed so models, padding and decoding agree without consulting the model file:
PAD 0, UNK 1, BOS 2, EOS 3.

Language models over source code train with :data:`LOSSLESS_OPTIONS` (byte fallback, no normalization, no
whitespace folding): every text then encodes to ids that decode back to exactly that text, and
:meth:`Tokenizer.piece_byte_lengths` says how many UTF-8 bytes each id stands for (bits per byte).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# SentencePiece writes whitespace as this symbol inside pieces; a literal one in the text needs care.
_META_SPACE = "\u2581"
# Trainer options that make decode(encode(text)) == text for any text (code: indentation, tabs, newlines,
# runs of spaces, any Unicode): unknown characters fall back to their UTF-8 bytes, nothing is normalized
# or folded, no space is invented at the start, and indentation runs may be pieces of their own.
LOSSLESS_OPTIONS = {
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
}


class Tokenizer:
    """Wraps a SentencePiece model with the project's special ids.

    Attributes:
      model_proto: the serialized SentencePiece model (what :meth:`save` writes).
    """

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, model_proto: bytes):
        """Creates a tokenizer from a serialized SentencePiece model.

        Args:
          model_proto: bytes of a ``.model`` file.

        Raises:
          ValueError: the model's special ids differ from PAD 0 / UNK 1 / BOS 2 / EOS 3.
        """
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"SentencePiece model has special ids (pad, unk, bos, eos) = {ids}; need (0, 1, 2, 3)"
            )
        # SentencePiece reads a literal U+2581 in the text as a space; a byte-fallback model can spell it
        # with its three byte pieces instead, which decode to the character itself.
        meta_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META_SPACE.encode("utf-8")]
        self._meta_space_ids = meta_bytes if all(self._sp.is_byte(i) for i in meta_bytes) else None

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ones included (may be below the requested size: hard_vocab_limit=False)."""
        return self._sp.get_piece_size()

    @property
    def byte_fallback(self) -> bool:
        """Whether characters outside the vocabulary become their UTF-8 bytes (instead of UNK)."""
        return self._meta_space_ids is not None

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        """Text -> ids, optionally followed by EOS."""
        if self._meta_space_ids is not None and _META_SPACE in text:
            ids = self._encode_literal_meta_space(text)
        else:
            ids = self._sp.encode(text)
        return ids + [EOS_ID] if add_eos else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts in one call (SentencePiece releases the GIL across the batch)."""
        texts = list(texts)
        ids = self._sp.encode(texts)
        if self._meta_space_ids is not None:
            for i, text in enumerate(texts):
                if _META_SPACE in text:
                    ids[i] = self._encode_literal_meta_space(text)
        return ids

    def _encode_literal_meta_space(self, text: str) -> list[int]:
        """Encodes the text between literal U+2581s and spells each of those as its byte pieces."""
        ids: list[int] = []
        for i, part in enumerate(text.split(_META_SPACE)):
            if i:
                ids.extend(self._meta_space_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, stopping at the first EOS and skipping PAD and BOS."""
        kept = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                kept.append(i)
        return self._sp.decode(kept)

    def piece_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text each id stands for, ``int32[V]`` (bits per byte = nats / ln 2 / bytes).

        A byte-fallback piece is one byte, ``▁`` inside a piece is the space it encodes, EOS counts one byte
        (it predicts the document separator) and the other special ids count zero. For a model trained with
        :data:`LOSSLESS_OPTIONS` the lengths of ``encode(text)`` sum to ``len(text.encode())`` exactly; for
        a normalizing model (the seq2seq default) they describe the normalized text.
        """
        sp = self._sp
        lengths = np.zeros(sp.get_piece_size(), np.int32)
        for i in range(sp.get_piece_size()):
            if sp.is_byte(i):
                lengths[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
                lengths[i] = len(sp.id_to_piece(i).replace(_META_SPACE, " ").encode("utf-8"))
        lengths[EOS_ID] = 1
        return lengths

    def save(self, path: str | os.PathLike) -> None:
        """Writes the model atomically: concurrent processes either see no file or a complete one."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(self.model_proto)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Reads a ``.model`` file."""
        with open(path, "rb") as f:
            return cls(f.read())

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        vocab_size: int,
        path: str | os.PathLike | None = None,
        *,
        model_type: str = "unigram",
        character_coverage: float = 0.9995,
        byte_fallback: bool | None = None,
        normalization_rule_name: str | None = None,
        remove_extra_whitespaces: bool | None = None,
        add_dummy_prefix: bool | None = None,
        allow_whitespace_only_pieces: bool | None = None,
        split_by_whitespace: bool | None = None,
    ) -> Tokenizer:
        """Trains a model in-process on ``sentences`` and optionally saves it to ``path``.

        Training reads the sentences in the given order without sampling, so the same sentences always
        give the same model. A sentence may span lines (newlines become part of pieces); sentences longer
        than 16384 bytes are dropped by SentencePiece, so cut long documents into blocks of lines first.

        The options after ``character_coverage`` default to None, which leaves SentencePiece's own default
        in place and out of the model file, so models trained without them stay byte-identical. Pass
        ``**LOSSLESS_OPTIONS`` for an exactly reversible vocabulary.

        Args:
          sentences: training text; empty strings are skipped.
          vocab_size: requested size; smaller corpora may give fewer pieces (``hard_vocab_limit=False``).
          path: where to save the model, if given.
          model_type: SentencePiece model type.
          character_coverage: share of characters covered by the vocabulary (rare ones map to UNK, or to
            their bytes with ``byte_fallback``).
          byte_fallback: spell characters outside the vocabulary as UTF-8 byte pieces (256 extra ids).
          normalization_rule_name: SentencePiece normalization (its default ``'nmt_nfkc'``; ``'identity'``
            keeps the text as it is).
          remove_extra_whitespaces: fold runs of spaces and strip the ends (SentencePiece default True).
          add_dummy_prefix: prepend a space to every text (default True).
          allow_whitespace_only_pieces: let runs of spaces (indentation) be pieces (default False).
          split_by_whitespace: pieces never cross a space (default True).

        Returns:
          The trained tokenizer.
        """
        options = {
            "byte_fallback": byte_fallback,
            "normalization_rule_name": normalization_rule_name,
            "remove_extra_whitespaces": remove_extra_whitespaces,
            "add_dummy_prefix": add_dummy_prefix,
            "allow_whitespace_only_pieces": allow_whitespace_only_pieces,
            "split_by_whitespace": split_by_whitespace,
        }
        # Only options set explicitly reach the trainer: SentencePiece records every option it is given in the
        # model file, so passing its defaults would change the bytes of existing vocabularies.
        options = {name: value for name, value in options.items() if value is not None}
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=(s for s in sentences if s),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            hard_vocab_limit=False,
            shuffle_input_sentence=False,
            # Docstring bodies run to a few kilobytes; the default (4192 bytes) silently drops them.
            max_sentence_length=16384,
            # The trained model depends on the thread count; one thread makes it identical on every machine.
            num_threads=1,
            minloglevel=2,
            **options,
        )
        tokenizer = cls(buf.getvalue())
        if path is not None:
            tokenizer.save(path)
        return tokenizer
