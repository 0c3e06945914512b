"""Exceptions that the command line turns into one clear line on stderr."""


class ConfigError(ValueError):
    """Bad user input: a config value, a workdir or a checkpoint the run cannot use.

    The message names the field (or path) and the fix; ``moe_jax.main`` prints it and exits with code 2.
    """


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message names the step."""


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (disk full, permissions); earlier checkpoints are intact."""
