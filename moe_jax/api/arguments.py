"""The quick API constructor's arguments: checked, and sorted into model fields, MoE fields and options.

``SparseMoeModel(task=..., num_experts=..., ..., **model_overrides)`` calls :func:`resolve`; every bad
argument is one ``ValueError`` naming it before anything is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moe_jax.api._common import (
    MOE_OPTIONS,
    build_config,
    check_int,
    check_nonnegative_float,
    check_positive_float,
    split_model_overrides,
)
from moe_jax.api.features import FEATURE_OPTIONS, FEATURE_TASK
from moe_jax.api.lm import LM_OPTIONS, LM_TASK, MIN_VOCAB
from moe_jax.api.seq2seq import SEQ2SEQ_OPTIONS, SEQ2SEQ_TASKS
from moe_jax.api.speech import SPEECH_OPTIONS, SPEECH_TASK
from moe_jax.api.vision import IMAGE_OPTIONS, IMAGE_TASK, check_image_model_fields, image_model_fields
from moe_jax.models.speech import SpeechConfig
from moe_jax.models.transformer import ModelConfig

TASKS = (*SEQ2SEQ_TASKS, LM_TASK, FEATURE_TASK, IMAGE_TASK, SPEECH_TASK)
# Options of every task that are not architecture fields: loss and optimizer knobs.
_COMMON_OPTIONS = {
    "lb_weight": 0.01,  # load-balancing loss weight
    "z_weight": 1e-3,  # router z-loss weight
    "warmup_steps": None,  # linear warmup; default 10% of the steps (at most 100)
}
# The Transformer tasks (seq2seq and feature classification) have always accepted each other's options.
_TRANSFORMER_OPTIONS = {**SEQ2SEQ_OPTIONS, **FEATURE_OPTIONS, **_COMMON_OPTIONS}
_IMAGE_OPTIONS = {**IMAGE_OPTIONS, **_COMMON_OPTIONS}
_LM_OPTIONS = {**LM_OPTIONS, **_COMMON_OPTIONS}
_SPEECH_OPTIONS = {**SPEECH_OPTIONS, **_COMMON_OPTIONS}
# capacity_factor="auto": 1.25 (the Switch / GShard training capacity), dropless for the language model.
_AUTO_CAPACITY = 1.25


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Checked constructor arguments.

    Attributes:
      task: the task name.
      num_experts, top_k, d_model, num_layers, capacity_factor, seed: as checked (``capacity_factor``
        with ``'auto'`` resolved).
      model: architecture fields (``model['moe']`` the MoE section) before the data decides the rest.
      extras: the quick API's own options (sizes the data decides, loss weights, warmup) with defaults.
    """

    task: str
    num_experts: int
    top_k: int
    d_model: int
    num_layers: int
    capacity_factor: float | None
    seed: int
    model: dict[str, Any]
    extras: dict[str, Any]


def resolve(
    task: str,
    num_experts: int,
    top_k: int,
    d_model: int,
    num_layers: int,
    capacity_factor: float | str | None,
    seed: int,
    model_overrides: dict[str, Any],
) -> Resolved:
    """Checks the constructor's arguments (see :class:`moe_jax.SparseMoeModel`).

    Raises:
        ValueError: naming the offending argument.
    """
    if not isinstance(task, str) or task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; choose one of {TASKS}")
    num_experts = check_int("num_experts", num_experts, 1)
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} must be an integer in [1, num_experts={num_experts}]")
    d_model = check_int("d_model", d_model, 1)
    num_layers = check_int("num_layers", num_layers, 1)
    if isinstance(capacity_factor, str) and capacity_factor == "auto":
        capacity_factor = None if task == LM_TASK else _AUTO_CAPACITY
    if capacity_factor is not None:
        capacity_factor = check_positive_float("capacity_factor", capacity_factor)
    seed = check_int("seed", seed, 0)
    moe = {"num_experts": num_experts, "top_k": int(top_k), "capacity_factor": capacity_factor}
    if task == IMAGE_TASK:
        fields, model, moe_defaults = image_model_fields(
            d_model=d_model, num_layers=num_layers, capacity_factor=capacity_factor
        )
        moe.update(moe_defaults)
        options, kind = _IMAGE_OPTIONS, "ViTConfig"
    else:
        cfg_cls = SpeechConfig if task == SPEECH_TASK else ModelConfig
        fields = {f.name for f in dataclasses.fields(cfg_cls)} - {"vocab_size", "moe"}
        model = {
            "d_model": d_model,
            "num_heads": 4 if d_model % 4 == 0 else 1,
            "d_ff": 2 * d_model,
            # The language model is a decoder: no encoder blocks.
            "num_encoder_layers": 0 if task == LM_TASK else num_layers,
            # The feature classifier is an encoder: no decoder blocks (so no causal-routing limits).
            "num_decoder_layers": 0 if task == FEATURE_TASK else num_layers,
        }
        options, kind = _TRANSFORMER_OPTIONS, cfg_cls.__name__
        if task == SPEECH_TASK:
            options = _SPEECH_OPTIONS
        if task == LM_TASK:
            fields -= {"num_encoder_layers"}
            options = _LM_OPTIONS
            # Generation routes dropless unless asked otherwise: the KV-cached decode then reproduces
            # the full forward's logits exactly (see DecoderLM).
            moe["eval_capacity_factor"] = None
    unknown = sorted(set(model_overrides) - fields - set(MOE_OPTIONS) - set(options))
    if unknown:
        raise ValueError(
            f"unknown model_overrides {unknown} for task={task!r}; choose {kind} fields "
            f"{sorted(fields)}, MoE fields {sorted(MOE_OPTIONS)} or {sorted(options)}"
        )
    extras = split_model_overrides(model_overrides, model, moe, options)
    if "layers" not in moe:  # every block MoE unless moe_layers says otherwise
        depth = model.get(
            "num_layers", max(model.get("num_encoder_layers", 0), model.get("num_decoder_layers", 0))
        )
        moe["layers"] = tuple(range(depth))
    model["moe"] = moe
    check_int("num_heads", model["num_heads"], 1)
    if not model.get("head_dim") and d_model % model["num_heads"]:
        raise ValueError(f"d_model={d_model} must be divisible by num_heads={model['num_heads']}")
    minimum = {"warmup_steps": 0, "seq_len": 2}
    ints = ("vocab_size", "max_input_len", "max_target_len", "seq_len", "patch_size", "warmup_steps")
    for name in ints:
        if extras.get(name) is not None:
            check_int(name, extras[name], minimum.get(name, 1))
    if task == LM_TASK and extras["vocab_size"] is not None and extras["vocab_size"] < MIN_VOCAB:
        raise ValueError(
            f"vocab_size={extras['vocab_size']} is too small for task='language_modeling': its byte-"
            f"fallback vocabulary holds 4 special ids and 256 byte pieces, so it needs >= {MIN_VOCAB}"
        )
    for name in ("lb_weight", "z_weight"):
        check_nonnegative_float(name, extras[name])
    if task == IMAGE_TASK:
        check_image_model_fields(model)
    else:
        build_config(SpeechConfig if task == SPEECH_TASK else ModelConfig, model, vocab_size=1)
    return Resolved(task, num_experts, int(top_k), d_model, num_layers, capacity_factor, seed, model, extras)
