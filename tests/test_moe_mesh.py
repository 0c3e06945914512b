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
    ],
)
def test_sharded_layer_matches_single_device(mesh_shape, preset, dispatch):
    capacity_factor = None if dispatch == "grouped" else 1.25
    layer = MoeLayer(D, F, E, K, capacity_factor=capacity_factor, dispatch=dispatch, rngs=nnx.Rngs(0))
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
