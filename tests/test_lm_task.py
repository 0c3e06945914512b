"""The language-modelling task end to end: THE loop, bits per byte, samples, the moe_jax.generate command."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os

import numpy as np
import pytest

from moe_jax import generate as generate_cli
from moe_jax.tasks import get_task
from moe_jax.train import loop
from tests.test_bad_inputs import assert_one_error, snapshot
from tests.test_data_lm import write_python_tree
from tests.test_lm_configs import lm_config

# ~2.5 minutes on 2 cores (a trained smoke LM, the generate command compiled twice): CI's slow set runs it.
pytestmark = pytest.mark.slow


def smoke(base, **train):
    c = lm_config("smoke")
    c.data_dir = str(base / "data")
    c.data.builder_kwargs = {"roots": [str(base / "src")], "min_documents": 20}
    c.train.update(**train)
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke LM trained 6 steps in a RELATIVE workdir, as a user types it."""
    base = tmp_path_factory.mktemp("lm_task")
    write_python_tree(base / "src", num_files=60)
    old = os.getcwd()
    os.chdir(base)
    out = io.StringIO()
    try:
        final = loop.train_and_evaluate(smoke(base, num_train_steps=6), "runs/lm", stream=out)
    finally:
        os.chdir(old)
    return base, base / "runs" / "lm", final, out.getvalue()


def run_generate(args) -> tuple[int, str, str]:
    err, out, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            generate_cli.main(args)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue(), out.getvalue()


def test_training_reports_perplexity_bits_per_byte_and_samples(trained):
    base, workdir, final, printed = trained
    assert "val_perplexity" in printed and "val_bits_per_byte" in printed
    assert "--- sample 0" in printed and "continuation:" in printed
    assert final["val_perplexity"] == pytest.approx(math.exp(final["val_loss"]), rel=1e-6)
    assert final["generate_tokens_per_second"] > 0
    assert (workdir / "tokenizer.model").is_file() and (workdir / "final_metrics.json").is_file()
    # Bits per byte recomputed from the data: nats per token x tokens / (ln 2 x UTF-8 bytes of the targets).
    config = smoke(base)
    task = get_task(config)
    data = task.load_data(config)
    byte_len_V = data.tokenizer.piece_byte_lengths()
    tokens = nbytes = 0.0
    for batch in data.eval_batches("validation", 8, max_examples=config.eval.max_eval_examples):
        w = batch["token_weight"] * batch["row_weight"][:, None]
        tokens += w.sum()
        nbytes += (byte_len_V[batch["targets"]] * w).sum()
    expected = final["val_loss"] * tokens / (math.log(2) * nbytes)
    assert final["val_bits_per_byte"] == pytest.approx(expected, rel=1e-5)


def test_generate_command_with_and_without_the_cache(trained):
    _, workdir, _, _ = trained
    before = snapshot(workdir)
    common = [f"--workdir={workdir}", "--prompt=def f(x):", "--prompt=import os", "--max_new_tokens=12"]
    code, err, cached = run_generate(common)
    assert code == 0, err
    code, err, reference = run_generate([*common, "--no_cache"])
    assert code == 0, err
    assert cached == reference
    lines = cached.splitlines()
    assert len(lines) >= 2 and lines[0].startswith("def f(x):")
    sampled = [run_generate([*common, "--temperature=1.5", "--top_k=20", "--top_p=0.9", "--seed=3"])[2]]
    sampled.append(run_generate([*common, "--temperature=1.5", "--top_k=20", "--top_p=0.9", "--seed=3"])[2])
    assert sampled[0] == sampled[1]
    assert snapshot(workdir) == before  # generation changes nothing in the workdir


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompt=x"], "--workdir"),
        (["--workdir={w}"], "--prompt"),
        (["--workdir={w}", "--prompt=  "], "--prompt is empty"),
        (["--workdir={w}", "--prompt=x", "--max_new_tokens=0"], "--max_new_tokens=0"),
        (["--workdir={w}", "--prompt=x", "--temperature=-1"], "--temperature=-1"),
        (["--workdir={w}", "--prompt=x", "--top_p=0"], "--top_p=0"),
        (["--workdir={w}", "--prompt=x", "--top_k=-2"], "--top_k=-2"),
        (["--workdir={w}", "--prompt=x", "--max_new_tokens=ten"], "max_new_tokens"),
        (["--workdir={w}", "--prompt=x", "--bogus=1"], "--bogus"),
        (["--workdir={w}/nowhere", "--prompt=x"], "does not exist"),
        (["--workdir={base}", "--prompt=x"], "holds no checkpoint"),
    ],
)
def test_generate_bad_input_is_one_line_exit_2(trained, args, needle):
    base, workdir, _, _ = trained
    before = snapshot(workdir)
    code, err, _ = run_generate([a.format(w=workdir, base=base) for a in args])
    assert_one_error(code, err, 2, needle)
    assert snapshot(workdir) == before


def test_generate_needs_the_tokenizer_file(trained, tmp_path):
    _, workdir, _, _ = trained
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("tokenizer.model"))
    code, err, _ = run_generate([f"--workdir={copy}", "--prompt=x"])
    assert_one_error(code, err, 2, "tokenizer.model is missing")


def test_resume_continues_and_refuses_another_corpus(trained):
    base, workdir, final, _ = trained
    old = os.getcwd()
    os.chdir(base)
    try:
        resumed = loop.train_and_evaluate(smoke(base, num_train_steps=8), "runs/lm", stream=io.StringIO())
        with open(workdir / "metrics.jsonl") as f:
            steps = [json.loads(line)["step"] for line in f if '"train"' in line]
        assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
        assert np.isfinite(resumed["val_loss"])
        other = smoke(base)
        other.data.text_key = "path"
        with pytest.raises(Exception, match="text_key"):
            loop.train_and_evaluate(other, "runs/lm", stream=io.StringIO())
    finally:
        os.chdir(old)


def test_bad_lm_fields_are_config_errors(tmp_path):
    c = lm_config("smoke")
    c.data.seq_len = 1
    with pytest.raises(Exception, match="config.data.seq_len=1"):
        loop.validate_config(c)
    c = lm_config("smoke")
    c.eval.max_new_tokens = -1
    with pytest.raises(Exception, match="config.eval.max_new_tokens=-1"):
        loop.validate_config(c)
