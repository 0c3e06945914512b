"""The catalogue of hostile inputs and faults on the command line: one ``error:`` line, the exit code, no
traceback, and every file that was in the workdir before is still there, byte-identical.

The entry point runs in-process (stderr captured, ``SystemExit`` read); one prepared smoke workdir is copied
per case. Cases that need a process boundary (signals, the README command) live in test_trainer.py and
test_readme_command.py; the quick API's cases in test_bad_inputs_api.py.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sys

import pytest
from absl import flags

from moe_jax import main as cli
from moe_jax.train import loop
from moe_jax.train.lock import WorkdirLock
from tests.test_trainer import smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config=configs/translation.py:smoke", "--config.data.source=synthetic"]
VLM = ["--config=configs/vlm.py:smoke"]
IMAGE = ["--config=configs/image_classification.py:smoke"]


def run_cli(args, cwd=ROOT):
    """``python -m moe_jax.main ARGS`` in-process: (exit code, stderr, stdout)."""
    argv = ["moe_jax.main", *args]
    err, out = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = argv  # ml_collections discovers --config.* overrides from sys.argv
    sys.modules.pop("config_config", None)  # ...and would reuse the previous case's config module
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                cli._parse_flags(argv)
                cli.main([])
            except SystemExit as e:
                code = e.code
    finally:
        flags.FLAGS.unparse_flags()
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)  # the override flags are defined anew by each parse
        sys.argv = old_argv
        os.chdir(old_cwd)
    return code, err.getvalue(), out.getvalue()


def snapshot(directory) -> dict[str, str]:
    """Relative path → sha256 of every file under ``directory`` (the lock file's content aside)."""
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, directory)
            with open(path, "rb") as f:
                out[rel] = "" if rel == ".lock" else hashlib.sha256(f.read()).hexdigest()
    return out


def assert_one_error(code, stderr, expected_code, *needles):
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert code == expected_code, (code, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_kept(before, directory):
    """Every file that was there is still there, byte-identical (a new, empty ``.lock`` may appear)."""
    after = snapshot(directory)
    assert {k: after.get(k) for k in before} == before
    assert set(after) - set(before) <= {".lock"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A finished 2-step smoke run (checkpoints 1 and 2) that cases copy and abuse."""
    workdir = tmp_path_factory.mktemp("prepared") / "run"
    config = smoke_config(num_train_steps=2, checkpoint_every=1, eval_every=0)
    config.eval.max_decode_examples = 2
    loop.train_and_evaluate(config, str(workdir))
    return workdir


PREP_ARGS = [
    *SMOKE,
    "--config.train.num_train_steps=2",
    "--config.train.checkpoint_every=1",
    "--config.train.eval_every=0",
    "--config.eval.max_decode_examples=2",
]

# (case id, extra args, expected exit code, needles in the error line). Cases run on a fresh empty workdir.
CONFIG_CASES = [
    ("unknown config file", ["--config=configs/nope.py"], 2, ["no such config file"]),
    ("bad variant", ["--config=configs/translation.py:bogus"], 2, ["unknown variant 'bogus'"]),
    ("bad vision variant", ["--config=configs/vlm.py:bogus"], 2, ["unknown variant 'bogus'"]),
    ("not a python file", ["--config=README.md"], 2, ["not a Python config file"]),
    ("python file without get_config", ["--config=tests/__init__.py"], 2, ["get_config"]),
    ("missing --config", [], 2, ["--config="]),
    ("unknown override field", [*SMOKE, "--config.model.d_modell=3"], 2, ["d_modell"]),
    ("unknown override section", [*SMOKE, "--config.modell.d_model=3"], 2, ["modell"]),
    ("override of a wrong type", [*SMOKE, "--config.train.batch_size=abc"], 2, ["batch_size"]),
    ("top_k above num_experts", [*SMOKE, "--config.model.moe.top_k=9"], 2, ["top_k=9"]),
    ("num_experts zero", [*SMOKE, "--config.model.moe.num_experts=0"], 2, ["num_experts"]),
    ("unknown router", [*SMOKE, "--config.model.moe.router=magic"], 2, ["router"]),
    ("capacity factor zero", [*SMOKE, "--config.model.moe.capacity_factor=0.0"], 2, ["capacity_factor"]),
    ("heads do not divide d_model", [*SMOKE, "--config.model.num_heads=3"], 2, ["num_heads"]),
    ("negative learning rate", [*SMOKE, "--config.optim.learning_rate=-0.1"], 2, ["learning_rate=-0.1"]),
    ("zero learning rate", [*SMOKE, "--config.optim.learning_rate=0.0"], 2, ["learning_rate=0.0"]),
    ("negative warmup", [*SMOKE, "--config.optim.warmup_steps=-1"], 2, ["warmup_steps=-1"]),
    ("zero grad accumulation", [*SMOKE, "--config.optim.grad_accum_steps=0"], 2, ["grad_accum_steps=0"]),
    ("unknown optimizer", [*SMOKE, "--config.optim.name=sgdx"], 2, ["optim.name"]),
    ("negative steps", [*SMOKE, "--config.train.num_train_steps=-1"], 2, ["num_train_steps=-1"]),
    ("seq2seq bogus nonfinite", [*SMOKE, "--config.train.nonfinite=bogus"], 2, ["nonfinite='bogus'"]),
    ("vision bogus nonfinite", [*VLM, "--config.train.nonfinite=bogus"], 2, ["nonfinite='bogus'"]),
    ("image bogus nonfinite", [*IMAGE, "--config.train.nonfinite=bogus"], 2, ["nonfinite='bogus'"]),
    (
        "vision negative checkpoint_every",
        [*VLM, "--config.train.checkpoint_every=-1"],
        2,
        ["checkpoint_every=-1"],
    ),
    ("vision negative log_every", [*VLM, "--config.train.log_every=-1"], 2, ["log_every=-1"]),
    ("negative eval_every", [*SMOKE, "--config.train.eval_every=-1"], 2, ["eval_every=-1"]),
    ("keep_checkpoints zero", [*SMOKE, "--config.train.keep_checkpoints=0"], 2, ["keep_checkpoints=0"]),
    ("keep_checkpoints negative", [*SMOKE, "--config.train.keep_checkpoints=-1"], 2, ["keep_checkpoints=-1"]),
    ("image keep_checkpoints zero", [*IMAGE, "--config.train.keep_checkpoints=0"], 2, ["keep_checkpoints=0"]),
    ("zero batch", [*SMOKE, "--config.train.batch_size=0"], 2, ["batch_size=0"]),
    ("batch not a multiple of devices", [*SMOKE, "--config.train.batch_size=12"], 2, ["batch_size=12", "8"]),
    ("eval batch not a multiple", [*SMOKE, "--config.eval.batch_size=3"], 2, ["eval.batch_size=3"]),
    ("unknown sharding preset", [*SMOKE, "--config.sharding.preset=zigzag"], 2, ["config.sharding"]),
    ("unknown task", [*SMOKE, "--config.task=juggling"], 2, ["config.task='juggling'"]),
    ("vision group size not dividing", [*IMAGE, "--config.model.moe.group_size=7"], 2, ["group_size=7"]),
    ("missing real dataset", ["--config=configs/translation.py:wmt14_de_en"], 2, ["wmt14_translate/de-en"]),
    ("bad --mode", [*SMOKE, "--mode=bogus"], 2, ["mode"]),
]


@pytest.mark.parametrize("case,args,code,needles", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(case, args, code, needles, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_JAX_DATA_DIR", str(tmp_path / "data"))
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("user file")
    before = snapshot(workdir)
    got = run_cli([*args, f"--workdir={workdir}"] if args else [f"--workdir={workdir}"])
    assert_one_error(got[0], got[1], code, *needles)
    assert_kept(before, workdir)


def test_missing_workdir_flag():
    code, err, _ = run_cli(SMOKE)
    assert_one_error(code, err, 2, "--workdir=DIR")


def test_empty_workdir_flag():
    code, err, _ = run_cli([*SMOKE, "--workdir= "])
    assert_one_error(code, err, 2, "--workdir")


def test_workdir_is_a_file(tmp_path):
    (tmp_path / "f").write_text("precious")
    code, err, _ = run_cli([*SMOKE, f"--workdir={tmp_path / 'f'}"])
    assert_one_error(code, err, 2, "is an existing file")
    assert (tmp_path / "f").read_text() == "precious"


def test_workdir_parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("precious")
    code, err, _ = run_cli([*SMOKE, f"--workdir={tmp_path / 'f' / 'run'}"])
    assert_one_error(code, err, 2, "cannot create")


def test_workdir_that_cannot_be_created():
    code, err, _ = run_cli([*SMOKE, "--workdir=/proc/moe_jax_run"])
    assert_one_error(code, err, 2, "cannot create")


def test_eval_of_a_missing_workdir(tmp_path):
    code, err, _ = run_cli([*SMOKE, f"--workdir={tmp_path / 'nothing'}", "--mode=eval"])
    assert_one_error(code, err, 2, "nothing to evaluate")
    assert not (tmp_path / "nothing").exists()


def test_eval_of_an_empty_workdir_evaluates_nothing(tmp_path):
    (tmp_path / "w").mkdir()
    code, err, _ = run_cli([*SMOKE, f"--workdir={tmp_path / 'w'}", "--mode=eval"])
    assert_one_error(code, err, 2, "nothing to evaluate")
    assert not (tmp_path / "w" / "checkpoints").exists()


def _copy(prepared, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(prepared, workdir)
    return workdir


IDENTITY_CASES = [
    ("another task", ["--config=configs/summarization.py:smoke", "--config.data.source=synthetic"], ["task"]),
    (
        "another model width",
        [*PREP_ARGS, "--config.model.d_model=48"],
        ["model.d_model: 32 in the checkpoint vs 48"],
    ),
    ("another expert count", [*PREP_ARGS, "--config.model.moe.num_experts=8"], ["num_experts"]),
    ("another vocabulary", [*PREP_ARGS, "--config.data.vocab_size=30"], ["vocab_size"]),
    ("another data source", [*PREP_ARGS, "--config.data.source=gettext_translation"], ["data.source"]),
]


@pytest.mark.parametrize("case,args,needles", IDENTITY_CASES, ids=[c[0] for c in IDENTITY_CASES])
def test_workdir_of_another_run_is_refused(case, args, needles, prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_JAX_DATA_DIR", str(tmp_path / "data"))
    workdir = _copy(prepared, tmp_path)
    before = snapshot(workdir)
    code, err, _ = run_cli([*args, f"--workdir={workdir}"])
    assert_one_error(code, err, 2, "different", *needles)
    assert_kept(before, workdir)


def test_locked_workdir_is_refused(prepared, tmp_path):
    workdir = _copy(prepared, tmp_path)
    before = snapshot(workdir)
    with WorkdirLock(str(workdir)):
        code, err, _ = run_cli([*PREP_ARGS, f"--workdir={workdir}"])
    assert_one_error(code, err, 2, "another run", str(os.getpid()))
    assert_kept(before, workdir)


def _corrupt(step_dir):
    for base, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(base, name), "wb") as f:
                f.write(b"garbage")


def test_all_checkpoints_unreadable(prepared, tmp_path):
    workdir = _copy(prepared, tmp_path)
    for step in ("1", "2"):
        _corrupt(workdir / "checkpoints" / step)
    before = snapshot(workdir)
    code, err, _ = run_cli([*PREP_ARGS, f"--workdir={workdir}"])
    assert_one_error(code, err, 2, "no readable checkpoint")
    assert_kept(before, workdir)


@pytest.mark.slow
def test_eval_after_a_corrupt_latest_step_keeps_history(prepared, tmp_path):
    """Eval skips the unreadable step 2, evaluates step 1, and rewrites no training history."""
    workdir = _copy(prepared, tmp_path)
    _corrupt(workdir / "checkpoints" / "2")
    before = snapshot(workdir)
    code, err, out = run_cli([*PREP_ARGS, f"--workdir={workdir}", "--mode=eval"])
    assert code == 0, err[-2000:]
    assert "resumed from checkpoint step 1" in out and "unreadable" in out
    after = snapshot(workdir)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed or lost
    assert set(after) - set(before) == {"eval_metrics.json"}


@pytest.mark.slow
def test_unreadable_step_does_not_take_a_retention_slot(prepared, tmp_path):
    """keep_checkpoints=2 with steps 1 (good) and 2 (corrupt): resuming from 1 and saving 3, 4 keeps the
    corrupt 2 (never deleted) and two good steps."""
    workdir = _copy(prepared, tmp_path)
    _corrupt(workdir / "checkpoints" / "2")
    corrupt = {k: v for k, v in snapshot(workdir).items() if k.startswith("checkpoints/2/")}
    code, err, _ = run_cli(
        [
            *PREP_ARGS[:-3],
            "--config.train.num_train_steps=4",
            "--config.train.keep_checkpoints=2",
            "--config.train.checkpoint_every=1",
            "--config.train.eval_every=0",
            "--config.eval.max_decode_examples=0",
            f"--workdir={workdir}",
        ]
    )
    assert code == 0, err[-2000:]
    steps = sorted(os.listdir(workdir / "checkpoints"))
    assert "2" in steps and "4" in steps and len(steps) == 3, steps
    assert {k: v for k, v in snapshot(workdir).items() if k.startswith("checkpoints/2/")} == corrupt


def test_metrics_with_a_bad_middle_line_is_refused(prepared, tmp_path):
    workdir = _copy(prepared, tmp_path)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, "{not json")
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(workdir)
    code, err, _ = run_cli([*PREP_ARGS, f"--workdir={workdir}"])
    assert_one_error(code, err, 2, "metrics.jsonl", "line 2")
    assert_kept(before, workdir)


@pytest.mark.slow
def test_metrics_with_a_torn_last_line_resumes(prepared, tmp_path):
    workdir = _copy(prepared, tmp_path)
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "kind": "tra')
    code, err, _ = run_cli([*PREP_ARGS, "--config.train.num_train_steps=3", f"--workdir={workdir}"])
    assert code == 0, err[-2000:]
    assert "incomplete" in err
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]


@pytest.mark.slow
def test_nonfinite_loss_exits_3_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    workdir = _copy(prepared, tmp_path)
    before = snapshot(workdir)
    code, err, _ = run_cli(
        [
            *PREP_ARGS,
            "--config.train.num_train_steps=4",
            "--config.optim.learning_rate=1e30",
            "--config.optim.clip_norm=0.0",
            "--config.optim.schedule=constant",
            "--config.train.keep_checkpoints=5",
            f"--workdir={workdir}",
        ]
    )
    assert_one_error(code, err, 3, "non-finite", "last good checkpoint is step")
    after = snapshot(workdir)
    assert [k for k, v in before.items() if k.startswith("checkpoints/") and after.get(k) != v] == []


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_line(prepared, tmp_path, monkeypatch):
    from orbax.checkpoint._src.serialization import tensorstore_utils

    real = tensorstore_utils._build_ocdbt_kvstore_tspec

    def disk_full(directory, *args, **kwargs):
        if "/4.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(tensorstore_utils, "_build_ocdbt_kvstore_tspec", disk_full)
    workdir = _copy(prepared, tmp_path)
    before = snapshot(workdir)
    code, err, _ = run_cli(
        [
            *PREP_ARGS,
            "--config.train.num_train_steps=8",
            "--config.train.keep_checkpoints=5",
            f"--workdir={workdir}",
        ]
    )
    assert_one_error(code, err, 2, "disk full", "last good checkpoint is step")
    after = snapshot(workdir)
    assert [k for k, v in before.items() if k.startswith("checkpoints/") and after.get(k) != v] == []
