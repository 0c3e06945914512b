"""The sharding comparison tool runs on the 8 simulated devices and reports what each strategy sends."""

import json

import pytest

from experiments import compare_sharding


@pytest.mark.slow  # compiles the full train step twice (~40 s on 2 cores)
def test_compare_dp_and_ep_on_smoke_config(tmp_path):
    out = tmp_path / "cmp"
    rc = compare_sharding.main(
        ["--config=configs/translation.py:smoke", "--strategies=dp,ep", f"--out={out}", "--steps=1"]
    )
    assert rc == 0
    rows = {r["strategy"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert "all-to-all" in rows["ep"]["collectives"] and "all-to-all" not in rows["dp"]["collectives"]
    # Experts split four ways: the ep step holds fewer parameter bytes per device than replicated dp.
    assert rows["ep"]["param_bytes_per_device"] < rows["dp"]["param_bytes_per_device"]
    assert (out / "results.md").exists() and (out / "results.png").stat().st_size > 0


@pytest.mark.parametrize(
    "config",
    [
        "configs/lm.py:smoke",  # dropless grouped MoE under GSPMD, untied embeddings
        pytest.param("configs/translation.py:smoke", marks=pytest.mark.slow),  # capacity MoE, tied
    ],
)
def test_fsdp_presets_compile_without_involuntary_full_rematerialization(config, tmp_path, capfd):
    """GSPMD warns when a sharding constraint can only be met by replicating a tensor and slicing it again.
    The fsdp presets used to trigger it twice: the embedding lookup from a table sharded over ``embed`` (its
    gradient had to go from batch- to embed-sharded), and the GSPMD grouped expert matmuls with weights
    sharded over ``embed``. Both now gather those weights first, as fsdp gathers every other weight."""
    out = tmp_path / "cmp"
    argv = [f"--config={config}", "--strategies=fsdp,ep_fsdp", f"--out={out}", "--steps=1"]
    assert compare_sharding.main(argv) == 0
    captured = capfd.readouterr()  # file descriptors: the partitioner logs from C++ to fd 2
    assert "[2/2] ep_fsdp" in captured.out
    assert "Involuntary full rematerialization" not in captured.err


def test_unknown_strategy_is_exit_2(tmp_path, capsys):
    assert (
        compare_sharding.main(
            ["--config=configs/translation.py:smoke", "--strategies=zero3", f"--out={tmp_path}"]
        )
        == 2
    )
    assert "zero3" in capsys.readouterr().err


def test_set_overrides_and_mesh_parsing():
    c = compare_sharding.load_config(
        "configs/translation.py:smoke", ["train.batch_size=64", "model.dtype=bfloat16"]
    )
    assert c.train.batch_size == 64 and c.model.dtype == "bfloat16"
    assert compare_sharding.parse_mesh("ep:data=4,expert=-1") == ("ep", {"data": 4, "expert": -1})
    assert compare_sharding.config_name("configs/translation.py") == "translation:default"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        compare_sharding.load_config("configs/translation.py:smoke", ["train.batch_size"])
    with pytest.raises(ValueError, match="STRATEGY:AXIS=N"):
        compare_sharding.parse_mesh("ep=4")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config=configs/translation.py:large"], "only with --topology"),
        (["--set=train.no_such_field=1"], "no_such_field"),
        (["--mesh=ep:data=two"], "STRATEGY:AXIS=N"),
    ],
)
def test_bad_cpu_arguments_are_exit_2(extra, message, tmp_path, capsys):
    argv = ["--config=configs/translation.py:smoke", f"--out={tmp_path}", *extra]
    assert compare_sharding.main(argv) == 2
    assert message in capsys.readouterr().err
