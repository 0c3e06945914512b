"""A trained model back from its workdir: config, tokenizer and parameters of the newest readable step.

What ``python -m moe_jax.generate`` (and anything else that uses a finished run without training it) reads:
the run config saved with the checkpoint, ``WORKDIR/tokenizer.model`` and the parameters, restored with the
same identity checks as a resumed run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.tasks import get_task
from moe_jax.train import optim
from moe_jax.train import step as step_lib
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.workdir import resolve_workdir


@dataclasses.dataclass
class Trained:
    """A run's model ready for inference.

    Attributes:
        config: the run's config (as saved with the checkpoint).
        task: its :class:`~moe_jax.tasks.base.Task`.
        model: the ``nnx.Module`` with the checkpoint's parameters, in evaluation mode.
        tokenizer: the run's :class:`~moe_jax.data.Tokenizer`.
        step: the checkpoint step.
    """

    config: Any
    task: Any
    model: nnx.Module
    tokenizer: Any
    step: int


@dataclasses.dataclass
class _TokenizerOnly:
    tokenizer: Any


def load_trained(workdir: str) -> Trained:
    """Loads the newest readable checkpoint of ``workdir`` with its config and tokenizer.

    Raises:
        ConfigError: no workdir, no checkpoint, no tokenizer file, or a checkpoint that does not match its
            own config (one line naming what and where).
    """
    from moe_jax.data.tokenizer import Tokenizer

    workdir = resolve_workdir(workdir, create=False)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} does not exist: train a model there first")
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"--workdir={workdir} holds no checkpoint: train a model there first")
    ckpt = Checkpointer(ckpt_dir, keep=1_000_000, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise ConfigError(f"--workdir={workdir} holds no checkpoint: train a model there first")
        try:
            config = ml_collections.ConfigDict(ckpt.read_config(steps[-1]))
        except Exception as e:  # noqa: BLE001 - any unreadable file: name it
            raise ConfigError(
                f"{ckpt_dir}/{steps[-1]}: the run config cannot be read ({type(e).__name__})"
            ) from None
        tok_path = os.path.join(workdir, "tokenizer.model")
        if not os.path.isfile(tok_path):
            raise ConfigError(
                f"{tok_path} is missing: the run's tokenizer is saved there with its checkpoints"
            )
        try:
            tokenizer = Tokenizer.load(tok_path)
        except Exception as e:  # noqa: BLE001
            reason = " ".join(str(e).split())[:120]
            raise ConfigError(f"{tok_path} is not a SentencePiece model ({reason})") from None
        task = get_task(config)
        data = _TokenizerOnly(tokenizer)
        model = task.build_model(config, data)
        tx, _ = optim.make_optimizer(config.optim, max(int(config.train.num_train_steps), 1))
        graphdef, state = step_lib.create_train_state(model, tx)
        restored = ckpt.restore_latest(state, None, identity=task.identity(config, data))
        step, state, _ = restored
    finally:
        ckpt.close()
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return Trained(config, task, model, tokenizer, step)
