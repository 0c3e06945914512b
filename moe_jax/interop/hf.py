"""Hugging Face decoder checkpoints in and out, with NumPy and ``safetensors`` (no PyTorch).

::

    from moe_jax.interop import hf

    model, config = hf.load("path/to/Mixtral-8x7B")      # config.json + (sharded) safetensors
    logits_BLV, aux = model(ids_BL)
    hf.save(model, config, "out/")                        # transformers.AutoModelForCausalLM loads it

Architectures and the options refused: :mod:`moe_jax.interop.hf_config`. Tensor layouts: HF linears are
[out, in]; the project's are [in, out] with heads split ([D, H, Dh] for q/k/v, [H, Dh, D] for o) and experts
stacked on a leading axis ([E, D, F] gate/up, [E, F, D] down); HF files hold one tensor per expert
(``block_sparse_moe.experts.N.w1/w3/w2`` for Mixtral, ``mlp.experts.N.gate_proj/up_proj/down_proj``
otherwise), which transformers itself writes and reads.

Loading uses every tensor of the file exactly once: a missing, unused or mis-shaped tensor is a
``ValueError`` naming it. Saving gathers one parameter at a time to the host (a model sharded over a mesh,
experts over ``expert``, is never gathered whole), writes shards of at most ``max_shard_size`` bytes into a
temporary directory and moves them into place only when all are written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import ml_dtypes  # noqa: F401 - registers bfloat16 with NumPy, so safetensors reads and writes it
import numpy as np
from flax import nnx

from moe_jax.interop import hf_config
from moe_jax.interop.hf_config import Architecture
from moe_jax.models import DecoderLM, ModelConfig
from moe_jax.train.init_params import host_value

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One project parameter and the HF tensor(s) it is made of.

    ``hf`` holds one name, or one per expert (stacked on a new leading axis). ``linear``: HF stores the
    transpose, [out, in], of the project's [in..., out...] with ``in_ndim`` input axes; otherwise the
    values are the same, flattened on the HF side.
    """

    ours: tuple
    hf: tuple[str, ...]
    linear: bool = True
    in_ndim: int = 1
    stacked: bool = False
    flatten: bool = True

    def to_ours(self, arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        per = shape[1:] if self.stacked else shape
        parts = [self._one_to_ours(a, per) for a in arrays]
        return np.stack(parts) if self.stacked else parts[0]

    def _one_to_ours(self, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.linear:
            want = (math.prod(shape[self.in_ndim :]), math.prod(shape[: self.in_ndim]))
            if a.shape != want:
                raise ValueError(f"shape {list(a.shape)}, expected {list(want)}")
            return np.ascontiguousarray(a.T).reshape(shape)
        if a.size != math.prod(shape) or a.ndim != 1 and a.shape != shape:
            raise ValueError(f"shape {list(a.shape)}, expected {[math.prod(shape)]}")
        return a.reshape(shape)

    def to_hf(self, value: np.ndarray) -> list[np.ndarray]:
        parts = list(value) if self.stacked else [value]
        out = []
        for p in parts:
            if self.linear:
                p = p.reshape(math.prod(p.shape[: self.in_ndim]), -1).T
            out.append(np.ascontiguousarray(p.reshape(-1) if not self.linear and self.flatten else p))
        return out


def _layer_tensors(cfg: ModelConfig, arch: Architecture, i: int, moe_block: bool) -> list[_Tensor]:
    ours = ("decoder", "layers", i)
    hf = f"model.layers.{i}"
    t = [
        _Tensor((*ours, "self_norm", "scale"), (f"{hf}.input_layernorm.weight",), linear=False),
        _Tensor((*ours, "ffn_norm", "scale"), (f"{hf}.post_attention_layernorm.weight",), linear=False),
    ]
    for proj in "qkv":
        t.append(_Tensor((*ours, "self_attn", f"w_{proj}"), (f"{hf}.self_attn.{proj}_proj.weight",)))
        if cfg.qkv_bias:
            t.append(
                _Tensor(
                    (*ours, "self_attn", f"b_{proj}"), (f"{hf}.self_attn.{proj}_proj.bias",), linear=False
                )
            )
    t.append(_Tensor((*ours, "self_attn", "w_o"), (f"{hf}.self_attn.o_proj.weight",), in_ndim=2))
    if cfg.qk_norm != "none":
        for proj in "qk":
            t.append(
                _Tensor(
                    (*ours, "self_attn", f"{proj}_norm"),
                    (f"{hf}.self_attn.{proj}_norm.weight",),
                    linear=False,
                )
            )
    ffn = (*ours, "ffn")
    if not moe_block:
        for name in ("gate", "up", "down"):
            t.append(_Tensor((*ffn, f"w_{name}"), (f"{hf}.mlp.{name}_proj.weight",)))
        return t
    E = cfg.moe.num_experts
    if arch.moe == "mixtral":
        prefix, names = f"{hf}.block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}
    else:
        prefix, names = f"{hf}.mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    t.append(_Tensor((*ffn, "router"), (f"{prefix}.gate.weight",)))
    for ours_name, hf_name in names.items():
        experts = tuple(f"{prefix}.experts.{e}.{hf_name}.weight" for e in range(E))
        t.append(_Tensor((*ffn, f"w_{ours_name}"), experts, stacked=True))
    if cfg.moe.num_shared_experts:
        for name in ("gate", "up", "down"):
            t.append(_Tensor((*ffn, f"shared_w_{name}"), (f"{prefix}.shared_expert.{name}_proj.weight",)))
        t.append(_Tensor((*ffn, "w_shared_gate"), (f"{prefix}.shared_expert_gate.weight",)))
    return t


def tensor_map(cfg: ModelConfig, arch: Architecture) -> list[_Tensor]:
    """Every project parameter of ``cfg`` with the HF tensor names it is read from and written to."""
    moe_layers = set(cfg.moe_layers(cfg.num_decoder_layers))
    t = [
        _Tensor(("embedder", "embed", "table"), ("model.embed_tokens.weight",), linear=False, flatten=False),
        _Tensor(("decoder", "final_norm", "scale"), ("model.norm.weight",), linear=False),
    ]
    for i in range(cfg.num_decoder_layers):
        t.extend(_layer_tensors(cfg, arch, i, i in moe_layers))
    if not cfg.tie_embeddings:
        t.append(_Tensor(("head",), ("lm_head.weight",)))
    return t


class _Files:
    """The tensors of a model directory: one ``model.safetensors`` or shards listed by an index."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            weight_map = None
        else:
            raise ValueError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self._handles = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise ValueError(f"{path}: {name} (listed in {INDEX_FILE}) is missing")
            self._handles[name] = safe_open(file, framework="numpy")
        self.where = {}
        for name, handle in self._handles.items():
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if weight_map is not None and weight_map.get(key) != name:
                    raise ValueError(
                        f"{path}/{name}: tensor {key} is not listed for this file in {INDEX_FILE}"
                    )
                self.where[key] = name
        self.used: set[str] = set()

    def take(self, key: str) -> np.ndarray:
        if key not in self.where:
            raise ValueError(f"tensor {key} is missing from the checkpoint")
        if key in self.used:
            raise ValueError(f"tensor {key} would be used twice")
        self.used.add(key)
        return self._handles[self.where[key]].get_tensor(key)


def read_config(path: str) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face model directory.

    Raises:
        ValueError: no such directory or file, or not JSON.
    """
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory (a Hugging Face model directory with config.json)")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path} has no config.json")
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not readable JSON ({e})") from None


def lm_config_from_dir(path: str):
    """The LM config (``configs/lm.py``'s shape) of the Hugging Face model directory ``path``.

    Raises:
        ValueError: no config.json, or an unsupported architecture or option.
    """
    return hf_config.lm_config(read_config(path), where=os.path.join(path, "config.json"))


def load(path: str, *, dtype: str = "float32", param_dtype: str = "float32", upcycle: dict | None = None):
    """Reads a Hugging Face decoder checkpoint as the project's LM.

    Args:
        path: a model directory (``config.json`` and ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``).
        dtype, param_dtype: compute and parameter dtypes of the returned model (the file's values are cast
            to ``param_dtype``).
        upcycle: turn a dense checkpoint into an MoE model: the keyword arguments of
            :func:`moe_jax.interop.upcycle.upcycle` (``num_experts``, ``top_k``, ``granularity``, ...).

    Returns:
        ``(model, config)``: a :class:`~moe_jax.models.DecoderLM` (``model(ids_BL)`` gives
        ``(logits_BLV, aux)``) in evaluation mode, and its ``ml_collections.ConfigDict`` in
        ``configs/lm.py``'s shape (``config.hf`` records the architecture and the original config.json).

    Raises:
        ValueError: unsupported architecture or option; a missing, unused or mis-shaped tensor (naming it).
    """
    config = lm_config_from_dir(path)
    config.model.dtype, config.model.param_dtype = dtype, param_dtype
    arch = hf_config.ARCHITECTURES[config.hf.architecture]
    cfg = ModelConfig.from_mapping(config.model.to_dict(), path="config.model")
    files = _Files(path)
    model = _build(cfg, lambda spec, shape, dt: _read(files, spec, shape, dt), arch)
    unused = sorted(set(files.where) - files.used)
    if unused:
        raise ValueError(
            f"{path}: {len(unused)} tensors are not used by {arch.name} as configured, e.g. {unused[0]}"
        )
    if upcycle is not None:
        from moe_jax.interop.upcycle import upcycle as upcycle_fn

        return upcycle_fn(model, config, **dict(upcycle))
    return model, config


def _read(files: _Files, spec: _Tensor, shape, dtype) -> np.ndarray:
    arrays = [files.take(k) for k in spec.hf]
    try:
        value = spec.to_ours(arrays, tuple(shape))
    except ValueError as e:
        raise ValueError(f"tensor {spec.hf[0]}: {e}") from None
    return value.astype(dtype)


def _build(cfg: ModelConfig, value_of, arch: Architecture) -> DecoderLM:
    """A DecoderLM of ``cfg`` whose every parameter is ``value_of(spec, shape, dtype)`` (no random init)."""
    abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    specs = {s.ours: s for s in tensor_map(cfg, arch)}
    extra = sorted(set(flat) - set(specs))
    if extra:
        raise ValueError(
            f"model parameter {'/'.join(map(str, extra[0]))} has no Hugging Face tensor in {arch.name}"
        )
    for key, spec in specs.items():
        if key not in flat:
            raise ValueError(
                f"{arch.name} tensor {spec.hf[0]} has no model parameter {'/'.join(map(str, key))}"
            )
        variable = flat[key]
        abstract_value = variable.get_value()
        variable.set_value(jax.numpy.asarray(value_of(spec, abstract_value.shape, abstract_value.dtype)))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.eval()
    return model


def export_tensors(model: DecoderLM, config, *, architecture: str | None = None) -> tuple[dict, Iterator]:
    """``(config.json dict, iterator of (HF name, NumPy array))`` of ``model``, one parameter at a time.

    Args:
        model: the LM (sharded or not; scanned layers are written per layer).
        config: its config (``config.model``; ``config.hf`` when it was imported).
        architecture: the HF architecture to write; default ``config.hf.architecture``, else inferred
            (:func:`~moe_jax.interop.hf_config.infer_architecture`).

    Raises:
        ValueError: the model has no exact equivalent in the architecture (naming the field).
    """
    if model.cfg.scan_layers:  # Hugging Face stores one tensor per layer: unstack (sliced where it lies)
        from moe_jax.models import scan

        model = scan.to_unscanned(model)
    cfg = model.cfg
    hf_section = config.get("hf") if hasattr(config, "get") else None
    name = architecture or (hf_section.get("architecture") if hf_section is not None else None)
    if name and name not in hf_config.ARCHITECTURES:
        raise ValueError(
            f"architecture {name!r} is not supported; supported: {sorted(hf_config.ARCHITECTURES)}"
        )
    arch = hf_config.ARCHITECTURES[name] if name else hf_config.infer_architecture(cfg)
    source = dict(hf_section.source_config) if hf_section is not None else None
    out_config = hf_config.hf_config(cfg, arch, source)
    _check_round_trip(cfg, out_config, arch)
    untie = cfg.tie_embeddings and cfg.scale_embeddings
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    specs = tensor_map(cfg, arch)
    known = {s.ours for s in specs}
    extra = sorted(set(flat) - known)
    if extra:
        raise ValueError(f"model parameter {'/'.join(map(str, extra[0]))} has no tensor in {arch.name}")

    def tensors():
        for spec in specs:
            value = host_value(flat[spec.ours].get_value())
            if spec.ours == ("embedder", "embed", "table") and cfg.scale_embeddings:
                # HF decoders do not scale lookups: fold sqrt(D) into the input table.
                scaled = (value.astype(np.float32) * np.float32(cfg.d_model**0.5)).astype(value.dtype)
                yield spec.hf[0], scaled
                if untie:
                    yield "lm_head.weight", value
                continue
            yield from zip(spec.hf, spec.to_hf(value))

    return out_config, tensors()


def _check_round_trip(cfg: ModelConfig, out_config: dict, arch: Architecture) -> None:
    """Refuses an export whose config.json would describe another model than ``cfg``."""
    _, back = hf_config.model_section(out_config, where=f"the {arch.name} config.json being written")
    moe_back = back.pop("moe")
    ignore = {
        "tie_embeddings",
        "scale_embeddings",
        "pad_id",
        "dtype",
        "param_dtype",
        "max_len",
        "dropout_rate",
    }
    for field, value in back.items():
        if field not in ignore and getattr(cfg, field) != value:
            raise ValueError(
                f"model.{field}={getattr(cfg, field)!r} cannot be written as {arch.name} ({value!r})"
            )
    if not cfg.moe_layers(cfg.num_decoder_layers):
        return
    for field, value in moe_back.items():
        if field in ("capacity_factor", "eval_capacity_factor"):
            continue
        mine = getattr(cfg.moe, field)
        mine = tuple(cfg.moe_layers(cfg.num_decoder_layers)) if field == "layers" else mine
        if field == "d_ff":
            mine = cfg.moe.d_ff or cfg.d_ff
        if mine != value:
            raise ValueError(f"model.moe.{field}={mine!r} cannot be written as {arch.name} ({value!r})")


def save(
    model: DecoderLM,
    config,
    path: str,
    *,
    architecture: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Writes ``model`` as a Hugging Face checkpoint that ``transformers.AutoModelForCausalLM`` loads.

    ``config.json`` plus ``model.safetensors``, or shards of at most ``max_shard_size`` bytes with a
    ``model.safetensors.index.json``. Parameters are gathered to the host one at a time. Only process 0
    writes. ``path`` must be missing or empty; nothing is left there when writing fails.

    Returns:
        The files written (names relative to ``path``).

    Raises:
        ValueError: ``path`` is a non-empty directory or a file; the model has no exact equivalent in the
            architecture.
    """
    from safetensors.numpy import save_file

    if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
        raise ValueError(f"{path} exists and is not an empty directory; choose a new output directory")
    out_config, tensors = export_tensors(model, config, architecture=architecture)
    writer = jax.process_index() == 0
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hf-export-", dir=parent) if writer else None
    try:
        shards, shard, size, weight_map = [], {}, 0, {}

        def flush():
            nonlocal shard, size
            if shard and writer:
                name = f"shard-{len(shards):05d}.tmp"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                shards.append((name, sorted(shard)))
            shard, size = {}, 0

        total = 0
        for key, array in tensors:
            if shard and size + array.nbytes > max_shard_size:
                flush()
            shard[key] = array
            size += array.nbytes
            total += array.nbytes
        flush()
        if not writer:
            return []
        names = []
        if len(shards) == 1:
            os.replace(os.path.join(tmp, shards[0][0]), os.path.join(tmp, SINGLE_FILE))
            names.append(SINGLE_FILE)
        else:
            for i, (name, keys) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.replace(os.path.join(tmp, name), os.path.join(tmp, final))
                weight_map.update({k: final for k in keys})
                names.append(final)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
            names.append(INDEX_FILE)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(out_config, f, indent=2)
        names.append("config.json")
        os.makedirs(path, exist_ok=True)
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        return names
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
