"""Exceptions that the command line turns into one clear line on stderr."""


class ConfigError(ValueError):
    """Bad user input: a config value, a workdir or a checkpoint the run cannot use.

    The message names the field (or path) and the fix; ``moe_jax.main`` prints it and exits with code 2.
    """


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message names the step."""


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (disk full, permissions); earlier checkpoints are intact."""


class RunInterrupted(Exception):  # noqa: N818 - a stop the user asked for, not an error
    """SIGINT or SIGTERM stopped the run at a step boundary, after checkpointing that step.

    Attributes:
        signum: the signal; the command line exits with 128 + signum (130 for SIGINT, 143 for SIGTERM).
        step: the last completed step.
        saved: whether that step was checkpointed (evaluation-only runs save nothing).
    """

    def __init__(self, signum: int, step: int, *, saved: bool = True):
        import signal

        self.signum, self.step, self.saved = signum, step, saved
        name = signal.Signals(signum).name
        where = (
            f"checkpoint saved at step {step}; re-run the same command to resume"
            if saved
            else "nothing saved"
        )
        super().__init__(f"interrupted by {name} after step {step}: {where}")
