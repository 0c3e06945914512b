"""Optax optimizers and learning-rate schedules from an ``optim`` config section.

Fields read (``ml_collections.ConfigDict`` or any mapping):
    name: ``adamw`` (default) or ``adafactor``.
    learning_rate: peak learning rate (> 0).
    schedule: ``cosine`` (linear warmup then cosine decay to ``end_lr_ratio``·peak), ``rsqrt`` (linear warmup
        then peak·sqrt(warmup/step)) or ``constant`` (after warmup).
    warmup_steps, end_lr_ratio, b1, b2, eps, weight_decay: the usual.
    clip_norm: global-norm gradient clipping (0 or None disables it).
    grad_accum_steps: gradients of this many micro-batches are averaged before one update
        (``optax.MultiSteps``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import optax


def _get(cfg, name, default):
    value = cfg.get(name, default) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else default
    return default if value is None else value


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the update count."""
    peak = float(cfg["learning_rate"])
    warmup = int(_get(cfg, "warmup_steps", 0))
    kind = _get(cfg, "schedule", "cosine")
    warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if kind == "cosine":
        decay_steps = max(total_steps - warmup, 1)
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(_get(cfg, "end_lr_ratio", 0.1)))
    elif kind == "rsqrt":
        after = lambda step: peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step + max(warmup, 1), 1))
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optim.schedule={kind!r} is unknown; choose 'cosine', 'rsqrt' or 'constant'")
    if warmup <= 0:
        return after
    return optax.join_schedules([warmup_fn, after], [warmup])


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns ``(tx, schedule)``; ``tx`` includes clipping and gradient accumulation."""
    schedule = make_schedule(cfg, total_steps)
    name = _get(cfg, "name", "adamw")
    if name == "adamw":
        core = optax.adamw(
            schedule,
            b1=float(_get(cfg, "b1", 0.9)),
            b2=float(_get(cfg, "b2", 0.98)),
            eps=float(_get(cfg, "eps", 1e-9)),
            weight_decay=float(_get(cfg, "weight_decay", 0.0)),
        )
    elif name == "adafactor":
        core = optax.adafactor(schedule, weight_decay_rate=float(_get(cfg, "weight_decay", 0.0)) or None)
    else:
        raise ValueError(f"optim.name={name!r} is unknown; choose 'adamw' or 'adafactor'")
    clip = float(_get(cfg, "clip_norm", 0.0))
    # The same state structure with or without clipping, so a run can resume with clipping changed.
    tx = optax.chain(optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(), core)
    accum = int(_get(cfg, "grad_accum_steps", 1))
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx, schedule
