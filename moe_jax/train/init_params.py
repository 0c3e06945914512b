"""A new run's starting parameters: ``WORKDIR/init_params.safetensors`` (written by ``moe_jax.convert``).

When a workdir has no checkpoint yet but holds this file, the trainer starts step 0 from its parameters
(a fresh optimizer state and data order) instead of a random initialisation; once the run has saved a
checkpoint, resuming uses the checkpoint as always. The file's metadata holds the config it was written
with; the run's ``config.model`` must equal that one's.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_dtypes  # noqa: F401 - registers bfloat16 with NumPy for safetensors
import numpy as np
from flax import nnx

INIT_PARAMS = "init_params.safetensors"


def _flat_name(key: tuple) -> str:
    return "/".join(map(str, key))


def write_init_params(model: nnx.Module, config, workdir: str) -> str:
    """Writes ``WORKDIR/init_params.safetensors``: the parameters a new run in ``workdir`` starts from.

    The file's metadata holds the run config (JSON); :func:`read_init_params` checks a run's model section
    against it. Written atomically; an existing file is refused.
    """
    from safetensors.numpy import save_file

    path = os.path.join(workdir, INIT_PARAMS)
    if os.path.exists(path):
        raise ValueError(f"{path} exists already; convert into a new --workdir")
    os.makedirs(workdir, exist_ok=True)
    tensors = {
        _flat_name(k): host_value(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    tmp = f"{path}.tmp"
    if jax.process_index() == 0:
        save_file(tensors, tmp, metadata={"config": config.to_json_best_effort()})
        os.replace(tmp, path)
    return path


def read_init_params(workdir: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """``(config dict, {flat parameter name: array})`` of ``WORKDIR/init_params.safetensors``, or None."""
    from safetensors import safe_open

    path = os.path.join(workdir, INIT_PARAMS)
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="numpy") as f:
        config = json.loads(f.metadata()["config"])
        return config, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle


def apply_init_params(state: nnx.State, params: dict[str, np.ndarray], where: str) -> nnx.State:
    """``state`` (a train state: model params, optimizer) with its model parameters replaced by ``params``.

    Raises:
        ValueError: a parameter missing from ``params``, left over, or of another shape (naming it).
    """
    flat = dict(nnx.to_flat_state(state))
    used = set()
    for key, variable in flat.items():
        if key[0] != 0 or not isinstance(variable, nnx.Param):  # (model, optimizer) state: model first
            continue
        name = _flat_name(key[1:])
        if name not in params:
            raise ValueError(f"{where}: parameter {name} is missing")
        value = params[name]
        if tuple(value.shape) != tuple(variable.get_value().shape):
            raise ValueError(
                f"{where}: parameter {name} has shape {list(value.shape)}, the model "
                f"{list(variable.get_value().shape)}"
            )
        variable.set_value(jax.numpy.asarray(value, variable.get_value().dtype))
        used.add(name)
    extra = sorted(set(params) - used)
    if extra:
        raise ValueError(f"{where}: parameter {extra[0]} is not in this model")
    return nnx.from_flat_state(flat)


def host_value(value) -> np.ndarray:
    """One parameter on the host: gathered over the mesh (and over processes when not addressable)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))
