"""Task families behind the one :class:`~moe_jax.tasks.base.Task` interface, keyed by ``config.task``."""

from __future__ import annotations

from moe_jax.errors import ConfigError
from moe_jax.tasks.base import Task
from moe_jax.tasks.classification import ImageClassificationTask
from moe_jax.tasks.lm import LanguageModelingTask
from moe_jax.tasks.seq2seq import Seq2SeqTask
from moe_jax.tasks.speech import SpeechRecognitionTask
from moe_jax.tasks.vlm import VLMTask

TASKS: dict[str, type[Task]] = {
    "translation": Seq2SeqTask,
    "summarization": Seq2SeqTask,
    "image_classification": ImageClassificationTask,
    "vlm": VLMTask,
    "language_modeling": LanguageModelingTask,
    "speech_recognition": SpeechRecognitionTask,
}


def get_task(config) -> Task:
    """The task ``config.task`` names, bound to ``config``.

    Raises:
        ConfigError: unknown task.
    """
    name = config.get("task")
    if name not in TASKS:
        raise ConfigError(f"config.task={name!r} is unknown; choose one of {sorted(TASKS)}")
    return TASKS[name](config)


__all__ = ["TASKS", "Task", "get_task"]
