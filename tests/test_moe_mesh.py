"""The MoE layer under a mesh (experts sharded over ``expert``) equals the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moe_jax import MoeLayer, sharding

TOL = 1e-5
B, L, D, F, E, K = 8, 8, 16, 32, 8, 2


def loss_and_grads(layer, x, r):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def f(params, x):
        def loss(params, x):
            y, aux = nnx.merge(graphdef, params, rest)(x)
            return jnp.sum(y * r) + aux["load_balancing_loss"], y

        (value, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return value, y, grads

    return params, f


@pytest.mark.parametrize(
    "mesh_shape, preset, dispatch",
    [
        ({"data": 2, "expert": 4}, "ep", "indices"),
        ({"expert": 8}, "ep", "einsum"),
        ({"data": 4, "expert": 2}, "ep", "grouped"),
        ({"data": 2, "fsdp": 2, "expert": 2}, "ep_fsdp", "indices"),
        ({"data": 2, "expert": 2, "tensor": 2}, "ep_tp", "einsum"),
        ({"data": 2, "expert": 4}, "ep", "shard_map"),
        ({"expert": 8}, "ep", "shard_map_dropless"),
        ({"data": 2, "fsdp": 2, "expert": 2}, "ep_fsdp", "shard_map"),
        ({"data": 2, "expert": 2, "tensor": 2}, "ep_tp", "shard_map"),
    ],
)
def test_sharded_layer_matches_single_device(mesh_shape, preset, dispatch):
    """Same loss, output and gradients as one device; the shard_map rows compare against GSPMD-free eager."""
    capacity_factor = None if dispatch in ("grouped", "shard_map_dropless") else 1.25
    layer = MoeLayer(
        D,
        F,
        E,
        K,
        capacity_factor=capacity_factor,
        rngs=nnx.Rngs(0),
        dispatch="auto" if dispatch.startswith("shard_map") else dispatch,
    )
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    r = jax.random.normal(jax.random.key(2), (B, L, D))
    params, f = loss_and_grads(layer, x, r)
    single = f(params, x)

    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.preset_rules(preset)
    params_sharded = sharding.shard_state(params, mesh, rules)
    w_spec = params_sharded["w_up"][...].sharding.spec
    assert w_spec[0] == "expert", w_spec
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert"))))
    if dispatch.startswith("shard_map"):
        layer.expert_parallel = "shard_map"
        params, f = loss_and_grads(layer, x, r)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        sharded = f(params_sharded, x_sharded)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL)


def test_mesh_errors_name_the_numbers():
    with pytest.raises(ValueError, match="multiplies to 6 but there are 8 devices"):
        sharding.make_mesh({"data": 2, "expert": 3})
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.make_mesh({"data": -1, "expert": -1})
    assert sharding.make_mesh({"data": -1, "expert": 2}).shape["data"] == 4
    with pytest.raises(ValueError, match="preset 'zero3' is unknown"):
        sharding.preset_rules("zero3")
    layer = MoeLayer(D, F, 6, 2, rngs=nnx.Rngs(0))
    params = nnx.state(layer, nnx.Param)
    with pytest.raises(ValueError, match="not divisible by mesh axis 'expert' of size 4"):
        sharding.state_shardings(params, sharding.make_mesh({"data": 2, "expert": 4}), sharding.PRESETS["ep"])


@pytest.mark.parametrize(
    "expert_parallel, dispatch", [("gspmd", "einsum"), ("gspmd", "indices"), ("shard_map", "auto")]
)
def test_ep_exchanges_tokens_with_all_to_all_and_gathers_nothing(expert_parallel, dispatch):
    """The silent fallback of other MoE codebases: all-gathering tokens or expert weights instead."""
    layer = MoeLayer(
        D, F, E, K, capacity_factor=1.25, dispatch=dispatch, expert_parallel=expert_parallel, rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    params, f = loss_and_grads(layer, x, x)
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    rules = sharding.preset_rules("ep")
    params = sharding.shard_state(params, mesh, rules)
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert"))))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        hlo = f.lower(params, x).compile().as_text()
    assert " all-to-all(" in hlo
    gathers = [line.strip()[:120] for line in hlo.splitlines() if " all-gather(" in line]
    assert not gathers, gathers


def test_shard_map_path_needs_a_mesh():
    layer = MoeLayer(D, F, E, K, expert_parallel="shard_map", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs a mesh"):
        layer(jnp.ones((2, 4, D)))


@pytest.mark.parametrize("expert_parallel", ["gspmd", "shard_map"])
def test_collective_bytes_equal_the_analytic_minimum(expert_parallel):
    """Per device and step: 3 all-to-alls of exactly one capacity buffer [E, G_local, C, D] (dispatch, return,
    and the return's cotangent; parameter gradients need no cotangent through the dispatch), and one
    data-parallel all-reduce of each parameter gradient slice held by the device. Nothing else."""
    from moe_jax import hlo_stats

    layer = MoeLayer(
        D,
        F,
        E,
        K,
        capacity_factor=1.25,
        dispatch="indices",
        expert_parallel=expert_parallel,
        rngs=nnx.Rngs(0),
    )
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    rules = sharding.preset_rules("ep")
    params = sharding.shard_state(params, mesh, rules)
    x = jax.device_put(jnp.ones((B, L, D)), NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert"))))

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y**2)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        table = hlo_stats.summary(jax.jit(jax.grad(loss)).lower(params, x).compile().as_text())
    capacity = -(-K * L * 5 // (4 * E))  # ceil(K·S·1.25/E), S = L: one group per sequence
    groups_per_device = B // 8
    buffer_bytes = E * groups_per_device * capacity * D * 4
    expert_grad_bytes = 3 * (E // 4) * D * F * 4  # w_gate, w_up, w_down slices of this device
    router_grad_bytes = D * E * 4
    assert set(table) == {"all-to-all", "all-reduce"}, table
    assert table["all-to-all"] == {"count": 3, "bytes": 3 * buffer_bytes}
    assert table["all-reduce"]["bytes"] == expert_grad_bytes + router_grad_bytes
