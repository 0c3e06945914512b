"""Counting collectives in XLA:TPU's optimized HLO: reduce-scatter fusions and multi-step async collectives.

The texts below have the structure XLA:TPU (libtpu 0.0.42) writes for an fsdp train step, cut to the lines
that matter; the compile tests in ``test_fsdp_collectives.py`` check the same counting on real programs.
"""

from moe_jax import hlo_stats, planner

# A reduce-scatter as XLA:TPU writes it: a kCustom fusion whose computation all-reduces the whole operand
# and slices this chip's shard (f32[1024,2048] -> f32[256,2048] over 4 chips).
_GROUPS = "replica_groups={{0,1,2,3}}, use_global_device_ids=true"
_REDUCE_SCATTER_FUSION = f"""\
%all-reduce-scatter (input: f32[1024,2048]) -> f32[256,2048] {{
  %input = f32[1024,2048]{{1,0:T(8,128)}} parameter(0)
  %all-reduce.2 = f32[1024,2048]{{1,0}} all-reduce(%input), channel_id=4, {_GROUPS}, to_apply=%add.1
  %multiply.2 = s32[]{{:T(128)}} multiply(%pid, %c)
  ROOT %dynamic-slice.3 = f32[256,2048]{{1,0}} dynamic-slice(%all-reduce.2, %multiply.2, %constant.17)
}}

ENTRY %main.0_spmd (param: f32[256,2048], param.1: f32[64,1024]) -> f32[256,2048] {{
  %all-reduce.7 = f32[256]{{0:T(256)}} all-reduce(%norm_grad), channel_id=5, {_GROUPS}, to_apply=%add
  %fusion = f32[256,2048]{{1,0:T(8,128)}} fusion(%fusion.1), kind=kCustom, calls=%all-reduce-scatter
}}
"""


def _all_gather(name, operand, channel, chain):
    return (
        f"  %{name} = bf16[256,1,128]{{2,0,1}} all-gather(%{operand}), channel_id={channel}, "
        f"replica_groups=mesh['axis_0'=8,'axis_1'=1] {{'axis_0'}}, dimensions={{0}}, "
        f'frontend_attributes={{chain_id="{chain}"}}'
    )


# One all-gather spread over three async collective fusions (same channel_id and chain_id), and a second,
# separate all-gather of the same shape (its own channel).
_MULTI_STEP_ALL_GATHER = "\n".join(
    [
        line
        for i, name in enumerate(["fused_computation"] + ["async_collective_fusion"] * 2, 1)
        for line in (
            f"%{name}.{i} (param_0.{i}: bf16[32,1,128]) -> (bf16[8,32,128], bf16[256,1,128]) {{",
            _all_gather(f"all-gather.{i}", f"param_0.{i}", 106, 22),
            "}",
        )
    ]
    + ["ENTRY %main (p: bf16[32,1,128]) -> bf16[256,1,128] {", _all_gather("all-gather.4", "p", 107, 23), "}"]
)


def test_a_reduce_scatter_fusion_counts_as_one_reduce_scatter_of_its_output():
    table = hlo_stats.summary(_REDUCE_SCATTER_FUSION)
    assert table == {
        "reduce-scatter": {"count": 1, "bytes": 256 * 2048 * 4},
        "all-reduce": {"count": 1, "bytes": 256 * 4},  # the ENTRY all-reduce is a real one
    }
    received = planner.ici_bytes_by_kind(_REDUCE_SCATTER_FUSION, num_devices=4)
    # Reduce-scatter: each chip receives the (n - 1) other chips' partial sums of its shard.
    assert received["reduce-scatter"] == 3 * 256 * 2048 * 4
    assert received["all-reduce"] == 2 * 3 * 256 * 4 // 4


def test_the_steps_of_one_async_collective_count_once():
    (first, second) = hlo_stats.collectives(_MULTI_STEP_ALL_GATHER)
    assert first.kind == second.kind == "all-gather"
    assert first.result_bytes == second.result_bytes == 256 * 128 * 2
    assert "channel_id=106" in first.line and "channel_id=107" in second.line
    assert planner.ici_bytes(_MULTI_STEP_ALL_GATHER, num_devices=8) == 2 * (256 * 128 * 2) * 7 // 8


def test_collectives_without_a_chain_are_all_counted():
    # The same channel id on ops without chain ids (XLA reuses ids across fusion clones): each counts.
    text = "\n".join(
        f"  %rs.{i} = bf16[4,64,256]{{1,2,0}} reduce-scatter(%g{i}), channel_id=1, "
        "replica_groups={{0,1,2,3}}, dimensions={1}, to_apply=%add"
        for i in range(3)
    )
    assert hlo_stats.summary(text) == {"reduce-scatter": {"count": 3, "bytes": 3 * 4 * 64 * 256 * 2}}
