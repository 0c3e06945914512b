"""fsdp on XLA:TPU: weights move as all-gathers, gradients as reduce-scatters where XLA:TPU emits them.

Compiled ahead of time with the flags of ``moe_jax.tpu_flags`` for a v5e 2x4 ring and a v5p 4x4x4 (64
chips, 1-D ``fsdp`` sharding over a 3-D torus, where XLA:TPU otherwise decomposes each all-gather into an
all-reduce, and lowers whole-torus reduce-scatters as all-reduces whatever the flags).
"""

import json

import jax
import jax.numpy as jnp
import pytest

from moe_jax import tpu_flags

_SMALL_LM = [
    "train.batch_size=64",
    "model.d_model=256",
    "model.d_ff=512",
    "model.moe.d_ff=256",
    "model.dtype='bfloat16'",
]


def test_flags_are_added_without_overriding_the_users():
    env = {"LIBTPU_INIT_ARGS": "--xla_tpu_prefer_async_allgather_to_allreduce=false --my_flag=1"}
    out = tpu_flags.apply(env)
    assert "--xla_tpu_prefer_async_allgather_to_allreduce=false" in out.split()
    assert "--xla_tpu_prefer_async_allgather_to_allreduce=true" not in out.split()
    assert "--my_flag=1" in out.split() and "--xla_enable_async_all_gather=true" in out.split()
    assert tpu_flags.apply(env) == out  # idempotent
    assert tpu_flags.apply({}).split() == list(tpu_flags.FLAGS)
    assert tpu_flags.apply({"MOE_JAX_TPU_FLAGS": "0"}) == ""


def _plan(tmp_path, extra, topology="v5p:4x4x4"):
    from experiments import compare_sharding

    out = tmp_path / "plan"
    rc = compare_sharding.main(
        ["--config=configs/lm.py:smoke", f"--topology={topology}", "--strategies=fsdp", f"--out={out}"]
        + [f"--set={s}" for s in _SMALL_LM + extra]
    )
    assert rc == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    return row


_SHARD_MAP_MOE = ["model.moe.expert_parallel='shard_map'", "model.moe.ep_transport='ragged'"]


def test_fsdp_step_on_a_ring_gathers_weights_and_reduce_scatters_gradients(tmp_path):
    """8 v5e chips (2x4): the weights move as all-gathers and their gradients as reduce-scatters, with the
    bytes of the analytic fsdp step (each bf16 weight gathered once for the forward and at most once more for
    the backward; each gradient reduce-scattered once)."""
    from experiments import compare_sharding

    row = _plan(tmp_path, _SHARD_MAP_MOE, topology="v5e:2x4")
    assert row["mesh"] == {"fsdp": 8} and row["fits"]
    weight_bytes = row["params"] * 2  # bf16 compute copies
    collectives = row["collectives"]
    gathered = collectives["all-gather"]["bytes"]
    assert weight_bytes <= gathered <= 2 * weight_bytes, (gathered, weight_bytes)
    # Gradients in the dtype each weight is used in: bf16, except the tied embedding table, looked up in
    # float32 and used again for the logits, whose gradient arrives as two float32 parts.
    config = compare_sharding.load_config("configs/lm.py:smoke", _SMALL_LM)
    assert config.model.tie_embeddings
    table = config.data.vocab_size * config.model.d_model
    gradient_bytes = weight_bytes - 2 * table + 2 * 4 * table
    scattered = collectives["reduce-scatter"]["bytes"] * 8  # result = one chip's shard
    assert 0.99 * gradient_bytes <= scattered <= 1.01 * gradient_bytes, (scattered, gradient_bytes)
    # Left as all-reduces: loss and routing statistics and the norm-scale gradients, under 1% of the weights.
    assert collectives.get("all-reduce", {"bytes": 0})["bytes"] < 0.01 * weight_bytes


def _psum_scatter_kinds(topology_name):
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moe_jax import hlo_stats, planner

    topology, _ = planner.load_topology(topology_name)
    mesh = jax.sharding.Mesh(np.array(topology.devices), ("fsdp",))
    scatter = jax.jit(
        jax.shard_map(
            lambda g: jax.lax.psum_scatter(g, "fsdp", scatter_dimension=0, tiled=True),
            mesh=mesh,
            in_specs=P(),
            out_specs=P("fsdp"),
        )
    )
    grads = jax.ShapeDtypeStruct((1024, 2048), jnp.float32, sharding=NamedSharding(mesh, P()))
    return set(hlo_stats.summary(scatter.lower(grads).compile().as_text()))


def test_xla_tpu_turns_a_whole_torus_reduce_scatter_into_an_all_reduce():
    """Why the 64-chip fsdp step below all-reduces its gradients: XLA:TPU lowers a reduce-scatter over every
    chip of a wrap-around torus (v5e 4x4 here, v5p 4x4x4 and 2x2x2 alike) as an all-reduce and a slice, even
    an explicit ``psum_scatter`` in ``shard_map``; over a ring without wrap-around (v5e 2x4) it stays a
    reduce-scatter. No sharding annotation of ours decides this, and none of libtpu's reduce-scatter flags
    changed it (tried: async fusion of reduce-scatters, the 3-D decomposer, 1-D shard padding). If this test
    fails, libtpu changed: re-plan the fsdp presets and update the README's fsdp paragraph."""
    assert _psum_scatter_kinds("v5e:2x4") == {"reduce-scatter"}
    assert _psum_scatter_kinds("v5e:4x4") == {"all-reduce"}


@pytest.mark.slow  # ~25 s: one 64-chip TPU compile
def test_fsdp_step_on_64_chips_all_gathers_its_weights(tmp_path):
    """Weights are all-gathered once forward and at most once more backward (without the flags: 0
    all-gathers, 102 all-reduces for this step); the dropless MoE layers run per chip inside shard_map (under
    GSPMD the grouped dispatch is replicated over the batch and its partial products all-reduced). The weight
    gradients are one combined all-reduce of the whole bf16 gradients: XLA:TPU's lowering of a whole-torus
    reduce-scatter (test above)."""
    row = _plan(tmp_path, _SHARD_MAP_MOE)
    assert row["mesh"] == {"fsdp": 64} and row["fits"]
    weight_bytes = row["params"] * 2
    collectives = row["collectives"]
    assert weight_bytes <= collectives["all-gather"]["bytes"] <= 2 * weight_bytes
    # Loss and routing statistics, norm-scale and router gradients, one combined weight-gradient all-reduce.
    assert collectives["all-reduce"]["count"] <= 8
    assert 0.99 * weight_bytes <= collectives["all-reduce"]["bytes"] <= 1.1 * weight_bytes
