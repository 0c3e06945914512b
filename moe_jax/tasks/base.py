"""The one ``Task`` interface every task family implements, and what its implementations share.

A task turns a config into data and a model and says how the model is trained and scored:

* ``load_data(config)``: an object with the one data contract, ``train_iter(batch_size, *, seed,
  shard_index, num_shards)`` and ``eval_batches(split, batch_size, *, max_examples)``; batch keys
  ``token_weight`` [B, L] and ``row_weight`` [B] where weights exist (padding rows weigh zero);
* ``build_model(config, data)``: the ``nnx.Module``;
* ``loss_sums(model, batch, *, dropout_key, deterministic)``: the forward, giving summed loss, correct
  predictions and weight, plus the per-MoE-layer aux (what :func:`moe_jax.train.step.train_step` and
  ``eval_step`` call);
* ``predict_and_score(run, state, split)``: predictions on a split (argmax, greedy, beam) and their scores
  (accuracy, BLEU, ROUGE, VQA exact match), samples printed.

The loop (:func:`moe_jax.train.loop.train_and_evaluate`) is the same for every task.
"""

from __future__ import annotations

import json
import os
from typing import Any

from moe_jax.errors import ConfigError
from moe_jax.train.checkpoint import RUNTIME_MODEL_FIELDS


def data_dir(config) -> str:
    """Where prepared corpora and tokenizers live: ``config.data_dir``, $MOE_JAX_DATA_DIR or the cache."""
    d = config.get("data_dir") or os.environ.get("MOE_JAX_DATA_DIR") or "~/.cache/moe_jax/data"
    return os.path.abspath(os.path.expanduser(d))


def plain(section) -> dict[str, Any]:
    """A config section as plain JSON values (what checkpoints record to recognise a run)."""
    return json.loads(
        json.dumps(section.to_dict() if hasattr(section, "to_dict") else dict(section), default=str)
    )


def model_identity(model_section) -> dict[str, Any]:
    """``config.model`` as a checkpoint records it to recognise the model (runtime-only fields left out)."""
    out = plain(model_section)
    for name in RUNTIME_MODEL_FIELDS:
        out.pop(name, None)
    return out


class Task:
    """Base class of the task families; subclasses override the methods below.

    Attributes:
        name: the ``config.task`` values this class serves are listed in ``moe_jax.tasks.TASKS``.
        train_keys: the batch keys the train step reads (others stay on the host).
        eval_keys: the batch keys the eval step reads.
        token_level: the loss runs over tokens (perplexity is reported) rather than rows.
    """

    train_keys: tuple[str, ...] = ()
    eval_keys: tuple[str, ...] = ()
    token_level: bool = True

    def __init__(self, config):
        self.config = config
        self.label_smoothing = float(config.loss.get("label_smoothing", 0.0) or 0.0)

    # -- configuration -----------------------------------------------------------------------------------
    def validate(self, config, *, data_parallel: int) -> None:
        """Task-specific checks beyond the loop's (raise :class:`ConfigError` naming the field)."""

    def identity(self, config, data=None) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: task, data source, tokenizer, model, optimizer.

        Without ``data`` (before it is loaded) the tokenizer is left out.
        """
        tokenizer = getattr(data, "tokenizer", None)
        out = {
            "task": config.task,
            "data": {k: v for k, v in plain(config.data).items() if k in self.identity_data_fields},
            "model": model_identity(config.model),
            # These shape the optimizer state; the learning rate and schedule may change on resume.
            "optimizer": {
                "name": config.optim.get("name", "adamw"),
                "grad_accum_steps": int(config.optim.get("grad_accum_steps", 1) or 1),
            },
        }
        if data is not None:
            out["vocab_size"] = getattr(tokenizer, "vocab_size", None)
        return out

    identity_data_fields: tuple[str, ...] = ("source", "builder_config", "input_key", "target_key")

    # -- data and model ----------------------------------------------------------------------------------
    def load_data(self, config):
        raise NotImplementedError

    def build_model(self, config, data):
        raise NotImplementedError

    def count_tokens(self, batch) -> float:
        """Tokens a training batch holds (for tokens/s); 0 where the task has no tokens."""
        return 0.0

    # -- training and evaluation -------------------------------------------------------------------------
    def loss_sums(self, model, batch, *, dropout_key, deterministic):
        raise NotImplementedError

    def predict_and_score(self, run, state, split: str, *, stream=None) -> dict[str, float]:
        """Predictions on ``split`` scored by the task's metric (none by default)."""
        return {}

    def at_start(self, run, state, *, stream=None) -> dict[str, float]:
        """Scores of the untrained model (logged as step 0) where the config asks for them."""
        return {}

    def after_run(self, run, final: dict, workdir: str) -> None:
        """Task plots written next to the run's metrics (``routing.png`` is the loop's)."""


def missing_data(error: Exception) -> ConfigError:
    """The one-line error for data that is not on this machine (the builder's message names the fix)."""
    return ConfigError(str(error))
