"""Length-bucketed training batches: utterances of similar length share a batch, padded to a few shapes.

Random batches of variable-length examples pad to the longest example the corpus allows; with speech
(mean utterance about half the longest) that spends half the encoder's compute on padding. Here, every
epoch, the shard's examples are permuted (seeded by ``seed`` and the epoch), cut into windows of
``window_batches`` batches, each window sorted by length and cut into batches, and the batches of the
epoch shuffled again. Each batch is then padded by the batch function to the smallest of a few fixed
lengths (:func:`bucket_length`) that holds its longest example, so the step compiles once per bucket.

The plan is a pure function of ``(seed, epoch)``, and the iterator is Grain's over a map dataset of
batch positions, so its checkpoint is a position and resuming replays the same batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import grain
import numpy as np

from moe_jax.data.errors import DatasetUnavailableError


def bucket_length(longest: int, buckets: Sequence[int], cap: int) -> int:
    """The smallest bucket ``>= longest`` (``cap`` when none is, or when ``buckets`` is empty)."""
    for b in sorted(int(b) for b in buckets):
        if b >= longest:
            return min(b, cap)
    return cap


def check_buckets(buckets: Sequence[int], cap: int, field: str, cap_field: str = "cap") -> tuple[int, ...]:
    """``buckets`` as a sorted tuple of distinct positive lengths ``<= cap``.

    Raises:
        ValueError: naming ``field`` and what to change.
    """
    try:
        values = tuple(int(b) for b in buckets)
    except (TypeError, ValueError):
        raise ValueError(f"{field}={buckets!r} must be a list of lengths, e.g. (128, 192, 256)") from None
    if any(b <= 0 for b in values) or len(set(values)) != len(values):
        raise ValueError(f"{field}={values} must be distinct positive lengths")
    if values and max(values) > cap:
        raise ValueError(
            f"{field}={values} has a length above {cap_field}={cap}; drop it or raise {cap_field}"
        )
    return tuple(sorted(values))


def epoch_batches(lengths_N: np.ndarray, batch_size: int, *, seed: int, epoch: int, window_batches: int):
    """One epoch's batches as example indices ``int64[num_batches, batch_size]`` (remainder dropped).

    Every example appears at most once; within a window of ``window_batches`` batches the batches hold
    consecutive examples in length order, and the batch order over the epoch is random.
    """
    n = len(lengths_N)
    rng = np.random.default_rng([int(seed), int(epoch)])
    order_N = rng.permutation(n)
    window = max(1, int(window_batches)) * batch_size
    for start in range(0, n, window):
        chunk = order_N[start : start + window]
        order_N[start : start + window] = chunk[np.argsort(lengths_N[chunk], kind="stable")]
    num_batches = n // batch_size
    batches_BK = order_N[: num_batches * batch_size].reshape(num_batches, batch_size)
    return batches_BK[rng.permutation(num_batches)]


def bucketed_train_iterator(
    source,
    name: str,
    batch_size: int,
    batch_fn: Callable[[list], dict],
    *,
    lengths_N: np.ndarray,
    seed: int,
    shard_index: int,
    num_shards: int,
    num_threads: int,
    window_batches: int,
) -> grain.DatasetIterator:
    """This process's shard of a train split in length-sorted batches: endless, checkpointable.

    Args:
      source: random-access examples of the whole split.
      name: the dataset, for the error message.
      batch_size: examples per batch.
      batch_fn: examples → batch arrays (pads to the batch's bucket).
      lengths_N: each example's length (the order key), one per example of ``source``.
      seed: permutation seed (with the epoch).
      shard_index, num_shards: this process's examples are ``source[shard_index::num_shards]``.
      num_threads: Grain reader threads.
      window_batches: batches whose examples are sorted together (larger: less padding, batches that
        differ more from a random draw).

    Raises:
        DatasetUnavailableError: the shard holds fewer examples than one batch.
    """
    indices_N = np.arange(len(source))[shard_index::num_shards]
    shard_lengths_N = np.asarray(lengths_N)[indices_N]
    num_batches = len(indices_N) // batch_size
    if num_batches == 0:
        raise DatasetUnavailableError(
            f"{name}: the train split (shard {shard_index}) has {len(indices_N)} examples, fewer than one "
            f"batch of {batch_size}"
        )

    @functools.lru_cache(maxsize=2)
    def plan(epoch: int) -> np.ndarray:
        return epoch_batches(
            shard_lengths_N, batch_size, seed=seed, epoch=epoch, window_batches=window_batches
        )

    def load(position: int, _) -> dict:
        epoch, j = divmod(int(position), num_batches)
        return batch_fn([source[int(indices_N[i])] for i in plan(epoch)[j]])

    dataset = grain.MapDataset.range(num_batches).repeat(None).map_with_index(load)
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * num_threads)
    return iter(dataset.to_iter_dataset(read_options))
