"""The TPU pod planner: spec table, roofline arithmetic, ICI bytes, and a real AOT compile for a TPU topology.

The compile tests need libtpu (the ``test`` extra installs it on Linux x86-64). Without it they fail with the
install command rather than skip: a planner that silently does nothing is the bug they guard against.
"""

import json

import jax
import pytest

from experiments import compare_sharding
from moe_jax import planner, tpu_specs


def test_spec_table_is_complete_and_sourced():
    assert set(tpu_specs.SPECS) == {"v4", "v5e", "v5p", "v6e"}
    for name, spec in tpu_specs.SPECS.items():
        assert spec.name == name
        assert spec.source == f"https://docs.cloud.google.com/tpu/docs/{name}"
        # Orders of magnitude that catch a unit slip (TFLOP vs FLOP, GB vs GiB vs bytes, Gbps vs GBps).
        assert 1e14 < spec.peak_bf16_flops < 1e15
        assert 15e9 < spec.hbm_bytes < 110e9
        assert 5e11 < spec.hbm_bw < 3e12
        assert 3e11 <= spec.ici_bw_bidirectional < 2e12
        assert spec.ici_bw == spec.ici_bw_bidirectional / 2
    assert tpu_specs.spec_for("TPU v5 lite").name == "v5e"
    assert tpu_specs.spec_for("TPU v5").name == "v5p"
    assert tpu_specs.SPECS["v5p"].peak_bf16_flops == 459e12 and tpu_specs.SPECS["v5p"].hbm_bytes == 95 * 2**30
    with pytest.raises(KeyError, match="TPU v2.*knows v4"):
        tpu_specs.spec_for("TPU v2")


def test_roofline_and_mfu_on_a_hand_case():
    chip = tpu_specs.TpuSpec("toy", ("toy",), 100e12, 16e9, 1e12, 200e9, source="hand")
    # 1 TFLOP at 100 TFLOP/s = 10 ms; 5 GB at 1 TB/s = 5 ms; 0.5 GB received at 100 GB/s = 5 ms.
    r = tpu_specs.roofline(flops=1e12, hbm_bytes=5e9, ici_bytes=0.5e9, spec=chip)
    assert r["compute_s"] == pytest.approx(10e-3)
    assert r["memory_s"] == pytest.approx(5e-3)
    assert r["ici_s"] == pytest.approx(5e-3)
    assert r["step_s"] == pytest.approx(15e-3)  # max(10, 5) + 5: no overlap of collectives
    assert r["bound"] == "compute"
    assert tpu_specs.roofline(1e12, 20e9, 0, chip)["bound"] == "memory"
    # 0.75 TFLOP of model work in 15 ms on a 100 TFLOP/s chip: half its peak.
    assert tpu_specs.mfu(0.75e12, 15e-3, chip) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "line,received",
    [
        # XLA:TPU groups: 4 chips over 'axis_1'; bf16[4,32,64] = 16 KiB; all-gather receives 3/4 of it.
        (
            "%ag = bf16[4,32,64]{2,1,0:T(8,128)(2,1)} all-gather(%p), channel_id=5, "
            "replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=1] {'axis_1'}, dimensions={1}",
            16384 * 3 // 4,
        ),
        # all-to-all with device_ids between the mesh and the axes; 2 chips per group: half of 8 KiB.
        (
            "%a2a = f32[2,1,1024]{2,1,0} all-to-all(%x), channel_id=2, "
            "replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_0'}, dimensions={0}",
            4096,
        ),
        # Explicit groups of 2: all-reduce moves 2 (n-1)/n of its 4 KiB result.
        ("%ar = f32[1024]{0} all-reduce(%g), replica_groups={{0,1},{2,3}}, to_apply=%add", 4096),
        # Iota groups [2,4]: 4 per group; reduce-scatter receives (n-1) shards of its 1 KiB result.
        ("%rs = f32[256]{0} reduce-scatter(%g), replica_groups=[2,4]<=[8], dimensions={0}", 3 * 1024),
        # Async permute: (operand, result, u32 contexts); one 128-byte buffer arrives.
        (
            "%cp = (f32[8,4]{0,1}, f32[8,4]{0,1}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%b), "
            "source_target_pairs={{0,1},{1,0}}",
            128,
        ),
        ("%add = f32[8]{0} add(%a, %b)", 0),
    ],
)
def test_ici_bytes_per_collective(line, received):
    assert planner.collective_ici_bytes(line, num_devices=8) == received


def test_default_pod_meshes_fit_the_model():
    xl = compare_sharding.load_config("configs/translation.py:xl")
    assert planner.default_pod_mesh("ep", xl, 64) == {"data": 1, "expert": 64}
    assert planner.default_pod_mesh("ep_tp", xl, 64) == {"data": 1, "expert": 16, "tensor": 4}
    assert planner.default_pod_mesh("ep_fsdp", xl, 64) == {"fsdp": 2, "expert": 32}  # not ep again
    large = compare_sharding.load_config("configs/translation.py:large")  # 32 experts
    assert planner.default_pod_mesh("ep_fsdp", large, 256) == {"fsdp": 8, "expert": 32}
    assert planner.default_pod_mesh("dp", large, 256) == {"data": 256}


def test_xl_is_a_26b_moe_with_1_7b_active():
    """The plan-only variant: counted from its abstract parameters, never materialised."""
    from flax import nnx

    c = compare_sharding.load_config("configs/translation.py:xl")
    model = nnx.eval_shape(lambda: planner.build_model(c, c.data.vocab_size))
    flops = planner.model_flops(c, nnx.state(model, nnx.Param))
    assert flops["params"] == pytest.approx(26.64e9, rel=1e-3)
    assert flops["active_params"] == pytest.approx(1.677e9, rel=1e-3)
    # 6 · active · tokens dominates: 6 × 1.68e9 × 512 × 256 ≈ 1.3 PFLOP per step.
    assert 1.2e15 < flops["total"] < 1.5e15


def test_missing_libtpu_prints_the_install_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(planner, "_libtpu_path", lambda: None)
    rc = compare_sharding.main(
        ["--config=configs/translation.py:smoke", "--topology=v5e:2x2", f"--out={tmp_path}"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f'pip install "jax[tpu]=={jax.__version__}"' in err


def test_mesh_that_does_not_divide_the_chips_names_the_numbers(capsys, tmp_path):
    rc = compare_sharding.main(
        [
            "--config=configs/translation.py:smoke",
            "--topology=v5e:2x2",
            "--strategies=ep",
            "--mesh=ep:data=3,expert=-1",
            f"--out={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "ep on v5e:2x2 (4 chips)" in err and "multiply to 3" in err and "4 devices" in err


def test_unknown_topology_is_one_line(capsys, tmp_path):
    rc = compare_sharding.main(
        ["--config=configs/translation.py:smoke", "--topology=v9z:2x2", f"--out={tmp_path}"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "v9z:2x2" in err and "v5p:4x4x4" in err


@pytest.mark.slow
def test_ep_plan_on_a_v5e_2x2_compiles_the_real_step(tmp_path):
    """~10 s: the smoke model's train step compiled by XLA:TPU for 4 v5e chips from this CPU host."""
    out = tmp_path / "plan"
    rc = compare_sharding.main(
        [
            "--config=configs/translation.py:smoke",
            "--topology=v5e:2x2",
            "--strategies=ep",
            f"--out={out}",
        ]
    )
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert result["setup"]["chips"] == 4 and result["setup"]["spec"]["name"] == "v5e"
    (row,) = result["rows"]
    assert row["mesh"] == {"expert": 4}
    assert "all-to-all" in row["collectives"]  # tokens travel to their experts, weights stay put
    assert "all-gather" not in row["collectives"]
    assert row["peak_bytes_per_chip"] > row["state_bytes_per_chip"] > 0 and row["fits"]
    assert row["flops_per_chip"] > row["model_flops_per_chip"] > 0  # capacity padding, router, optimizer
    assert row["hbm_bytes_accessed_per_chip"] > 0 and row["ici_bytes_per_chip"] > 0
    assert row["step_s"] == pytest.approx(max(row["compute_s"], row["memory_s"]) + row["ici_s"])
    assert 0 < row["mfu"] < 1
    assert "| translation:smoke | ep | expert4 |" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0


@pytest.mark.slow  # five TPU compiles (~1 min on 2 cores)
def test_every_strategy_plans_on_a_v5p_2x2x1(tmp_path):
    out = tmp_path / "plan"
    rc = compare_sharding.main(
        ["--config=configs/translation.py:smoke", "--topology=v5p:2x2x1", f"--out={out}"]
    )
    assert rc == 0
    rows = {r["strategy"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"dp", "fsdp", "ep", "ep_fsdp", "ep_tp"}
    a2a = {s: r["collectives"].get("all-to-all", {"bytes": 0})["bytes"] for s, r in rows.items()}
    # XLA:TPU uses a few small all-to-alls even in dp (resharding the routing buffers); ep sends tokens.
    assert a2a["ep"] > 2 * a2a["dp"]
    # Sharded state: experts split over chips hold less per chip than the replicated dp state.
    assert rows["fsdp"]["state_bytes_per_chip"] < rows["ep"]["state_bytes_per_chip"]
    assert rows["ep"]["state_bytes_per_chip"] < rows["dp"]["state_bytes_per_chip"]
    assert all(r["fits"] and r["step_s"] > 0 for r in rows.values())


def test_lm_model_flops_count_mixtral_and_do_not_depend_on_scanning():
    """The decoder LM's FLOPs: Mixtral 8x7B's 46.7 B parameters, 12.9 B active, the same scanned or not."""
    from flax import nnx

    counts = {}
    for scanned in (False, True):
        c = compare_sharding.load_config("configs/lm.py:mixtral_8x7b", [f"model.scan_layers={scanned}"])
        model = nnx.eval_shape(lambda c=c: planner.build_model(c, c.data.vocab_size))
        counts[scanned] = planner.model_flops(c, nnx.state(model, nnx.Param))
    assert counts[False] == counts[True]
    flops = counts[True]
    assert flops["params"] == pytest.approx(46.70e9, rel=2e-3)
    assert flops["active_params"] == pytest.approx(12.88e9, rel=2e-3)
    # 6 · (active weights but the untied embedding lookup) · tokens, plus attention scores (~11%).
    tokens = 256 * 4096
    matmul_params = flops["active_params"] - 32_000 * 4096
    attention = 3 * 4 * 256 * 4096**2 * 32 * 128 * 32
    assert flops["total"] == pytest.approx(6 * matmul_params * tokens + attention, rel=1e-6)


def test_lm_batch_layout_is_the_train_step_batch():
    c = compare_sharding.load_config("configs/lm.py:smoke")
    batch = planner.random_batch(c, __import__("numpy").random.default_rng(0))
    assert (
        sorted(batch)
        == sorted(planner.batch_layout(c))
        == sorted(["inputs", "targets", "segment_ids", "positions", "token_weight"])
    )
    assert all(v.shape == (8, 32) for v in batch.values())
    with pytest.raises(ValueError, match="config.task='image_classification'"):
        planner.check_task(compare_sharding.load_config("configs/image_classification.py:smoke"))


@pytest.mark.slow  # two TPU compiles of the LM step (~30 s on 2 cores)
def test_scanned_dropless_lm_plans_and_megablox_compiles_for_tpu(tmp_path):
    """The LM's dropless train step with scanned layers compiles for a TPU pod; on one chip the megablox
    grouped matmuls are real Mosaic kernels in the program (not Pallas interpreter loops), and over several
    chips GSPMD cannot split them, which the plan says in its row instead of crashing."""
    out = tmp_path / "plan"
    rc = compare_sharding.main(
        [
            "--config=configs/lm.py:smoke",
            "--topology=v5e:2x2",
            "--strategies=ep",
            "--set=model.scan_layers=True",
            "--set=model.moe.layers=(0,1)",
            f"--out={out}",
        ]
    )
    assert rc == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["fits"] and row["mesh"] == {"expert": 4} and row["tpu_kernels"] == 0
    assert "| lm:smoke | ep | expert4 |" in (out / "results.md").read_text()

    megablox = ["model.moe.grouped_backend='megablox'", "model.dtype='bfloat16'", "model.scan_layers=True"]
    c = compare_sharding.load_config("configs/lm.py:smoke", megablox + ["model.moe.layers=(0,1)"])
    topology, spec = planner.load_topology("v5e:2x2")
    # conftest asks for "highest" matmul precision, which Mosaic refuses for bf16 operands ("Bad lhs type").
    with jax.default_matmul_precision("default"):
        one = planner.plan_strategy(c, "dp", {"data": 1}, topology, spec, devices=topology.devices[:1])
    assert one["fits"] and one["chips"] == 1
    assert one["tpu_kernels"] >= 4  # gate-up and down grouped matmuls, forward and backward
    with pytest.raises(ValueError, match="megablox kernels .* cannot be partitioned by GSPMD"):
        planner.plan_strategy(c, "ep", {"expert": 4}, topology, spec)


def test_scanned_rows_floor_compute_at_the_model_flops():
    """XLA counts a while body once: a scanned plan's compute term uses the model FLOPs when larger."""
    chip = tpu_specs.TpuSpec("toy", ("toy",), 100e12, 16e9, 1e12, 200e9, source="hand")
    row = {"flops_per_chip": 1e12, "model_flops_per_chip": 4e12, "hbm_bytes_accessed_per_chip": 1e9}
    row["ici_bytes_per_chip"] = 0.0
    unrolled = planner.scanned_floor({**row, "loop_body_counted_once": False}, chip)
    scanned = planner.scanned_floor({**row, "loop_body_counted_once": True}, chip)
    assert unrolled["compute_s"] == pytest.approx(10e-3) and scanned["compute_s"] == pytest.approx(40e-3)
    assert scanned["mfu"] == pytest.approx(1.0)  # model FLOPs over a compute-bound step at peak
