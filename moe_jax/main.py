"""Command line: ``python -m moe_jax.main --config=configs/<task>.py[:variant] --workdir=DIR [--mode=eval]``.

Also installed as the ``moe-jax-train`` console command. Every task runs through here; the task comes from
``config.task`` (``moe_jax.tasks``). Bad input (a config file or value, an unusable workdir or checkpoint,
missing data) prints one ``error:`` line on stderr and exits with status 2, a non-finite loss exits 3,
SIGINT / SIGTERM save the current step and exit 130 / 143; nothing in the workdir is deleted.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (path.py[:variant]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval"],
    "train: train (resuming) then evaluate; eval: evaluate the latest checkpoint only.",
)


def _fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _last_error(text: str) -> str:
    """The innermost ``SomeError: message`` of a (possibly flattened) traceback, else the text itself."""
    text = text.replace("\\n", "\n").replace("\\'", "'")
    found = re.findall(r"(?:^|\s)(?:[\w.]+(?:Error|Exception)): (.+?)(?=$|\n)", text)
    return " ".join((found[-1] if found and "Traceback" in text else text).split()).strip("'\" ")


def _config_path(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_config_file(spec: str) -> None:
    """Fails in one line when ``--config`` names no readable Python config file."""
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        _fail(
            f"--config={spec}: no such config file {os.path.abspath(path)}; pass configs/<task>.py[:variant]"
        )
    if not path.endswith(".py"):
        _fail(f"--config={spec}: {path} is not a Python config file (configs/<task>.py with get_config())")


def _parse_flags(argv):
    spec = _config_path(argv[1:])
    if spec is not None:
        _check_config_file(spec)
    try:
        rest = flags.FLAGS(argv)
        config = _CONFIG.value
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read the config file or an override is bad input
        _fail(f"bad --config or override: {_last_error(str(e))}; check the config file and the field names")
    if config is None or not _WORKDIR.value:
        _fail("pass --config=configs/<task>.py[:variant] and --workdir=DIR")
    return rest


def main(argv):
    del argv
    # Library logs (TFDS, Orbax's background writer) would bury the one-line errors; failures reach the
    # run as exceptions and are reported once below, progress goes to stdout.
    logging.set_verbosity(logging.FATAL)
    from moe_jax import tpu_flags

    tpu_flags.apply()  # before any backend exists (libtpu reads them once; nothing else reads them)
    from moe_jax.errors import ConfigError, NonFiniteLossError, RunInterrupted
    from moe_jax.train.loop import train_and_evaluate
    from moe_jax.train.workdir import resolve_workdir

    try:
        workdir = resolve_workdir(_WORKDIR.value, create=_MODE.value == "train")  # once: Orbax needs absolute
        train_and_evaluate(_CONFIG.value, workdir, mode=_MODE.value)
    except ConfigError as e:
        _fail(str(e))
    except NonFiniteLossError as e:
        _fail(str(e), code=3)
    except RunInterrupted as e:
        _fail(str(e), code=128 + e.signum)
    except KeyboardInterrupt:
        _fail("interrupted before training started; nothing was changed", code=130)


def run():
    """Console-script entry point (``moe-jax-train``)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
