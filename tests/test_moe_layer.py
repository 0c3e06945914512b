"""MoeLayer against the float64 dense reference: every router x dispatcher x capacity mode.

``capacity_factor=None`` means dropless for token choice, but expert choice has no dropless mode: there
None means a factor of 1.0 (C = ceil(K·S/E) tokens per expert), so expert choice is tested at None and at a
larger factor, each against the reference.

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
from moe_jax.moe import routing as routing_lib
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


def capture_routing(monkeypatch) -> list:
    """Records every Routing the layer computes (eager calls), to compare the layer's own decisions."""
    captured = []

    def recording(real):
        def spy(*args, **kwargs):
            captured.append(real(*args, **kwargs))
            return captured[-1]

        return spy

    for name in ("route_token_choice", "route_expert_choice"):
        monkeypatch.setattr(routing_lib, name, recording(getattr(routing_lib, name)))
    return captured


def combine_weights(routing, S, num_experts) -> np.ndarray:
    """The layer's combine weights [G, S, E] from its Routing record (dropped assignments weigh zero)."""
    token, expert = np.asarray(routing.token_GN), np.asarray(routing.expert_GN)
    weight = np.where(np.asarray(routing.kept_GN), np.asarray(routing.weight_GN, np.float64), 0.0)
    out = np.zeros((token.shape[0], S, num_experts))
    for g in range(token.shape[0]):
        np.add.at(out[g], (token[g], expert[g]), weight[g])
    return out


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
@pytest.mark.parametrize("router", ["token_choice", "batch_prioritized"])
def test_forward_and_gradients_match_reference(router, dispatch, capacity_factor):
    # "grouped" runs the default backend here: the core + overflow layout on CPU.
    layer = MoeLayer(
        D, F, E, K, capacity_factor=capacity_factor, dispatch=dispatch, rngs=nnx.Rngs(0), **ROUTERS[router]
    )
    check_layer_against_reference(layer, capacity_factor, router)


# Expert choice: None means 1.0 (C = ceil(2·16·1.0/4) = 8 of the 16 tokens per expert); 1.5 gives C = 12.
@pytest.mark.parametrize("capacity_factor, capacity", [(None, 8), (1.5, 12)], ids=["default_cf1", "cf1.5"])
@pytest.mark.parametrize("dispatch", ["einsum", "indices", "grouped"])
def test_expert_choice_forward_and_gradients_match_reference(dispatch, capacity_factor, capacity):
    layer = MoeLayer(
        D,
        F,
        E,
        K,
        capacity_factor=capacity_factor,
        dispatch=dispatch,
        rngs=nnx.Rngs(0),
        **ROUTERS["expert_choice"],
    )
    assert ref_capacity(layer, L, capacity_factor) == capacity  # the test's own formula, checked by hand
    check_layer_against_reference(layer, capacity_factor, "expert_choice")


def test_expert_choice_none_means_capacity_factor_one(monkeypatch):
    """None and 1.0 are one routing (C = 8 per expert); 1.5 (C = 12) routes and outputs differently."""
    captured = capture_routing(monkeypatch)
    x = make_inputs(1)
    layers = {
        cf: MoeLayer(D, F, E, K, capacity_factor=cf, rngs=nnx.Rngs(0), router="expert_choice")
        for cf in (None, 1.0, 1.5)
    }
    outputs = {}
    for cf, layer in layers.items():
        y, aux = layer(x)
        outputs[cf] = np.asarray(y, np.float64)
        routing = captured[-1]
        capacity = {None: 8, 1.0: 8, 1.5: 12}[cf]
        # Each expert takes exactly C tokens of every group.
        expert_GN, kept_GN = np.asarray(routing.expert_GN), np.asarray(routing.kept_GN)
        kept_per_expert = np.stack([np.bincount(expert_GN[g][kept_GN[g]], minlength=E) for g in range(B)])
        np.testing.assert_array_equal(kept_per_expert, np.full((B, E), capacity))
        y_ref, metrics, combine = run_reference(layer, x)
        assert_close(y, y_ref, F32_FWD_TOL, f"output, capacity_factor={cf}")
        assert_close(combine_weights(routing, L, E), combine, F32_FWD_TOL, f"combine, capacity_factor={cf}")
        check_aux(aux, metrics)
    np.testing.assert_array_equal(outputs[None], outputs[1.0])
    assert not np.allclose(outputs[None], outputs[1.5], rtol=1e-3, atol=1e-3), "1.5 must route differently"


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


def test_selection_bias_changes_selection_not_gates(monkeypatch):
    """The bias sends every token to expert 3; the layer's gate is the unbiased probability, not p + 10."""
    layer = MoeLayer(
        D, F, E, 1, normalize_gates=False, selection_bias=True, selection_bias_rate=0.0, rngs=nnx.Rngs(9)
    )
    layer.selection_bias[...] = jnp.array([0.0, 0.0, 0.0, 10.0])
    captured = capture_routing(monkeypatch)
    x = make_inputs(10)
    y, aux = layer(x)
    np.testing.assert_allclose(aux["expert_load"], [0, 0, 0, 1])
    y_ref, _, combine_ref = run_reference(layer, x)
    assert_close(y, y_ref, F32_FWD_TOL)
    # The layer's own combine weights (not the reference's) against float64 unbiased probabilities.
    (routing,) = captured
    combine = combine_weights(routing, L, E)
    probs = ref._softmax(np.asarray(x, np.float64) @ ref.layer_params(layer)["router"])
    expected = np.zeros_like(probs)
    expected[..., 3] = probs[..., 3]
    assert_close(combine, expected, F32_FWD_TOL, "gates: unbiased probability of expert 3, nothing else")
    assert_close(combine, combine_ref, F32_FWD_TOL, "gates against the reference routing")


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
