"""MoeLayer against the float64 dense reference: every router x dispatcher x capacity mode.

Tolerances (written once, never loosened): f32 outputs 1e-5, f32 gradients 1e-4 (composites), bf16 1e-2
relative (norm of the error over norm of the reference).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoeLayer
from tests import moe_reference as ref

F32_FWD_TOL = 1e-5
F32_GRAD_TOL = 1e-4
BF16_REL_TOL = 1e-2

B, L, D, F, E, K = 2, 16, 16, 32, 4, 2

ROUTERS = {
    "token_choice": dict(router="token_choice"),
    "batch_prioritized": dict(router="token_choice", batch_prioritized=True),
    "expert_choice": dict(router="expert_choice"),
}


def make_inputs(seed=0, shape=(B, L, D)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def ref_capacity(layer, S, capacity_factor):
    """Independent capacity formula: C = ceil(K·S·cf/E); expert choice treats None as 1.0."""
    if capacity_factor is None:
        if layer.router_type == "token_choice":
            return None
        capacity_factor = 1.0
    return max(1, math.ceil(layer.top_k * S * capacity_factor / layer.num_experts))


def run_reference(layer, x, *, mask=None, capacity_factor="layer"):
    cf = layer.capacity_factor if capacity_factor == "layer" else capacity_factor
    S = x.shape[1] if layer.group_size is None else layer.group_size
    return ref.reference_forward(
        np.asarray(x),
        ref.layer_params(layer),
        activation=layer.activation,
        group_size=layer.group_size,
        mask_BL=None if mask is None else np.asarray(mask),
        router=layer.router_type,
        top_k=layer.top_k,
        capacity=ref_capacity(layer, S, cf),
        normalize_gates=layer.normalize_gates,
        batch_prioritized=layer.batch_prioritized,
        token_major=layer.causal and not layer.batch_prioritized,
    )


def assert_close(actual, expected, tol, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol, err_msg=what)


def check_aux(aux, metrics):
    for name in (
        "load_balancing_loss",
        "router_z_loss",
        "dropped_fraction",
        "router_entropy",
        "max_load_ratio",
        "expert_load",
    ):
        assert_close(aux[name], metrics[name], F32_FWD_TOL, name)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("dispatch", ["einsum", "indices", "grouped"])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_forward_and_gradients_match_reference(router, dispatch, capacity_factor):
    # "grouped" runs the default backend here: the core + overflow layout on CPU.
    layer = MoeLayer(
        D, F, E, K, capacity_factor=capacity_factor, dispatch=dispatch, rngs=nnx.Rngs(0), **ROUTERS[router]
    )
    check_layer_against_reference(layer, capacity_factor, router)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("backend", ["ladder", pytest.param("xla", marks=pytest.mark.slow)])
def test_other_grouped_backends_match_reference(backend, capacity_factor):
    layer = MoeLayer(
        D,
        F,
        E,
        K,
        capacity_factor=capacity_factor,
        dispatch="grouped",
        grouped_backend=backend,
        rngs=nnx.Rngs(0),
    )
    check_layer_against_reference(layer, capacity_factor, "token_choice")


@pytest.mark.parametrize("dispatch", ["einsum", "indices", "grouped"])
def test_causal_layer_fills_capacity_token_by_token(dispatch):
    """causal=True: capacity in position order (all K choices of a token first), against the reference."""
    layer = MoeLayer(D, F, E, K, capacity_factor=1.0, dispatch=dispatch, causal=True, rngs=nnx.Rngs(0))
    check_layer_against_reference(layer, 1.0, "token_choice")


def test_causal_layer_output_does_not_depend_on_later_tokens():
    """Changing tokens after position t leaves outputs up to t unchanged (k-major priority would not)."""
    kw = dict(capacity_factor=0.75, rngs=nnx.Rngs(0))
    x = make_inputs(3)
    x_changed = x.at[:, L // 2 :].set(make_inputs(4)[:, L // 2 :])
    causal = MoeLayer(D, F, E, K, causal=True, **kw)
    y, y_changed = causal(x)[0], causal(x_changed)[0]
    np.testing.assert_array_equal(y[:, : L // 2], y_changed[:, : L // 2])
    # The same inputs leak the future through the k-major order of a non-causal layer: the test has teeth.
    acausal = MoeLayer(D, F, E, K, **kw)
    assert np.any(np.asarray(acausal(x)[0][:, : L // 2] != acausal(x_changed)[0][:, : L // 2]))


def check_layer_against_reference(layer, capacity_factor, router):
    x = make_inputs(1)
    y, aux = layer(x)
    y_ref, metrics, combine = run_reference(layer, x)
    assert_close(y, y_ref, F32_FWD_TOL, "output")
    check_aux(aux, metrics)
    if capacity_factor is not None and router != "expert_choice":
        assert metrics["dropped_fraction"] > 0, "the capacity case must actually drop assignments"

    # Gradients of a random projection of the output w.r.t. x and every parameter.
    r = make_inputs(2)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * r)

    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    with jax.enable_x64(True):
        p64 = {k: (None if v is None else jnp.asarray(v)) for k, v in ref.layer_params(layer).items()}
        p64["selected_all"] = jnp.asarray(metrics["_selected"].reshape(-1, E))

        def ref_loss(p, xx):
            y = ref.dense_jax_forward(
                p,
                xx,
                combine,
                activation=layer.activation,
                normalize_gates=layer.normalize_gates,
                router=layer.router_type,
            )
            return jnp.sum(y * jnp.asarray(np.asarray(r), jnp.float64))

        wrt = {k: p64[k] for k in ("router", "w_gate", "w_up", "w_down")}
        g_ref = jax.grad(lambda w, xx: ref_loss(p64 | w, xx), argnums=(0, 1))(
            wrt, jnp.asarray(np.asarray(x), jnp.float64)
        )
        g_ref = jax.tree.map(np.asarray, g_ref)
    assert_close(g_x, g_ref[1], F32_GRAD_TOL, "d/dx")
    for name in ("router", "w_gate", "w_up", "w_down"):
        assert_close(g_params[name][...], g_ref[0][name], F32_GRAD_TOL, f"d/d{name}")


@pytest.mark.parametrize("activation", ["gelu", "geglu", "relu"])
def test_activations_match_reference(activation):
    layer = MoeLayer(D, F, E, K, activation=activation, rngs=nnx.Rngs(3))
    assert (layer.w_gate is None) == (activation in ("gelu", "relu"))
    x = make_inputs(4)
    y, _ = layer(x)
    assert_close(y, run_reference(layer, x)[0], F32_FWD_TOL)


@pytest.mark.parametrize("dispatch", ["einsum", "indices", "grouped"])
def test_padding_mask_group_size_shared_experts(dispatch):
    """Padding is never routed, capacity per explicit group, shared experts added: all at once."""
    layer = MoeLayer(
        D,
        F,
        E,
        K,
        capacity_factor=1.25,
        group_size=8,
        num_shared_experts=2,
        shared_d_ff=8,
        dispatch=dispatch,
        rngs=nnx.Rngs(5),
    )
    x = make_inputs(6)
    mask = jnp.arange(L)[None, :] < jnp.array([[12], [16]])
    y, aux = layer(x, mask_BL=mask)
    y_ref, metrics, _ = run_reference(layer, x, mask=mask)
    assert_close(y, y_ref, F32_FWD_TOL)
    check_aux(aux, metrics)


def test_fine_grained_many_small_experts():
    layer = MoeLayer(D, 8, 32, 8, capacity_factor=None, rngs=nnx.Rngs(7))
    x = make_inputs(8)
    y, aux = layer(x)
    y_ref, metrics, _ = run_reference(layer, x)
    assert_close(y, y_ref, F32_FWD_TOL)
    check_aux(aux, metrics)


def test_selection_bias_changes_selection_not_gates():
    layer = MoeLayer(
        D, F, E, 1, normalize_gates=False, selection_bias=True, selection_bias_rate=0.0, rngs=nnx.Rngs(9)
    )
    layer.selection_bias[...] = jnp.array([0.0, 0.0, 0.0, 10.0])
    x = make_inputs(10)
    y, aux = layer(x)
    np.testing.assert_allclose(aux["expert_load"], [0, 0, 0, 1])
    y_ref, _, combine = run_reference(layer, x)
    assert_close(y, y_ref, F32_FWD_TOL)
    probs = ref._softmax(np.asarray(x, np.float64) @ ref.layer_params(layer)["router"])
    np.testing.assert_allclose(combine[..., 3], probs[..., 3], rtol=1e-12)  # gate = unbiased probability


def test_selection_bias_updates_in_training_calls_only():
    """Training: route with the old bias, then b += rate·sign(mean load − load); evaluation: unchanged."""
    layer = MoeLayer(D, F, E, K, selection_bias=True, selection_bias_rate=0.01, rngs=nnx.Rngs(9))
    layer.selection_bias[...] = jnp.array([0.0, 0.02, 0.0, -0.01])
    x = make_inputs(10)
    y_ref, metrics, _ = run_reference(layer, x)  # with the bias before the call
    y, aux = layer(x, deterministic=False)
    assert_close(y, y_ref, F32_FWD_TOL)
    load = np.asarray(metrics["expert_load"])
    expected = np.array([0.0, 0.02, 0.0, -0.01]) + 0.01 * np.sign(load.mean() - load)
    assert_close(layer.selection_bias[...], expected, F32_FWD_TOL)
    assert np.any(load != load.mean()), "the case must have an imbalance to correct"
    before_eval = np.asarray(layer.selection_bias[...])
    layer(x, deterministic=True)
    np.testing.assert_array_equal(layer.selection_bias[...], before_eval)


def test_bf16_compute_within_relative_tolerance():
    layer = MoeLayer(D, F, E, K, dtype=jnp.bfloat16, rngs=nnx.Rngs(11))
    x = make_inputs(12)
    y, _ = layer(x)
    assert y.dtype == jnp.bfloat16
    y_ref = run_reference(layer, x)[0]
    err = np.linalg.norm(np.asarray(y, np.float64) - y_ref) / np.linalg.norm(y_ref)
    assert err < BF16_REL_TOL, err


def test_jit_matches_eager():
    layer = MoeLayer(D, F, E, K, capacity_factor=1.0, rngs=nnx.Rngs(13))
    x = make_inputs(14)
    y_eager, aux_eager = layer(x)
    y_jit, aux_jit = nnx.jit(lambda m, v: m(v))(layer, x)
    assert_close(y_jit, np.asarray(y_eager, np.float64), F32_FWD_TOL)
    assert_close(aux_jit["load_balancing_loss"], float(aux_eager["load_balancing_loss"]), F32_FWD_TOL)


def test_eval_mode_uses_eval_capacity_and_no_jitter():
    layer = MoeLayer(
        D, F, E, K, capacity_factor=0.5, eval_capacity_factor=2.0, jitter_noise=0.1, rngs=nnx.Rngs(15)
    )
    x = make_inputs(16)
    y_train, aux_train = layer(x)
    layer.eval()
    y_eval, aux_eval = layer(x)
    assert_close(y_eval, run_reference(layer, x, capacity_factor=2.0)[0], F32_FWD_TOL)
    assert float(aux_train["dropped_fraction"]) > float(aux_eval["dropped_fraction"])
    # Training-mode jitter changes the routing input (the eval-mode result is noise free).
    layer.train()
    y_train2, _ = layer(x)
    assert not np.allclose(np.asarray(y_train), np.asarray(y_train2))
