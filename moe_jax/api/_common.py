"""Argument checks, label encoding and the batch order shared by the quick API's task families."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from moe_jax.errors import ConfigError
from moe_jax.models.config import MoeConfig

# The quick API's keyword arguments stay flat: a MoeConfig field is passed by its own name, except the two
# that a model section has too (``d_ff``, and ``layers`` next to ``num_layers``), which get a ``moe_`` prefix.
MOE_OPTIONS = {
    (f"moe_{f.name}" if f.name in ("d_ff", "layers") else f.name): f.name
    for f in dataclasses.fields(MoeConfig)
}
_SECTION = "model"


def split_model_overrides(
    overrides: Mapping[str, Any], model: dict, moe: dict, options: Mapping[str, Any]
) -> dict[str, Any]:
    """Sorts flat keyword arguments into ``model`` fields, ``moe`` fields (in place) and the returned extras.

    ``options`` are the quick API's own options with their defaults; the result starts from them.
    """
    extras = dict(options)
    for k, v in overrides.items():
        if k in options:
            extras[k] = v
        elif k in MOE_OPTIONS:
            moe[MOE_OPTIONS[k]] = v
        else:
            model[k] = v
    return extras


def build_config(cls, model: Mapping[str, Any], **overrides):
    """``cls.from_mapping(model, **overrides)`` with errors naming the quick API's flat argument names.

    Raises:
        ValueError: e.g. ``top_k=5 must be in [1, num_experts=4]``, ``moe_layers=(5,) has indices ...``.
    """
    try:
        return cls.from_mapping(model, path=_SECTION, **overrides)
    except ConfigError as e:
        flat = {f"{_SECTION}.moe.{field}": name for name, field in MOE_OPTIONS.items()}
        message = re.sub(
            rf"\b{_SECTION}\.moe\.\w+|\b{_SECTION}\.",
            lambda m: flat.get(m.group(0), "" if m.group(0) == f"{_SECTION}." else m.group(0)),
            str(e),
        )
        raise ValueError(message) from None


class NotTrainedError(ValueError, RuntimeError):
    """``predict`` or ``save`` before any ``train``: a ``ValueError`` (and a ``RuntimeError``, as it was)."""


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int, or a ``ValueError`` naming ``name`` unless it is an integer ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool | np.bool_) and isinstance(
        value, int | float | np.floating | np.integer
    )


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` unless it is a finite number > 0."""
    if not _is_number(value) or not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"{name}={value!r} must be a positive number")
    return float(value)


def check_nonnegative_float(name: str, value: Any) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` unless it is a finite number ≥ 0."""
    if not _is_number(value) or not (math.isfinite(float(value)) and value >= 0):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool, or a ``ValueError`` naming ``name`` unless it is ``True`` or ``False``."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name}={value!r} must be True or False")
    return bool(value)


# Names other libraries use for the same arguments (too short or too different for difflib to match).
_ALIASES = {
    "lr": "learning_rate",
    "bs": "batch_size",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "X": "data",
    "x": "data",
    "y": "labels",
    "targets": "labels",
}


def check_no_unknown(method: str, unknown: Mapping[str, Any], known: tuple[str, ...]) -> None:
    """A ``ValueError`` naming the unknown keyword arguments of ``method`` (with a close match, if any)."""
    if not unknown:
        return
    hints = []
    for name in unknown:
        alias = _ALIASES.get(name)
        close = [alias] if alias in known else difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"{method}() got unknown keyword arguments {', '.join(hints)}; it takes {list(known)}")


def _label_kind(value: Any) -> str | None:
    """``'s'`` string, ``'i'`` integer (or bool), ``'f'`` float; ``None`` for anything else."""
    if isinstance(value, str | np.str_):
        return "s"
    if isinstance(value, bool | np.bool_ | int | np.integer):
        return "i"
    if isinstance(value, float | np.floating):
        return "f"
    return None


def check_labels(labels) -> np.ndarray:
    """``labels`` as a 1-D array of integer, boolean or string class labels (else ``ValueError``).

    Floats are accepted when they are whole numbers (``1.0``), and become integers. ``None``, NaN,
    fractional values and a mix of strings and numbers are refused, naming the first bad index.
    """
    if labels is None:
        raise ValueError("labels is None; pass one class label per example")
    if isinstance(labels, str | bytes):
        raise ValueError(
            f"labels must be a 1-D sequence of class labels, not a single {type(labels).__name__}"
        )
    try:
        y = np.asarray(labels)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"labels must be a 1-D array of class labels ({e})") from None
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class labels; got shape {y.shape}")
    if y.size == 0:
        raise ValueError("labels is empty; pass one label per example")
    if isinstance(labels, np.ndarray) and y.dtype.kind in "biuU":
        return y
    if y.dtype.kind not in "biufUO":
        raise ValueError(f"labels must be integers or strings; got dtype {y.dtype}")
    # Python lists: NumPy turns [0, "a"] into strings and [0, None] into objects, so look at the values.
    values = y.tolist() if not isinstance(labels, list | tuple) else list(labels)
    kinds = [_label_kind(v) for v in values]
    for i, (v, kind) in enumerate(zip(values, kinds)):
        if kind is None:
            raise ValueError(
                f"labels[{i}] is {v!r} ({type(v).__name__}); every example needs an integer or string "
                "class label"
            )
        if kind == "f" and not (math.isfinite(v) and float(v).is_integer()):
            raise ValueError(f"labels[{i}]={v!r} is not a whole number; class labels are integers or strings")
    if "s" in kinds and set(kinds) != {"s"}:
        i = next(i for i, k in enumerate(kinds) if k != kinds[0])
        raise ValueError(
            f"labels mixes strings and numbers (labels[0]={values[0]!r}, labels[{i}]={values[i]!r}); "
            "use one kind of class label"
        )
    if kinds[0] == "s":
        return np.asarray([str(v) for v in values])
    if all(isinstance(v, bool | np.bool_) for v in values):
        return np.asarray(values, dtype=bool)
    return np.asarray([int(v) for v in values], dtype=np.int64)


def check_classes(y: np.ndarray) -> list:
    """The sorted classes of the first training labels; a ``ValueError`` unless there are at least two."""
    classes = np.unique(y).tolist()
    if len(classes) < 2:
        raise ValueError(
            f"labels holds a single class ({classes[0]!r}); a classifier needs examples of at least 2 classes"
        )
    return classes


def label_indices(classes: list, y: np.ndarray) -> np.ndarray:
    """``int32[N]`` positions of ``y`` in the sorted ``classes`` (``ValueError`` for an unseen class)."""
    classes_arr = np.asarray(classes)
    if (classes_arr.dtype.kind == "U") != (y.dtype.kind == "U"):
        trained = "string" if classes_arr.dtype.kind == "U" else "integer"
        raise ValueError(
            f"labels has dtype {y.dtype} but the model was trained on {trained} classes {classes[:5]}"
        )
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
