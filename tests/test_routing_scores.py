"""Routers of the decoder-only LM families: sigmoid scores, routed scaling, gated shared experts.

Mixtral (softmax, renormalised), OLMoE (softmax, not renormalised), Qwen2-MoE (softmax + a sigmoid-gated
shared expert) and DeepSeek-V3 (sigmoid scores + selection bias, renormalised, ×2.5, shared expert) against
the float64 reference of ``tests/moe_reference.py``, through every dispatcher; then gradients with routing
held fixed, a hand-computed case, the 8-device mesh (GSPMD and ``shard_map``), the per-mask expert counts
and the argument errors.

Tolerances as in ``test_moe_layer.py`` (written once, never loosened): f32 outputs and metrics 1e-5, f32
gradients 1e-4 (composites).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moe_jax import MoeLayer, sharding
from moe_jax.errors import ConfigError
from moe_jax.models.blocks import expert_counts_by_mask
from moe_jax.models.config import MoeConfig
from moe_jax.moe import routing
from tests import moe_reference as ref

F32_FWD_TOL = 1e-5
F32_GRAD_TOL = 1e-4

B, L, D, F, E, K = 2, 16, 16, 32, 4, 2
# Of the order of the gaps between sigmoid scores, so it changes selections (checked in the test).
BIAS_E = np.array([0.0, 0.15, -0.1, 0.05], np.float32)

CASES = {
    # DeepSeek-V3: sigmoid, bias for selection, renormalised, ×2.5, a shared expert, dropless, causal.
    "deepseek_v3": dict(
        score_fn="sigmoid",
        normalize_gates=True,
        selection_bias=True,
        routed_scaling_factor=2.5,
        num_shared_experts=1,
        capacity_factor=None,
        causal=True,
    ),
    "sigmoid_capacity_kmajor": dict(
        score_fn="sigmoid", normalize_gates=False, selection_bias=True, capacity_factor=1.0
    ),
    "sigmoid_capacity_causal": dict(
        score_fn="sigmoid", normalize_gates=True, routed_scaling_factor=2.5, capacity_factor=1.0, causal=True
    ),
    "sigmoid_batch_prioritized": dict(
        score_fn="sigmoid", normalize_gates=True, capacity_factor=1.0, batch_prioritized=True
    ),
    # Scaling applies to expert choice's weights too (softmax only there).
    "expert_choice_scaled": dict(router="expert_choice", routed_scaling_factor=2.5, capacity_factor=None),
    "olmoe": dict(normalize_gates=False, capacity_factor=None, causal=True),
    "mixtral": dict(normalize_gates=True, capacity_factor=1.0, causal=True),
    "qwen2_moe": dict(
        normalize_gates=False,
        num_shared_experts=1,
        shared_expert_gate=True,
        capacity_factor=None,
        causal=True,
    ),
    "sigmoid_shared_gate": dict(
        score_fn="sigmoid",
        normalize_gates=False,
        selection_bias=True,
        routed_scaling_factor=2.5,
        num_shared_experts=2,
        shared_d_ff=8,
        shared_expert_gate=True,
        capacity_factor=1.0,
    ),
}

DISPATCHES = {
    "einsum": dict(dispatch="einsum"),
    "indices": dict(dispatch="indices"),
    "grouped_core": dict(dispatch="grouped", grouped_backend="core"),
    "grouped_ladder": dict(dispatch="grouped", grouped_backend="ladder"),
}


def make_layer(case, seed=0, **kw):
    layer = MoeLayer(D, F, E, K, selection_bias_rate=0.0, rngs=nnx.Rngs(seed), **(CASES[case] | kw))
    if layer.selection_bias is not None:
        layer.selection_bias[...] = jnp.asarray(BIAS_E)
    return layer


def make_inputs(seed, shape=(B, L, D)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def ref_capacity(layer, S):
    """Independent capacity formula: C = ceil(K·S·cf/E); None is dropless (expert choice: cf 1.0)."""
    cf = layer.capacity_factor
    if cf is None:
        if layer.router_type == "token_choice":
            return None
        cf = 1.0
    return max(1, math.ceil(layer.top_k * S * cf / layer.num_experts))


def run_reference(layer, x, **overrides):
    params = ref.layer_params(layer) | overrides.pop("params", {})
    kw = dict(
        router=layer.router_type,
        top_k=layer.top_k,
        capacity=ref_capacity(layer, x.shape[1]),
        normalize_gates=layer.normalize_gates,
        batch_prioritized=layer.batch_prioritized,
        token_major=layer.causal and not layer.batch_prioritized,
        score_fn=layer.score_fn,
        routed_scaling_factor=layer.routed_scaling_factor,
    )
    return ref.reference_forward(np.asarray(x), params, activation=layer.activation, **(kw | overrides))


def assert_close(actual, expected, tol, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol, err_msg=what)


AUX_NAMES = (
    "load_balancing_loss",
    "router_z_loss",
    "expert_load",
    "dropped_fraction",
    "router_entropy",
    "max_load_ratio",
)


# Scores, scaling and the shared gate act before (weights) and after (shared output) the dispatcher, so every
# case runs through one dispatcher and the two richest (dropless, capacity) through the others.
FORWARD = [(case, "indices") for case in CASES] + [
    ("deepseek_v3", "einsum"),
    ("deepseek_v3", "grouped_core"),
    ("sigmoid_shared_gate", "einsum"),
    ("sigmoid_shared_gate", "grouped_ladder"),
]


@pytest.mark.parametrize("case, dispatch", FORWARD)
def test_layer_matches_reference(case, dispatch):
    layer = make_layer(case, **DISPATCHES[dispatch])
    x = make_inputs(1)
    if dispatch.startswith("grouped"):
        # Jitted: run eagerly, the grouped kernels' custom VJPs compile anew on every call (several seconds).
        graphdef, state = nnx.split(layer)
        y, aux = jax.jit(lambda st, v: nnx.merge(graphdef, st)(v))(state, x)
    else:
        y, aux = layer(x)
    y_ref, metrics, _ = run_reference(layer, x)
    assert_close(y, y_ref, F32_FWD_TOL, "output")
    for name in AUX_NAMES:
        assert_close(aux[name], metrics[name], F32_FWD_TOL, name)
    if layer.capacity_factor is not None:
        assert metrics["dropped_fraction"] > 0, "the capacity case must actually drop assignments"


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c].get("selection_bias")])
def test_cases_have_teeth(case):
    """The bias changes sigmoid selections, and sigmoid selections with bias differ from softmax ones."""
    layer = make_layer(case)
    x = make_inputs(1)
    selected = run_reference(layer, x)[1]["_selected"]
    unbiased = run_reference(layer, x, params={"bias": None})[1]["_selected"]
    softmax = run_reference(layer, x, score_fn="softmax")[1]["_selected"]
    assert np.any(selected != unbiased)
    assert np.any(selected != softmax)


@pytest.mark.parametrize("case", ["deepseek_v3", "sigmoid_shared_gate"])
def test_gradients_match_reference_with_routing_fixed(case):
    """d/dx and d/d(every parameter) of a random projection against the float64 dense JAX reference.

    The two cases cover renormalised gates with a shared expert (dropless) and raw sigmoid gates with capacity
    drops and the sigmoid-gated shared experts.
    """
    layer = make_layer(case, dispatch="indices")
    x, r = make_inputs(1), make_inputs(2)
    _, metrics, combine = run_reference(layer, x)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * r)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    names = [n for n, v in ref.layer_params(layer).items() if v is not None and n != "bias"]
    with jax.enable_x64(True):
        p64 = {k: (None if v is None else jnp.asarray(v)) for k, v in ref.layer_params(layer).items()}
        p64["selected_all"] = jnp.asarray(metrics["_selected"].reshape(-1, E))
        r64 = jnp.asarray(np.asarray(r), jnp.float64)

        def ref_loss(w, xx):
            y = ref.dense_jax_forward(
                p64 | w,
                xx,
                combine,
                activation=layer.activation,
                normalize_gates=layer.normalize_gates,
                router=layer.router_type,
                score_fn=layer.score_fn,
                routed_scaling_factor=layer.routed_scaling_factor,
            )
            return jnp.sum(y * r64)

        wrt = {n: p64[n] for n in names}
        g_ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(wrt, jnp.asarray(np.asarray(x), jnp.float64))
        g_ref = jax.tree.map(np.asarray, g_ref)
    assert_close(g_x, g_ref[1], F32_GRAD_TOL, "d/dx")
    for name in names:
        assert_close(g_params[name][...], g_ref[0][name], F32_GRAD_TOL, f"d/d{name}")
    if layer.w_shared_gate is not None:
        assert "w_shared_gate" in names


# Hand case: E=4, K=2 (the module's E, so no new shapes to compile). Logits chosen so the sigmoid scores are
# simple fractions:
#   token 0: logits (0, ln 3, -ln 3, -ln 3) -> s = (1/2, 3/4, 1/4, 1/4),  Σs = 7/4
#   token 1: logits (ln 3, 0, ln 3, -ln 3)  -> s = (3/4, 1/2, 3/4, 1/4),  Σs = 9/4
# Bias (0, 0, 0.6, 0): selection scores (1/2, 3/4, 0.85, 1/4) -> experts (2, 1);
#                      (3/4, 1/2, 1.35, 1/4) -> experts (2, 0).
# Renormalised gates: (1/4, 3/4) / 1 and (3/4, 3/4) / (3/2) = (1/2, 1/2); ×2.5: (0.625, 1.875), (1.25, 1.25).
LN3 = math.log(3.0)
HAND_LOGITS = np.array([[[0.0, LN3, -LN3, -LN3], [LN3, 0.0, LN3, -LN3]]], np.float32)
HAND_BIAS = np.array([0.0, 0.0, 0.6, 0.0], np.float32)


def route_hand_case(**kw):
    """route_token_choice of the hand logits, jitted whole (one compile instead of one per eager op)."""
    r = jax.jit(lambda logits: (lambda r: (r, r.aux))(routing.route_token_choice(logits, top_k=2, **kw)))
    return r(jnp.asarray(HAND_LOGITS))


def test_hand_case_routing():
    kw = dict(score_fn="sigmoid", selection_bias_E=jnp.asarray(HAND_BIAS))
    r, aux = route_hand_case(capacity=None, normalize_gates=True, routed_scaling_factor=2.5, **kw)
    np.testing.assert_array_equal(r.expert_GN[0], [2, 1, 2, 0])
    assert_close(r.weight_GN[0], [0.625, 1.875, 1.25, 1.25], F32_FWD_TOL, "gates")
    # f = (1/4, 1/4, 1/2, 0). P = mean over tokens of s/Σs: (2/7, 3/7, 1/7, 1/7) and (1/3, 2/9, 1/3, 1/9).
    p0, p1 = np.array([2, 3, 1, 1]) / 7, np.array([3, 2, 3, 1]) / 9
    mean_p = (p0 + p1) / 2
    assert_close(aux["expert_load"], [0.25, 0.25, 0.5, 0.0], F32_FWD_TOL)
    assert_close(aux["load_balancing_loss"], 4 * (mean_p[0] / 4 + mean_p[1] / 4 + mean_p[2] / 2), F32_FWD_TOL)
    assert_close(aux["max_load_ratio"], 2.0, F32_FWD_TOL)
    entropy = lambda p: -sum(v * math.log(v) for v in p)
    assert_close(aux["router_entropy"], (entropy(p0) + entropy(p1)) / 2, F32_FWD_TOL)
    # z-loss unchanged: logsumexp of the logits, ln(1 + 3 + 1/3 + 1/3) and ln(3 + 1 + 3 + 1/3).
    assert_close(aux["router_z_loss"], (math.log(14 / 3) ** 2 + math.log(22 / 3) ** 2) / 2, F32_FWD_TOL)

    # Not renormalised: the raw sigmoids ×2.5. Capacity 1: expert 2's second assignment (token 1) drops.
    r, aux = route_hand_case(capacity=1, normalize_gates=False, routed_scaling_factor=2.5, **kw)
    np.testing.assert_array_equal(r.kept_GN[0], [True, True, False, True])
    assert_close(r.weight_GN[0], [0.625, 1.875, 0.0, 1.875], F32_FWD_TOL, "gates")
    assert_close(aux["dropped_fraction"], 0.25, F32_FWD_TOL)

    # No bias: top-2 of s are (1, 0) and (0, 2) (the tie 3/4 = 3/4 goes to the lower index first).
    r, _ = route_hand_case(capacity=None, normalize_gates=True, score_fn="sigmoid")
    np.testing.assert_array_equal(r.expert_GN[0], [1, 0, 0, 2])
    assert_close(r.weight_GN[0], [0.6, 0.4, 0.5, 0.5], F32_FWD_TOL, "gates")


def test_hand_case_layer_with_gated_shared_expert():
    """One-hot tokens make the logits the router rows; the shared gate is sigmoid(±ln 3) = 3/4, 1/4."""
    layer = make_layer("deepseek_v3", shared_expert_gate=True, causal=False, seed=3)
    router = np.zeros((D, E), np.float32)
    router[:2] = HAND_LOGITS[0]
    layer.router[...] = jnp.asarray(router)
    layer.selection_bias[...] = jnp.asarray(HAND_BIAS)
    shared_gate = np.zeros((D, 1), np.float32)
    shared_gate[:2, 0] = [LN3, -LN3]
    layer.w_shared_gate[...] = jnp.asarray(shared_gate)
    x = np.eye(D, dtype=np.float32)[None, :2]
    graphdef, state = nnx.split(layer)
    y, _ = jax.jit(lambda st, v: nnx.merge(graphdef, st)(v))(state, jnp.asarray(x))

    p = ref.layer_params(layer)

    def ffn(prefix, e, row):
        w = lambda name: p[prefix + name] if e is None else p[prefix + name][e]
        return ref.act_np("swiglu", row @ w("w_gate"), row @ w("w_up")) @ w("w_down")

    t0, t1 = x[0, 0].astype(np.float64), x[0, 1].astype(np.float64)
    expected = np.stack(
        [
            0.625 * ffn("", 2, t0) + 1.875 * ffn("", 1, t0) + 0.75 * ffn("shared_", None, t0),
            1.25 * ffn("", 2, t1) + 1.25 * ffn("", 0, t1) + 0.25 * ffn("shared_", None, t1),
        ]
    )
    assert_close(y[0], expected, F32_FWD_TOL, "output")


MESH_B, MESH_L, MESH_E = 8, 8, 8


def mesh_layer(expert_parallel):
    layer = MoeLayer(
        D,
        F,
        MESH_E,
        K,
        score_fn="sigmoid",
        routed_scaling_factor=2.5,
        selection_bias=True,
        selection_bias_rate=0.0,
        num_shared_experts=1,
        shared_expert_gate=True,
        capacity_factor=1.25,
        causal=True,
        dispatch="indices",
        expert_parallel=expert_parallel,
        rngs=nnx.Rngs(0),
    )
    layer.selection_bias[...] = jnp.linspace(-0.1, 0.1, MESH_E)
    return layer


def mesh_loss(layer):
    """Jitted (loss, y, grads) of y·r + the load-balancing loss, whose gradient is then compared too."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    r = make_inputs(2, (MESH_B, MESH_L, D))

    @jax.jit
    def f(params, x):
        def loss(params, x):
            y, aux = nnx.merge(graphdef, params, rest)(x)
            return jnp.sum(y * r) + aux["load_balancing_loss"], y

        (value, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return value, y, grads

    return params, f


@functools.cache
def single_device_result():
    params, f = mesh_loss(mesh_layer("gspmd"))
    return jax.tree.map(np.asarray, f(params, make_inputs(1, (MESH_B, MESH_L, D))))


@pytest.mark.parametrize(
    "expert_parallel, mesh_shape, preset",
    [
        ("gspmd", {"data": 2, "expert": 4}, "ep"),
        ("shard_map", {"data": 2, "fsdp": 2, "expert": 2}, "ep_fsdp"),
    ],
)
def test_sharded_sigmoid_shared_gate_matches_single_device(expert_parallel, mesh_shape, preset):
    """Loss, output and every gradient on 8 devices equal one device's (ep_fsdp shards the gate's D)."""
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.preset_rules(preset)
    params, f = mesh_loss(mesh_layer(expert_parallel))
    params = sharding.shard_state(params, mesh, rules)
    x = make_inputs(1, (MESH_B, MESH_L, D))
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert"))))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        sharded = f(params, x)
    if preset == "ep_fsdp":
        assert params["w_shared_gate"][...].sharding.spec[0] == "fsdp"
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single_device_result()), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=F32_FWD_TOL, atol=F32_FWD_TOL)


def test_expert_counts_by_mask_use_the_sigmoid_selection():
    layer = make_layer("deepseek_v3")
    h = make_inputs(3)
    first_half = jnp.arange(L)[None, :] < L // 2
    masks = {"a": jnp.broadcast_to(first_half, (B, L)), "b": jnp.broadcast_to(~first_half, (B, L))}
    graphdef, state = nnx.split(layer)
    counts = jax.jit(lambda st, v: expert_counts_by_mask(nnx.merge(graphdef, st), v, masks))(state, h)
    selected = run_reference(layer, h)[1]["_selected"]  # [B, L, E], one group per sequence
    softmax = run_reference(layer, h, score_fn="softmax")[1]["_selected"]
    for name, m in masks.items():
        m = np.asarray(m)
        assert_close(counts[name], selected[m].sum(axis=0), 0, name)
        assert np.any(selected[m].sum(axis=0) != softmax[m].sum(axis=0)), "softmax would count otherwise"
    _, aux = layer(h, deterministic=True)
    assert_close(sum(counts.values()) / (B * L * K), np.asarray(aux["expert_load"]), F32_FWD_TOL)


def test_gate_parameter_is_drawn_last():
    """Enabling the shared gate adds one [D, 1] parameter and leaves every other initial draw unchanged."""
    kw = dict(num_shared_experts=1, jitter_noise=0.1, rngs=nnx.Rngs(4))
    plain = nnx.state(MoeLayer(D, F, E, K, **kw), nnx.Param)
    kw["rngs"] = nnx.Rngs(4)
    gated_layer = MoeLayer(D, F, E, K, shared_expert_gate=True, **kw)
    gated = nnx.state(gated_layer, nnx.Param)
    assert set(gated) - set(plain) == {"w_shared_gate"}
    assert gated["w_shared_gate"][...].shape == (D, 1)
    assert gated["w_shared_gate"].get_metadata()["out_sharding"] == ("embed", None)
    for name in plain:
        np.testing.assert_array_equal(gated[name][...], plain[name][...], err_msg=name)
    assert MoeLayer(D, F, E, K, rngs=nnx.Rngs(0)).w_shared_gate is None


def test_config_builds_the_layer():
    moe = MoeConfig.from_mapping(
        dict(
            score_fn="sigmoid",
            routed_scaling_factor=2.5,
            num_shared_experts=1,
            shared_expert_gate=True,
            selection_bias=True,
        ),
        path="config.model.moe",
    )
    layer = moe.build(D, F, activation="swiglu", causal=True, rngs=nnx.Rngs(0))
    assert (layer.score_fn, layer.routed_scaling_factor) == ("sigmoid", 2.5)
    assert layer.w_shared_gate is not None


BAD_VALUES = [
    (dict(score_fn="tanh"), "score_fn"),
    (dict(score_fn="sigmoid", router="expert_choice"), "score_fn"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(routed_scaling_factor=-2.5), "routed_scaling_factor"),
    (dict(routed_scaling_factor="2.5"), "routed_scaling_factor"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),
]


@pytest.mark.parametrize("kwargs, field", BAD_VALUES)
def test_bad_layer_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoeLayer(D, F, E, K, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize(
    "kwargs, field", BAD_VALUES + [(dict(shared_expert_gate="yes"), "shared_expert_gate")]
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^config\.model\.moe\.{field}=") as e:
        MoeConfig.from_mapping(kwargs, path="config.model.moe")
    assert "\n" not in str(e.value)
