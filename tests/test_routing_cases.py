"""Hand-made routing cases with exactly known answers, loss/metric formulas by hand, argument errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoeLayer, update_selection_bias
from moe_jax.moe import routing
from tests import moe_reference as ref

TOL = 1e-5


def expert_ffn(layer, e, x):
    """Expert e of the layer on rows x (float64)."""
    p = ref.layer_params(layer)
    gate = None if p["w_gate"] is None else x @ p["w_gate"][e]
    return ref.act_np(layer.activation, gate, x @ p["w_up"][e]) @ p["w_down"][e]


def set_router(layer, kernel):
    layer.router[...] = jnp.asarray(kernel, jnp.float32)


@pytest.mark.parametrize("dispatch", ["einsum", "indices", "grouped"])
def test_all_tokens_to_one_expert_with_capacity(dispatch):
    """Every token prefers expert 0; C = ceil(1·8·1.0/4) = 2 keeps exactly the first two positions."""
    layer = MoeLayer(
        4, 8, 4, 1, capacity_factor=1.0, normalize_gates=False, dispatch=dispatch, rngs=nnx.Rngs(0)
    )
    set_router(layer, np.eye(4, dtype=np.float32)[:, [0, 1, 2, 3]] * [5.0, 0.0, 0.0, 0.0])
    x = np.abs(np.asarray(jax.random.normal(jax.random.key(1), (1, 8, 4)))) + 0.1
    y, aux = layer(jnp.asarray(x))
    logits = x[0] @ ref.layer_params(layer)["router"]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = np.zeros((8, 4))
    expected[:2] = probs[:2, :1] * expert_ffn(layer, 0, x[0, :2])
    np.testing.assert_allclose(y[0], expected, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(aux["expert_load"], [1, 0, 0, 0])
    np.testing.assert_allclose(aux["dropped_fraction"], 6 / 8, rtol=TOL)
    np.testing.assert_allclose(aux["load_balancing_loss"], 4 * probs[:, 0].mean(), rtol=TOL)
    np.testing.assert_allclose(aux["max_load_ratio"], 4.0, rtol=TOL)


def test_capacity_one_keeps_first_token_per_expert():
    """Ties (zero router) send every token to expert 0 (lowest index); capacity 1 keeps token 0 only."""
    layer = MoeLayer(4, 8, 4, 1, capacity_factor=0.1, normalize_gates=False, rngs=nnx.Rngs(0))
    set_router(layer, np.zeros((4, 4)))
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 6, 4)))
    y, aux = layer(jnp.asarray(x))
    assert layer._capacity(6, 0.1) == 1
    for b in range(2):
        np.testing.assert_allclose(y[b, 0], 0.25 * expert_ffn(layer, 0, x[b, :1])[0], rtol=TOL, atol=TOL)
        np.testing.assert_allclose(y[b, 1:], 0.0, atol=TOL)
    np.testing.assert_allclose(aux["dropped_fraction"], 5 / 6, rtol=TOL)
    np.testing.assert_allclose(aux["router_entropy"], math.log(4), rtol=TOL)
    np.testing.assert_allclose(aux["router_z_loss"], math.log(4) ** 2, rtol=TOL)


def test_ties_with_top2_pick_lowest_indices_and_split_evenly():
    layer = MoeLayer(4, 8, 4, 2, rngs=nnx.Rngs(0))
    set_router(layer, np.zeros((4, 4)))
    x = np.asarray(jax.random.normal(jax.random.key(3), (1, 5, 4)))
    y, aux = layer(jnp.asarray(x))
    expected = 0.5 * expert_ffn(layer, 0, x[0]) + 0.5 * expert_ffn(layer, 1, x[0])
    np.testing.assert_allclose(y[0], expected, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(aux["expert_load"], [0.5, 0.5, 0, 0])


def test_single_expert_is_the_dense_ffn():
    layer = MoeLayer(8, 16, 1, 1, rngs=nnx.Rngs(4))
    x = np.asarray(jax.random.normal(jax.random.key(5), (2, 7, 8)))
    y, aux = layer(jnp.asarray(x))
    np.testing.assert_allclose(y.reshape(-1, 8), expert_ffn(layer, 0, x.reshape(-1, 8)), rtol=TOL, atol=TOL)
    logits = x.reshape(-1, 8) @ ref.layer_params(layer)["router"]
    np.testing.assert_allclose(aux["router_z_loss"], np.mean(logits[:, 0] ** 2), rtol=TOL)
    np.testing.assert_allclose(aux["load_balancing_loss"], 1.0, rtol=TOL)
    np.testing.assert_allclose(aux["router_entropy"], 0.0, atol=TOL)


@pytest.mark.parametrize("dispatch", ["einsum", "indices", "grouped"])
def test_top_k_equal_to_num_experts_is_the_softmax_mixture(dispatch):
    layer = MoeLayer(8, 16, 3, 3, dispatch=dispatch, rngs=nnx.Rngs(6))
    x = np.asarray(jax.random.normal(jax.random.key(7), (2, 5, 8)))
    y, _ = layer(jnp.asarray(x))
    rows = x.reshape(-1, 8)
    probs = ref._softmax(rows @ ref.layer_params(layer)["router"])
    expected = sum(probs[:, e : e + 1] * expert_ffn(layer, e, rows) for e in range(3))
    np.testing.assert_allclose(y.reshape(-1, 8), expected, rtol=TOL, atol=TOL)


def test_batch_prioritized_keeps_the_most_confident_tokens():
    """Position priority keeps tokens 0, 1; batch-prioritized keeps the two with the highest top-1 gate."""
    logits = np.array([[[0.1, 0.0], [0.2, 0.0], [3.0, 0.0], [2.0, 0.0]]], np.float32)
    kw = dict(top_k=1, capacity=2, normalize_gates=False)
    by_position = routing.route_token_choice(jnp.asarray(logits), **kw)
    by_gate = routing.route_token_choice(jnp.asarray(logits), batch_prioritized=True, **kw)
    np.testing.assert_array_equal(by_position.kept_GN[0], [True, True, False, False])
    np.testing.assert_array_equal(by_gate.kept_GN[0], [False, False, True, True])
    np.testing.assert_array_equal(by_gate.slot_GN[0], [3, 2, 0, 1])


def test_second_choices_come_after_all_first_choices():
    """Token 1's first choice beats token 0's second choice for the last slot of expert 1."""
    logits = np.log(np.array([[[0.6, 0.4, 0.0], [0.3, 0.7, 0.0]]], np.float32) + 1e-9)
    r = routing.route_token_choice(jnp.asarray(logits), top_k=2, capacity=1, normalize_gates=True)
    # Assignments token-major: (t0,k0)=e0, (t0,k1)=e1, (t1,k0)=e1, (t1,k1)=e0.
    np.testing.assert_array_equal(r.expert_GN[0], [0, 1, 1, 0])
    np.testing.assert_array_equal(r.kept_GN[0], [True, False, True, False])


def test_token_major_priority_keeps_earlier_tokens_second_choices():
    """The case above with position-first priority: token 0's second choice keeps expert 1's slot."""
    logits = np.log(np.array([[[0.6, 0.4, 0.0], [0.3, 0.7, 0.0]]], np.float32) + 1e-9)
    r = routing.route_token_choice(
        jnp.asarray(logits), top_k=2, capacity=1, normalize_gates=True, token_major_priority=True
    )
    np.testing.assert_array_equal(r.kept_GN[0], [True, True, False, False])


def test_expert_choice_hand_case():
    probs = np.array([[[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]]])
    r = routing.route_expert_choice(jnp.asarray(np.log(probs), jnp.float32), capacity=1, top_k=1)
    np.testing.assert_array_equal(r.token_GN[0], [2, 1])  # expert 0 takes token 2, expert 1 token 1
    np.testing.assert_allclose(r.weight_GN[0], [0.9, 0.6], rtol=TOL)
    np.testing.assert_allclose(r.aux["dropped_fraction"], 1 / 3, rtol=TOL)  # token 0 taken by none


def test_load_balancing_loss_by_hand():
    """Two tokens, two experts, K=1: f = (1/2, 1/2), P = mean probs; loss = 2·Σ f·P = 1."""
    logits = np.array([[[2.0, 0.0], [0.0, 1.0]]], np.float32)
    r = routing.route_token_choice(jnp.asarray(logits), top_k=1, capacity=None, normalize_gates=False)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
    np.testing.assert_allclose(
        r.aux["load_balancing_loss"], 2 * (0.5 * p[:, 0].mean() + 0.5 * p[:, 1].mean())
    )
    lse = np.log(np.exp(logits[0]).sum(-1))
    np.testing.assert_allclose(r.aux["router_z_loss"], np.mean(lse**2), rtol=TOL)


def test_update_selection_bias_rule():
    bias = jnp.array([0.0, 0.5, -0.5, 0.0])
    load = jnp.array([0.4, 0.1, 0.25, 0.25])
    np.testing.assert_allclose(update_selection_bias(bias, load, 0.01), [-0.01, 0.51, -0.5, 0.0])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=5), "top_k"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(router="hash"), "router"),
        (dict(dispatch="megablocks"), "dispatch"),
        (dict(activation="tanh"), "activation"),
        (dict(router="expert_choice", causal=True), "causal"),
        (dict(batch_prioritized=True, causal=True), "causal"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    args = dict(top_k=2) | kwargs
    with pytest.raises(ValueError, match=field):
        MoeLayer(8, 16, 4, args.pop("top_k"), rngs=nnx.Rngs(0), **args)


def test_expert_choice_in_causal_decoder_can_be_allowed():
    MoeLayer(8, 16, 4, 2, router="expert_choice", causal=True, allow_noncausal_routing=True, rngs=nnx.Rngs(0))


def test_wrong_input_width_is_a_clear_error():
    layer = MoeLayer(8, 16, 4, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(jnp.zeros((2, 3, 6)))
