"""Command line: ``python -m moe_jax.main --config=configs/translation.py --workdir=DIR``.

Also installed as the ``moe-jax-train`` console command.

Bad input (config values, an unusable workdir or checkpoint, missing data) prints one line on stderr and
exits with status 2; nothing in the workdir is deleted.
"""

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


def _parse_flags(argv):
    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections' override parser raises AttributeError ("Did you mean ...") for unknown fields.
        text = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").strip("'\"").split())
        _fail(f"bad --config or override: {text}; check the field names in the config file")
    if _CONFIG.value is None or not _WORKDIR.value:
        _fail("pass --config=configs/<task>.py[:variant] and --workdir=DIR")
    return rest


def main(argv):
    del argv
    # Library logs (TFDS, Orbax's background writer) would bury the one-line errors; failures reach the
    # run as exceptions and are reported once below, progress goes to stdout.
    logging.set_verbosity(logging.FATAL)
    from moe_jax.errors import ConfigError, NonFiniteLossError
    from moe_jax.train import trainer
    from moe_jax.train.workdir import resolve_workdir

    config = _CONFIG.value
    if _MODE.value == "eval":
        with config.unlocked():
            config.train.num_train_steps = 0  # resume, train nothing, evaluate
    if config.get("task") in ("image_classification", "vlm"):
        from moe_jax.train import vision_loop as trainer  # same contract: train_and_evaluate(config, workdir)
    try:
        workdir = resolve_workdir(_WORKDIR.value)  # once, here: Orbax needs absolute paths
        trainer.train_and_evaluate(config, workdir)
    except ConfigError as e:
        _fail(str(e))
    except NonFiniteLossError as e:
        _fail(str(e), code=3)


def run():
    """Console-script entry point (``moe-jax-train``)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
