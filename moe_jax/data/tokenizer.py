"""A SentencePiece tokenizer shared by source and target text (tied embeddings need one vocabulary).

Special ids are fixed so models, padding and decoding agree without consulting the model file:
PAD 0, UNK 1, BOS 2, EOS 3.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


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

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ones included (may be below the requested size: hard_vocab_limit=False)."""
        return self._sp.get_piece_size()

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        """Text -> ids, optionally followed by EOS."""
        ids = self._sp.encode(text)
        return ids + [EOS_ID] if add_eos else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts in one call (SentencePiece releases the GIL across the batch)."""
        return self._sp.encode(list(texts))

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
    ) -> Tokenizer:
        """Trains a model in-process on ``sentences`` and optionally saves it to ``path``.

        Training reads the sentences in the given order without sampling, so the same sentences always
        give the same model.

        Args:
          sentences: training text; empty strings are skipped.
          vocab_size: requested size; smaller corpora may give fewer pieces (``hard_vocab_limit=False``).
          path: where to save the model, if given.
          model_type: SentencePiece model type.
          character_coverage: share of characters covered by the vocabulary (rare ones map to UNK).

        Returns:
          The trained tokenizer.
        """
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
        )
        tokenizer = cls(buf.getvalue())
        if path is not None:
            tokenizer.save(path)
        return tokenizer
