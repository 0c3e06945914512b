"""Argument checks, label encoding and the batch order shared by the quick API's task families."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int, or a ``ValueError`` naming ``name`` unless it is an integer ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{name}={value!r} must be a positive number")
    if not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"{name}={value!r} must be a positive number")
    return float(value)


def check_labels(labels) -> np.ndarray:
    """``labels`` as a 1-D array of integer, boolean or string class labels (else ``ValueError``)."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class labels; got shape {y.shape}")
    if y.size == 0:
        raise ValueError("labels is empty; pass one label per example")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype.kind in "UO" or y.dtype == bool):
        raise ValueError(f"labels must be integers or strings; got dtype {y.dtype}")
    return y


def label_indices(classes: list, y: np.ndarray) -> np.ndarray:
    """``int32[N]`` positions of ``y`` in the sorted ``classes`` (``ValueError`` for an unseen class)."""
    classes_arr = np.asarray(classes)
    idx = np.searchsorted(classes_arr, y)
    if np.any(idx >= len(classes_arr)) or np.any(classes_arr[np.minimum(idx, len(classes_arr) - 1)] != y):
        unseen = sorted(set(np.asarray(y).tolist()) - set(classes_arr.tolist()))
        raise ValueError(f"labels holds classes {unseen[:5]} the model was not built for")
    return idx.astype(np.int32)


def epoch_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int, epochs: int, rng: np.random.Generator
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled batches of the rows of ``arrays``, ``epochs`` times over.

    The last batch of an epoch is filled up with rows from the start of that epoch's order, so every batch
    has the same shape (one compiled step).
    """
    n = len(next(iter(arrays.values())))
    for _ in range(epochs):
        order = np.resize(rng.permutation(n), math.ceil(n / batch_size) * batch_size)
        for i in range(0, len(order), batch_size):
            sel = order[i : i + batch_size]
            yield {k: v[sel] for k, v in arrays.items()}


def padded_chunks(x: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """``(chunk, rows)`` pairs of ``x`` in order, each chunk zero-padded to ``batch_size`` rows."""
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        rows = len(chunk)
        pad = [(0, batch_size - rows)] + [(0, 0)] * (x.ndim - 1)
        yield np.pad(chunk, pad), rows
