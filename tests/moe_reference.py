"""Independent references for the MoE layer.

``reference_routing`` decides routing in float64 NumPy with plain Python loops (no sorting tricks shared
with the library); ``reference_forward`` evaluates *every* expert on *every* token in float64 and masks by
that routing; ``dense_jax_forward`` is the same computation as a differentiable float64 JAX function (routing
decisions held fixed) for gradient references.

Router scores: ``softmax`` (probabilities) or ``sigmoid`` (DeepSeek-V3: 1 / (1 + exp(-logit)) per expert;
gates are the selected scores; the balance loss and entropy use the scores divided by their per-token sum).
``routed_scaling_factor`` multiplies the routed combine weights after renormalisation; a ``w_shared_gate``
parameter scales the shared experts' output by sigmoid(x · w_shared_gate) (Qwen2-MoE).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import erf


@dataclasses.dataclass
class RefRouting:
    expert: np.ndarray  # [T, n] expert of each assignment, -1 for none
    gate_index: np.ndarray  # [T, n] which selected slot (k) of the token, for gradient references
    kept: np.ndarray  # [T, n] bool
    dropped_fraction: float
    expert_load: np.ndarray  # [E]


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def scores_np(logits, score_fn):
    """(gate scores, per-token distribution for the losses) in float64, written out per score function."""
    logits = np.asarray(logits, np.float64)
    if score_fn == "softmax":
        probs = _softmax(logits)
        return probs, probs
    assert score_fn == "sigmoid", score_fn
    scores = _sigmoid(logits)
    return scores, scores / scores.sum(axis=-1, keepdims=True)


def act_np(name, gate, up):
    silu = lambda v: v / (1.0 + np.exp(-v))
    gelu = lambda v: 0.5 * v * (1.0 + erf(v / math.sqrt(2.0)))
    return {
        "swiglu": lambda: silu(gate) * up,
        "geglu": lambda: gelu(gate) * up,
        "gelu": lambda: gelu(up),
        "relu": lambda: np.maximum(up, 0.0),
        "silu": lambda: silu(up),
    }[name]()


def layer_params(layer) -> dict:
    get = lambda p: None if p is None else np.asarray(p[...], np.float64)
    params = {
        "router": get(layer.router),
        "w_gate": get(layer.w_gate),
        "w_up": get(layer.w_up),
        "w_down": get(layer.w_down),
    }
    if layer.num_shared_experts:
        params |= {
            "shared_w_gate": get(layer.shared_w_gate),
            "shared_w_up": get(layer.shared_w_up),
            "shared_w_down": get(layer.shared_w_down),
        }
    params["bias"] = None if layer.selection_bias is None else get(layer.selection_bias)
    if getattr(layer, "w_shared_gate", None) is not None:
        params["w_shared_gate"] = get(layer.w_shared_gate)
    return params


def reference_routing(
    logits_GSE: np.ndarray,
    *,
    router: str,
    top_k: int,
    capacity: int | None,
    normalize_gates: bool,
    batch_prioritized: bool = False,
    token_major: bool = False,
    bias_E: np.ndarray | None = None,
    mask_GS: np.ndarray | None = None,
    score_fn: str = "softmax",
    routed_scaling_factor: float = 1.0,
):
    """Returns (gates [G, S, E] combine weights, RefRouting-like dict of metrics).

    Token choice fills capacity k-major (every token's first choice, then second choices, ...) or, with
    ``token_major`` (causal decoders), token by token with all K choices of a token together.
    """
    G, S, E = logits_GSE.shape
    gate_scores, probs = scores_np(logits_GSE, score_fn)
    scores = gate_scores if bias_E is None else gate_scores + bias_E
    mask = np.ones((G, S), bool) if mask_GS is None else mask_GS.astype(bool)
    combine = np.zeros((G, S, E))
    selected = np.zeros((G, S, E))  # token choice: every top-K choice, before capacity drops
    counts = np.zeros(E)
    kept_total = valid_total = 0
    taken = np.zeros((G, S), bool)
    for g in range(G):
        if router == "token_choice":
            choice = np.argsort(-scores[g], axis=-1, kind="stable")[:, :top_k]  # ties: lower index first
            np.put_along_axis(selected[g], choice, 1.0, axis=-1)
            gate = np.take_along_axis(gate_scores[g], choice, axis=-1)
            if normalize_gates:
                gate = gate / gate.sum(axis=-1, keepdims=True)
            gate = gate * routed_scaling_factor
            if batch_prioritized:
                order = np.argsort(-gate_scores[g].max(axis=-1), kind="stable")
            else:
                order = np.arange(S)
            fill = np.zeros(E, int)
            visits = [(s, k) for s in order for k in range(top_k)]
            if not token_major:
                visits = [(s, k) for k in range(top_k) for s in order]
            for s, k in visits:
                if not mask[g, s]:
                    continue
                e = choice[s, k]
                counts[e] += 1
                valid_total += 1
                if capacity is None or fill[e] < capacity:
                    fill[e] += 1
                    combine[g, s, e] += gate[s, k]
                    kept_total += 1
        else:
            c = min(capacity, S)
            for e in range(E):
                cand = [s for s in np.argsort(-scores[g, :, e], kind="stable") if mask[g, s]][:c]
                for s in cand:
                    combine[g, s, e] += probs[g, s, e] * routed_scaling_factor
                    taken[g, s] = True
                    counts[e] += 1
    if router == "token_choice":
        dropped = 1.0 - kept_total / max(valid_total, 1)
    else:
        dropped = 1.0 - (taken & mask).sum() / max(mask.sum(), 1)
    load = counts / max(counts.sum(), 1)
    mask_f = mask.astype(np.float64)
    n_tok = max(mask_f.sum(), 1.0)
    mean_prob = (probs * mask_f[..., None]).sum(axis=(0, 1)) / n_tok
    m = logits_GSE.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(logits_GSE - m).sum(axis=-1, keepdims=True)))[..., 0]
    entropy = -(probs * np.log(np.maximum(probs, 1e-300))).sum(axis=-1)
    metrics = {
        "load_balancing_loss": E * float((load * mean_prob).sum()),
        "router_z_loss": float((lse**2 * mask_f).sum() / n_tok),
        "expert_load": load,
        "dropped_fraction": dropped,
        "router_entropy": float((entropy * mask_f).sum() / n_tok),
        "max_load_ratio": float(load.max() * E),
        "_selected": selected,
    }
    return combine, metrics


def expert_outputs_np(x_TD, params, activation):
    """Every expert on every token: [E, T, D] in float64."""
    up = np.einsum("td,edf->etf", x_TD, params["w_up"])
    gate = None if params["w_gate"] is None else np.einsum("td,edf->etf", x_TD, params["w_gate"])
    return np.einsum("etf,efd->etd", act_np(activation, gate, up), params["w_down"])


def reference_forward(x_BLD, params, *, activation="swiglu", group_size=None, mask_BL=None, **route_kw):
    """float64 forward of the whole layer; returns (y_BLD, metrics, combine_GSE)."""
    x = np.asarray(x_BLD, np.float64)
    B, L, D = x.shape
    G, S = (B, L) if group_size is None else (B * L // group_size, group_size)
    x_GSD = x.reshape(G, S, D)
    logits = x_GSD @ params["router"]
    mask_GS = None if mask_BL is None else np.asarray(mask_BL).reshape(G, S)
    combine, metrics = reference_routing(logits, bias_E=params.get("bias"), mask_GS=mask_GS, **route_kw)
    outs_ETD = expert_outputs_np(x_GSD.reshape(G * S, D), params, activation)
    y = np.einsum("te,etd->td", combine.reshape(G * S, -1), outs_ETD)
    if params.get("shared_w_up") is not None:
        up = x_GSD.reshape(G * S, D) @ params["shared_w_up"]
        gate = None if params["shared_w_gate"] is None else x_GSD.reshape(G * S, D) @ params["shared_w_gate"]
        shared = act_np(activation, gate, up) @ params["shared_w_down"]
        if params.get("w_shared_gate") is not None:
            shared = shared * _sigmoid(x_GSD.reshape(G * S, D) @ params["w_shared_gate"])
        y = y + shared
    return y.reshape(B, L, D), metrics, combine


def _act_jax(activation, gate, up):
    if gate is None:
        return {
            "gelu": lambda u: jax.nn.gelu(u, approximate=False),
            "relu": jax.nn.relu,
            "silu": jax.nn.silu,
        }[activation](up)
    fn = jax.nn.silu if activation == "swiglu" else (lambda u: jax.nn.gelu(u, approximate=False))
    return fn(gate) * up


def dense_jax_forward(
    params,
    x_BLD,
    combine_GSE,
    *,
    activation,
    normalize_gates,
    router,
    group_size=None,
    score_fn="softmax",
    routed_scaling_factor=1.0,
):
    """Differentiable float64 reference with fixed routing decisions (which (token, expert) pairs count).

    Gates are recomputed from the router so gradients flow into it exactly as in the layer: token choice
    uses the scores (softmax probabilities or sigmoids) of the selected experts (renormalised over the
    token's selected set when ``normalize_gates``); expert choice uses the raw probabilities; both times
    ``routed_scaling_factor``. Shared experts (and their sigmoid gate) are added when ``params`` has them.
    """
    B, L, D = x_BLD.shape
    G, S = (B, L) if group_size is None else (B * L // group_size, group_size)
    x_TD = x_BLD.reshape(G * S, D)
    selected_TE = jnp.asarray(combine_GSE.reshape(G * S, -1) != 0, jnp.float64)
    logits_TE = x_TD @ params["router"]
    if score_fn == "softmax":
        scores_TE = jax.nn.softmax(logits_TE, axis=-1)
    else:
        assert score_fn == "sigmoid", score_fn
        scores_TE = 1.0 / (1.0 + jnp.exp(-logits_TE))
    if router == "token_choice" and normalize_gates:
        # Every selected expert of a token (kept or dropped) is in the normaliser: recover the selection set
        # from the reference, passed in through params["selected_all"].
        denom_T = jnp.sum(scores_TE * params["selected_all"], axis=-1, keepdims=True)
        weights_TE = scores_TE / denom_T * selected_TE
    else:
        weights_TE = scores_TE * selected_TE
    weights_TE = weights_TE * routed_scaling_factor
    up = jnp.einsum("td,edf->etf", x_TD, params["w_up"])
    g = None if params["w_gate"] is None else jnp.einsum("td,edf->etf", x_TD, params["w_gate"])
    outs_ETD = jnp.einsum("etf,efd->etd", _act_jax(activation, g, up), params["w_down"])
    y_TD = jnp.einsum("te,etd->td", weights_TE, outs_ETD)
    if params.get("shared_w_up") is not None:
        sg = None if params["shared_w_gate"] is None else x_TD @ params["shared_w_gate"]
        shared_TD = _act_jax(activation, sg, x_TD @ params["shared_w_up"]) @ params["shared_w_down"]
        if params.get("w_shared_gate") is not None:
            shared_TD = shared_TD / (1.0 + jnp.exp(-(x_TD @ params["w_shared_gate"])))
        y_TD = y_TD + shared_TD
    return y_TD.reshape(B, L, D)
