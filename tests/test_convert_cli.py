"""``python -m moe_jax.convert``: Hugging Face directories into a workdir's starting parameters, and out."""

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    p = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def _tensors(path):
    with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle


def test_from_hf_then_to_hf_gives_back_the_same_tensors(tmp_path):
    src = os.path.join(FIXTURES, "olmoe")
    code, out, err = _run(["moe_jax.convert", f"--from_hf={src}", "--workdir=runs/w"], tmp_path)
    assert code == 0, err
    assert "configs/lm.py:hf=" in out and (tmp_path / "runs/w/init_params.safetensors").is_file()
    code, out, err = _run(["moe_jax.convert", "--workdir=runs/w", "--to_hf=exported"], tmp_path)
    assert code == 0, err
    original, exported = _tensors(src), _tensors(str(tmp_path / "exported"))
    assert sorted(original) == sorted(exported)
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--workdir=w"], "exactly one of --from_hf"),
        (["--workdir=w", "--from_hf=missing"], "missing is not a directory"),
        (["--workdir=w", "--to_hf=out"], "--workdir=w does not exist"),
        (["--from_hf=x"], "the following arguments are required: --workdir"),
        (
            ["--workdir=w", f"--from_hf={os.path.join(FIXTURES, 'llama', 'config.json')}"],
            "is not a directory",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    code, out, err = _run(["moe_jax.convert", *args], tmp_path)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert "Traceback" not in err


def test_existing_outputs_are_never_overwritten(tmp_path):
    src = os.path.join(FIXTURES, "llama")
    assert _run(["moe_jax.convert", f"--from_hf={src}", "--workdir=w"], tmp_path)[0] == 0
    before = (tmp_path / "w/init_params.safetensors").read_bytes()
    code, _, err = _run(["moe_jax.convert", f"--from_hf={src}", "--workdir=w"], tmp_path)
    assert code == 2 and "already holds" in err
    assert (tmp_path / "w/init_params.safetensors").read_bytes() == before
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("x")
    code, _, err = _run(["moe_jax.convert", "--workdir=w", "--to_hf=out"], tmp_path)
    assert code == 2 and "not an empty directory" in err and os.listdir(tmp_path / "out") == ["keep.txt"]


@pytest.mark.slow
def test_fine_tune_from_a_converted_checkpoint_and_export_it(tmp_path):
    """The README's sequence: convert, fine-tune with configs/lm.py:hf=DIR, export the trained model."""
    src = os.path.join(FIXTURES, "qwen2_moe")
    assert _run(["moe_jax.convert", f"--from_hf={src}", "--workdir=w"], tmp_path)[0] == 0
    code, out, err = _run(
        [
            "moe_jax.main",
            f"--config={REPO}/configs/lm.py:hf={src}",
            "--workdir=w",
            "--config.train.num_train_steps=6",
            "--config.train.log_every=3",
            "--config.train.eval_every=6",
            "--config.eval.max_eval_examples=16",
            "--config.eval.num_samples=0",
        ],
        tmp_path,
    )
    assert code == 0, err
    assert "starting from the parameters in" in out
    code, out, err = _run(["moe_jax.convert", "--workdir=w", "--to_hf=tuned"], tmp_path)
    assert code == 0 and "checkpoint step 6" in out, err
    original, tuned = _tensors(src), _tensors(str(tmp_path / "tuned"))
    assert sorted(original) == sorted(tuned)
    assert any(not np.array_equal(original[k], tuned[k]) for k in original)  # it trained
    # A different model's config refuses the converted parameters (nothing is trained or changed).
    assert _run(["moe_jax.convert", f"--from_hf={src}", "--workdir=w2"], tmp_path)[0] == 0
    code, _, err = _run(["moe_jax.main", f"--config={REPO}/configs/lm.py:smoke", "--workdir=w2"], tmp_path)
    assert code == 2 and "was written for another model" in err
