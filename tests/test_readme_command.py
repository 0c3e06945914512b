"""The README's main command as a user types it: relative workdir, from a fresh directory, resume, eval.

The command is read out of README.md (the first ``bash`` block), so the README and this check cannot drift
apart. Only the number of steps (and how much is decoded) is made small.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--config.train.checkpoint_every=2",
    "--config.train.log_every=1",
    "--config.eval.max_eval_examples=32",
    "--config.eval.max_decode_examples=4",
]


def readme_main_command() -> list[str]:
    """The ``python -m moe_jax.main ...`` part of the README's first set-up command, as argv."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    first_block = re.search(r"```bash\n(.*?)\n```", text, re.S).group(1)
    commands = [c.strip() for c in first_block.split("&&")]
    main = [c for c in commands if "moe_jax.main" in c]
    assert len(main) == 1, f"the README's first command has no single moe_jax.main part: {first_block}"
    argv = shlex.split(main[0])
    assert argv[:3] == ["python", "-m", "moe_jax.main"], argv
    return argv[3:]


def test_readme_command_uses_a_relative_workdir():
    """The check below is only worth something while the README types a relative path."""
    workdir = [a for a in readme_main_command() if a.startswith("--workdir=")]
    assert len(workdir) == 1 and not os.path.isabs(workdir[0].split("=", 1)[1]), workdir


def _run(args, cwd, data_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", MOE_JAX_DATA_DIR=str(data_dir))
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "moe_jax.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_readme_main_command_trains_resumes_and_evaluates(tmp_path):
    """From a fresh directory holding what a clone has (``configs/``): train, re-run to resume, eval."""
    cwd = tmp_path / "fresh clone"
    shutil.copytree(os.path.join(ROOT, "configs"), cwd / "configs")
    data_dir = tmp_path / "data"
    args = readme_main_command()
    workdir = cwd / [a for a in args if a.startswith("--workdir=")][0].split("=", 1)[1]

    first = _run([*args, *SMALL, "--config.train.num_train_steps=4"], cwd, data_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]

    again = _run([*args, *SMALL, "--config.train.num_train_steps=6"], cwd, data_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint step 4" in again.stdout
    with open(workdir / "metrics.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if r.get("kind") == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]

    evaluated = _run([*args, *SMALL, "--config.train.num_train_steps=6", "--mode=eval"], cwd, data_dir)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "resumed from checkpoint step 6" in evaluated.stdout
    assert "val_loss" in evaluated.stdout
