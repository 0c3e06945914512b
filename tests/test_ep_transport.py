"""The shard_map transports (capacity, ring, ragged) on 8 simulated devices equal one device, and move the
bytes they should.

XLA:CPU has no ragged-all-to-all: on CPU the ``ragged`` transport runs through its exact emulation (the sizes,
offsets and permutations are the real code; the collective is an all-gather); the real collective is compiled
for a TPU topology below.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moe_jax import MoeLayer, hlo_stats, sharding

TOL = 1e-5
B, L, D, F, E, K = 8, 8, 16, 32, 8, 2

MESHES = [
    ({"data": 2, "expert": 4}, "ep"),
    ({"expert": 8}, "ep"),
    ({"data": 2, "fsdp": 2, "expert": 2}, "ep_fsdp"),
    ({"data": 2, "expert": 2, "tensor": 2}, "ep_tp"),
]


def _layer(transport, **kwargs):
    kwargs.setdefault("capacity_factor", None)
    return MoeLayer(
        D,
        F,
        E,
        K,
        rngs=nnx.Rngs(0),
        expert_parallel="gspmd" if transport is None else "shard_map",
        ep_transport=transport or "capacity",
        **kwargs,
    )


def _loss_fn(layer, r):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def f(params, x):
        def loss(params, x):
            y, aux = nnx.merge(graphdef, params, rest)(x)
            return jnp.sum(y * r) + aux["load_balancing_loss"] + aux["router_z_loss"], (y, aux)

        (value, (y, aux)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return value, y, aux, grads

    return params, f


def _inputs():
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    r = jax.random.normal(jax.random.key(2), (B, L, D))
    return x, r


def _sharded_run(transport, mesh_shape, preset, **kwargs):
    x, r = _inputs()
    params, f = _loss_fn(_layer(transport, **kwargs), r)
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.preset_rules(preset)
    params = sharding.shard_state(params, mesh, rules)
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert"))))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return f(params, x)


def _single_run(**kwargs):
    x, r = _inputs()
    params, f = _loss_fn(_layer(None, **kwargs), r)
    return f(params, x)


def _assert_same(got, want):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for a, b in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("transport", ["ring", "ragged"])
@pytest.mark.parametrize("mesh_shape, preset", MESHES)
def test_dropless_transport_equals_one_device(transport, mesh_shape, preset):
    """Loss, outputs, every aux metric and the gradients of parameters and input, 1e-5."""
    _assert_same(_sharded_run(transport, mesh_shape, preset), _single_run())


@pytest.mark.parametrize("transport", ["capacity", "ring", "ragged"])
@pytest.mark.parametrize(
    "routing",
    [
        {"capacity_factor": 1.0},  # drops: the same ones as on one device
        {"router": "expert_choice", "capacity_factor": 1.0},
        pytest.param(
            {"score_fn": "sigmoid", "routed_scaling_factor": 2.5, "num_shared_experts": 1},
            marks=pytest.mark.slow,
        ),
    ],
    ids=["capacity_drops", "expert_choice", "sigmoid_shared"],
)
def test_transport_is_exact_for_every_routing(transport, routing):
    _assert_same(_sharded_run(transport, {"data": 2, "expert": 4}, "ep", **routing), _single_run(**routing))


@pytest.mark.slow  # ~20 s: the core backend (the CPU default) is in every other test
@pytest.mark.parametrize("transport", ["ring", "ragged"])
def test_ladder_and_xla_grouped_backends_inside_the_transport(transport):
    for backend in ("ladder", "xla"):
        got = _sharded_run(transport, {"expert": 8}, "ep", grouped_backend=backend)
        _assert_same(got, _single_run(grouped_backend=backend))


def test_transport_refused_without_shard_map():
    with pytest.raises(ValueError, match="ep_transport='ring' is a shard_map transport"):
        MoeLayer(D, F, E, K, rngs=nnx.Rngs(0), ep_transport="ring")
    with pytest.raises(ValueError, match="ep_transport='pipe' is unknown"):
        MoeLayer(D, F, E, K, rngs=nnx.Rngs(0), expert_parallel="shard_map", ep_transport="pipe")


def _collectives(transport, mesh_shape, **kwargs):
    layer = _layer(transport, **kwargs)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.preset_rules("ep")
    params = sharding.shard_state(params, mesh, rules)
    x = jax.device_put(jnp.ones((B, L, D)), NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert"))))

    def forward(params, x):
        return nnx.merge(graphdef, params, rest)(x)[0]

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return hlo_stats.summary(jax.jit(forward).lower(params, x).compile().as_text())


def test_forward_bytes_of_each_transport_equal_the_analytic_figure():
    """One dropless forward layer on ``expert: 8`` (n = 8 shards, one sequence of S = 8 tokens each, f32).

    capacity (C = S): two all-to-alls of an [E, C, D] buffer: E/K = 4 times the K·S·D the tokens need.
    ring: the tokens all-gathered (n·S·D), with each token's K expert ids, slots and gates (int32/f32; the
    kept mask of a dropless routing is a constant), and the float32 outputs reduce-scattered to S·D.
    ragged on CPU: the emulation's all-gathers; the real collective is checked in the TPU test below.
    """
    n, S = 8, L
    capacity = _collectives("capacity", {"expert": n})
    assert set(capacity) == {"all-to-all"}
    assert capacity["all-to-all"] == {"count": 2, "bytes": 2 * E * S * D * 4}
    ring = _collectives("ring", {"expert": n})
    assert set(ring) == {"all-gather", "reduce-scatter"}
    assert ring["reduce-scatter"] == {"count": 1, "bytes": S * D * 4}
    tokens, routing = n * S * D * 4, 3 * n * S * K * 4
    assert ring["all-gather"]["bytes"] == tokens + routing
    ragged = _collectives("ragged", {"expert": n})
    assert "all-to-all" not in ragged and "ragged-all-to-all" not in ragged  # emulated: all-gathers


@pytest.mark.parametrize("transport", ["ring", "ragged"])
def test_megablox_kernels_run_inside_the_transport(transport):
    """The Pallas kernels (interpret mode on CPU) inside shard_map: what makes megablox run multi-chip."""
    got = _sharded_run(transport, {"data": 2, "expert": 4}, "ep", grouped_backend="megablox")
    _assert_same(got, _single_run(grouped_backend="core"))


@pytest.mark.parametrize("transport", ["ragged", "ring"])
def test_lm_step_with_megablox_compiles_for_four_tpu_chips(transport):
    """~6 s each: the dropless LM train step (scanned, bf16, megablox) compiled by XLA:TPU for v5e:2x2 with
    ``expert: 4``. Inside shard_map the Mosaic kernels run over several chips (GSPMD refuses to split them),
    and the ragged step holds the real ragged-all-to-all (XLA:CPU cannot run it)."""
    from experiments import compare_sharding
    from moe_jax import planner

    sets = [
        "model.moe.grouped_backend='megablox'",
        "model.dtype='bfloat16'",
        "model.scan_layers=True",
        "model.moe.layers=(0,1)",
        "model.moe.expert_parallel='shard_map'",
        f"model.moe.ep_transport='{transport}'",
    ]
    config = compare_sharding.load_config("configs/lm.py:smoke", sets)
    topology, spec = planner.load_topology("v5e:2x2")
    # conftest asks for "highest" matmul precision, which Mosaic refuses for bf16 operands ("Bad lhs type").
    with jax.default_matmul_precision("default"):
        row = planner.plan_strategy(config, "ep", {"expert": 4}, topology, spec)
    assert row["fits"] and row["chips"] == 4
    assert row["tpu_kernels"] >= 4  # gate-up and down grouped matmuls, forward and backward
    kinds = set(row["collectives"])
    if transport == "ragged":
        # Forward and return exchange, and both again in the backward pass, for the scanned MoE unit.
        assert row["collectives"]["ragged-all-to-all"]["count"] >= 4
        assert "all-gather" not in kinds and "reduce-scatter" not in kinds
    else:
        assert {"all-gather", "reduce-scatter"} <= kinds and "ragged-all-to-all" not in kinds


@pytest.mark.parametrize("transport", ["ring", pytest.param("ragged", marks=pytest.mark.slow)])
def test_lm_trainer_steps_on_a_mesh_equal_one_device(transport):
    """Two trainer steps of a scanned decoder LM (dropout, router jitter, selection-bias updates) on
    data 2 × expert 4 with the transport: the same losses and weights as one device with GSPMD, 1e-5."""
    import dataclasses
    import functools

    from moe_jax.models.transformer import DecoderLM
    from moe_jax.tasks.lm import lm_loss_sums
    from tests.test_scan_layers import _assert_same_model, _lm_batch, _lm_config, _two_sgd_steps

    batch = _lm_batch(B=8)
    loss_sums = functools.partial(lm_loss_sums)
    want_model, want_losses = _two_sgd_steps(
        DecoderLM(_lm_config(scan_layers=True), rngs=nnx.Rngs(params=0)), batch, loss_sums
    )
    moe = dataclasses.replace(_lm_config().moe, expert_parallel="shard_map", ep_transport=transport)
    model = DecoderLM(_lm_config(scan_layers=True, moe=moe), rngs=nnx.Rngs(params=0))
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    rules = sharding.preset_rules("ep")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
        batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert"))))
        got_model, got_losses = _two_sgd_steps(model, batch, loss_sums)
    for got, want in zip(got_losses, want_losses):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(
                np.asarray(got[key]), np.asarray(want[key]), atol=TOL, rtol=TOL, err_msg=key
            )
    _assert_same_model(got_model, want_model, atol=TOL)


def test_a_run_resumes_with_another_transport_and_older_checkpoints_still_match():
    """How experts exchange tokens is not part of what a checkpoint is: a run may resume on another mesh or
    transport, and checkpoints written before ``ep_transport`` existed still match today's config."""
    from moe_jax.train.checkpoint import identity_differences

    old = {"model": {"d_model": 32, "moe": {"num_experts": 8, "expert_parallel": "gspmd"}}}
    new = {
        "model": {
            "d_model": 32,
            "moe": {"num_experts": 8, "expert_parallel": "shard_map", "ep_transport": "ragged"},
        }
    }
    assert identity_differences(old, new) == []
    bigger = {"model": {"d_model": 32, "moe": {"num_experts": 16, "ep_transport": "ring"}}}
    assert identity_differences(old, bigger) == ["model.moe.num_experts: 8 in the checkpoint vs 16 now"]
