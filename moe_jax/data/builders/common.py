"""Pieces shared by the offline builders: the feature spec and the hash split."""

from __future__ import annotations

import hashlib

import tensorflow_datasets as tfds

from moe_jax.data.errors import DatasetUnavailableError

SPLITS = ("train", "validation", "test")
# Per-mille boundaries: 90% train, 5% validation, 5% test.
DEFAULT_SPLIT_PERMILLE = (900, 950)


def text_features() -> tfds.features.FeaturesDict:
    """The two-text feature spec every seq2seq builder here produces."""
    return tfds.features.FeaturesDict({"inputs": tfds.features.Text(), "targets": tfds.features.Text()})


def split_of(key: str, boundaries: tuple[int, int] = DEFAULT_SPLIT_PERMILLE) -> str:
    """Assigns a split from a hash of ``key``.

    A content hash (not the position in a file walk) keeps the split identical across machines whose
    catalogs or directories enumerate in different orders, and sends every example sharing ``key`` to the
    same split, so a duplicate source never leaks from train into test.

    Args:
      key: the text that decides the split (the source sentence, the summary line).
      boundaries: per-mille cut points (train end, validation end).

    Returns:
      ``'train'``, ``'validation'`` or ``'test'``.
    """
    bucket = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big") % 1000
    if bucket < boundaries[0]:
        return "train"
    return "validation" if bucket < boundaries[1] else "test"


def example_key(*texts: str) -> str:
    """A stable unique key for an example (TFDS requires one per example)."""
    return hashlib.sha1("\x00".join(texts).encode("utf-8")).hexdigest()


def split_pairs(pairs, key_index: int, dataset: str, alternatives: str) -> dict[str, list[tuple[str, str]]]:
    """Groups pairs by :func:`split_of` their ``key_index`` element.

    Args:
      pairs: (inputs, targets) tuples.
      key_index: 0 to split by inputs, 1 by targets.
      dataset: name for the error message.
      alternatives: what to do instead, for the error message.

    Returns:
      Split name -> pairs, every split non-empty.

    Raises:
      DatasetUnavailableError: a split came out empty (TFDS cannot write an empty split).
    """
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for pair in pairs:
        by_split[split_of(pair[key_index])].append(pair)
    empty = [s for s, examples in by_split.items() if not examples]
    if empty:
        raise DatasetUnavailableError(
            f"{dataset}: only {len(pairs)} pairs, too few to fill the {'/'.join(empty)} split(s); "
            f"{alternatives}"
        )
    return by_split
