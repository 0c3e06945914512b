"""The files of a saved quick-API model: written atomically by ``save``, checked by ``load`` before use.

A saved model is a directory holding ``config.json`` (constructor arguments, architecture, data shaping),
``state.msgpack`` (every model variable, Flax msgpack) and, for the sequence tasks (seq2seq and language
modelling), ``tokenizer.model``.
Every fault :func:`read_config` and :func:`restore_state` find (a missing, empty, truncated or edited file,
a tensor of another shape) is a ``ValueError`` naming the file and what is wrong, raised at ``load()`` —
never a JSON or msgpack error naming no file, and never a model that loads and then fails at ``predict``.
Loading only reads: the directory is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

CONFIG, STATE, TOKENIZER = "config.json", "state.msgpack", "tokenizer.model"


# ---------------------------------------------------------------------------------------------- save


def save_directory(directory) -> str:
    """``directory`` as a string, created if missing (``ValueError`` for a file or an uncreatable path)."""
    directory = _as_path(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"directory={directory!r} is an existing file, not a directory; choose another path")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ValueError(f"directory={directory!r} cannot be created: {e.strerror or e}") from None
    return directory


def write_atomic(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file, so a failed save leaves the old file whole."""
    directory = os.path.dirname(path) or "."
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None


def config_bytes(config: Mapping[str, Any]) -> bytes:
    """``config`` as indented JSON; NumPy scalars and arrays become numbers and lists.

    Raises:
        ValueError: a value (e.g. a model override) that JSON cannot hold, named by its path.
    """

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"{type(o).__name__} {o!r:.60}")

    try:
        return json.dumps(config, indent=1, default=default, allow_nan=True).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"cannot save the model: a constructor argument is not JSON-serializable ({e})"
        ) from None


# ---------------------------------------------------------------------------------------------- load


def _as_path(directory) -> str:
    if not isinstance(directory, str | os.PathLike):
        raise ValueError(f"directory={directory!r} must be a path (str or os.PathLike)")
    path = os.fspath(directory)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError("directory='' is empty; pass the directory a model was saved to")
    return path


def load_directory(directory) -> str:
    """``directory`` as a string (``ValueError`` unless it is an existing directory)."""
    directory = _as_path(directory)
    if not os.path.exists(directory):
        raise ValueError(f"directory={directory!r} does not exist: no model was saved there")
    if not os.path.isdir(directory):
        raise ValueError(
            f"directory={directory!r} is a file; pass the directory SparseMoeModel.save wrote "
            f"({CONFIG}, {STATE}, ...)"
        )
    return directory


def read_bytes(directory: str, name: str) -> bytes:
    """The bytes of ``directory/name`` (``ValueError`` naming the file when missing, empty or unreadable)."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        present = sorted(os.listdir(directory))
        raise ValueError(
            f"{path} is missing: {directory} does not hold a complete saved model (it has {present[:8]}; "
            f"SparseMoeModel.save writes {CONFIG}, {STATE} and, for sequence tasks, {TOKENIZER})"
        )
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e.strerror or e}") from None
    if not data:
        raise ValueError(f"{path} is empty (0 bytes): the save was interrupted or the file was truncated")
    return data


def read_config(directory: str, format_version: int) -> dict:
    """Parses and checks the structure of ``config.json`` (``ValueError`` naming the file)."""
    path = os.path.join(directory, CONFIG)
    data = read_bytes(directory, CONFIG)
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is damaged: holds a JSON {type(config).__name__}, not an object")
    version = config.get("format")
    if version == 1:
        raise ValueError(
            f"{path}: saved by an older moe_jax (format 1: flat MoE fields, other ViT parameter names); "
            "train it again with this version"
        )
    if version != format_version:
        raise ValueError(
            f"{path}: unknown saved-model format {version!r} (this version reads {format_version})"
        )
    for key in ("init_args", "model_config", "meta"):
        if not isinstance(config.get(key), dict):
            what = "missing" if key not in config else f"a {type(config[key]).__name__}, not an object"
            raise ValueError(f"{path} is damaged: {key!r} is {what}")
    train_calls = config.get("train_calls", 1)
    if isinstance(train_calls, bool) or not isinstance(train_calls, int) or train_calls < 0:
        raise ValueError(f"{path} is damaged: train_calls={train_calls!r} must be an integer >= 0")
    if "task" not in config["init_args"]:
        raise ValueError(f"{path} is damaged: init_args has no 'task'")
    return config


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{'a/b/0/c': leaf}`` (keys as strings, as msgpack stores them)."""
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tree}


def restore_state(path: str, data: bytes, expected: Mapping[str, Any]) -> dict:
    """The msgpack ``data`` of ``path`` as a pure state dict matching ``expected`` (a tree of shapes).

    Raises:
        ValueError: naming ``path``: not a msgpack state (damaged or truncated), a tensor missing or extra,
            a tensor whose shape or dtype differs from ``expected`` (naming it and both shapes), or
            non-finite weights.
    """
    from flax import serialization

    try:
        restored = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises its own types (ExtraData, OutOfData, ...) or ValueError
        raise ValueError(
            f"{path} is damaged or truncated: not a Flax msgpack state ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(restored, dict):
        raise ValueError(f"{path} is damaged: holds a {type(restored).__name__}, not a state dict")
    got, want = _flat(restored), _flat(expected)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} tensors the model in {CONFIG} has (first: {missing[0]!r})")
        if extra:
            parts.append(f"holds {len(extra)} tensors that model does not have (first: {extra[0]!r})")
        raise ValueError(f"{path} does not match {CONFIG}: it {' and '.join(parts)}")
    for name, spec in want.items():
        value = got[name]
        if not isinstance(value, np.ndarray | np.generic):
            raise ValueError(f"{path} is damaged: tensor {name!r} is a {type(value).__name__}, not an array")
        value = np.asarray(value)
        if tuple(value.shape) != tuple(spec.shape):
            raise ValueError(
                f"{path} does not match {CONFIG}: tensor {name!r} has shape {tuple(value.shape)} in the file "
                f"but the model {CONFIG} describes needs {tuple(spec.shape)}"
            )
        if value.dtype != spec.dtype:
            raise ValueError(
                f"{path} does not match {CONFIG}: tensor {name!r} has dtype {value.dtype} in the file but "
                f"the model needs {spec.dtype}"
            )
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise ValueError(f"{path} is damaged: tensor {name!r} holds NaN or infinite values")
    return restored


# ------------------------------------------------------------------------------- config field checks

Check = tuple[Callable[[Any], bool], str]


def _is_int(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


POSITIVE_INT: Check = (lambda v: _is_int(v, 1), "a positive integer")
BOOL: Check = (lambda v: isinstance(v, bool), "true or false")


def finite_list(length: int | None = None, *, positive: bool = False) -> Check:
    """A check for a list of finite numbers (of ``length``; > 0 when ``positive``)."""

    def ok(v):
        return (
            isinstance(v, list)
            and (length is None or len(v) == length)
            and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            and (not positive or all(x > 0 for x in v))
        )

    what = "a list of " + (f"{length} " if length is not None else "") + ("positive " if positive else "")
    return ok, what + "finite numbers"


def _classes_ok(v: Any) -> bool:
    if not isinstance(v, list) or not v:
        return False
    if not (all(isinstance(c, str) for c in v) or all(isinstance(c, int) for c in v)):
        return False
    return v == sorted(set(v)) and len(set(v)) == len(v)


CLASSES: Check = (_classes_ok, "a sorted list of distinct integer or string class labels")


def check_fields(where: str, mapping: Mapping[str, Any], spec: Mapping[str, Check]) -> None:
    """``ValueError`` naming ``where.key`` for the first missing key or value failing its check."""
    for key, (ok, what) in spec.items():
        if key not in mapping:
            raise ValueError(f"{where}.{key} is missing")
        if not ok(mapping[key]):
            raise ValueError(f"{where}.{key}={mapping[key]!r:.80} must be {what}")
