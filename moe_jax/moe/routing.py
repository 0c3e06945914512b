"""Routers: router logits -> a :class:`Routing` record of assignments, gates, capacity slots and metrics.

An *assignment* is one (token, expert) pair with a combine weight. Per group there are N assignments:
token choice lists them token-major (``n = s·K + k``), expert choice expert-major (``n = e·C + c``).
Every assignment also gets a *slot*, its position in the expert's capacity buffer of the group, given by the
priority order; an assignment is *kept* when its token is real (not padding) and its slot is below capacity.

Router scores (``score_fn``): ``softmax`` over the E logits (Switch, GShard, Mixtral, OLMoE, Qwen-MoE) or an
independent ``sigmoid`` per expert (DeepSeek-V3). DeepSeek-V3's group-limited selection (``n_group`` /
``topk_group``: first pick the best expert groups, then top-K inside them) is not implemented; its top-K runs
over all E experts here.

Everything here runs in float32 whatever the layer's compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

TOKEN_CHOICE = "token_choice"
EXPERT_CHOICE = "expert_choice"
ROUTERS = (TOKEN_CHOICE, EXPERT_CHOICE)
SOFTMAX = "softmax"
SIGMOID = "sigmoid"
SCORE_FNS = (SOFTMAX, SIGMOID)


@struct.dataclass
class Routing:
    """Where every assignment goes.

    Attributes:
        expert_GN: expert of each assignment, int32.
        token_GN: token (position within its group) of each assignment, int32.
        weight_GN: combine weight, float32; zero where not kept.
        slot_GN: slot within the expert's capacity buffer of the group, int32.
        kept_GN: whether the assignment contributes.
        kind: ``token_choice`` or ``expert_choice`` (static).
        top_k: K for token choice; for expert choice the nominal experts per token (static).
        stats: additive routing statistics, see :func:`routing_stats`; ``aux`` gives the losses/metrics.
    """

    expert_GN: jax.Array
    token_GN: jax.Array
    weight_GN: jax.Array
    slot_GN: jax.Array
    kept_GN: jax.Array
    stats: dict
    kind: str = struct.field(pytree_node=False, default=TOKEN_CHOICE)
    top_k: int = struct.field(pytree_node=False, default=1)

    @property
    def aux(self) -> dict:
        """Losses and metrics, see :func:`aux_from_stats`."""
        return aux_from_stats(self.stats)


def capacity_per_group(tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(K · S · capacity_factor / E), at least 1."""
    return max(1, math.ceil(top_k * tokens_per_group * capacity_factor / num_experts))


def inverse_permutation(order_GN: jax.Array) -> jax.Array:
    """Per group, the position of each element in ``order``: one scatter, no second sort.

    ``vmap`` over groups makes the group dim a batch dim of the scatter, which GSPMD keeps sharded (an
    explicit group index would make it gather every group onto every device).
    """
    n = order_GN.shape[-1]
    return jax.vmap(lambda o: jnp.zeros_like(o).at[o].set(jnp.arange(n, dtype=o.dtype)))(order_GN)


def router_scores(logits_GSE: jax.Array, score_fn: str = SOFTMAX) -> tuple[jax.Array, jax.Array]:
    """Gate scores and the per-token distribution over experts that the losses and metrics use.

    Args:
        logits_GSE: float32 router logits.
        score_fn: ``softmax`` (both results are the softmax probabilities) or ``sigmoid`` (DeepSeek-V3: the
            scores are sigmoid(logits), each in (0, 1) on its own; the distribution is the scores normalised
            to sum to one per token, as DeepSeek-V3's sequence-wise balance loss uses them).

    Returns:
        ``(scores_GSE, probs_GSE)``: scores select experts (plus any selection bias) and give the gates;
        ``probs_GSE`` sums to one over experts and feeds P_e of the load-balancing loss and the entropy.

    Raises:
        ValueError: an unknown ``score_fn``.
    """
    if score_fn == SOFTMAX:
        probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
        return probs_GSE, probs_GSE
    if score_fn == SIGMOID:
        scores_GSE = jax.nn.sigmoid(logits_GSE)
        return scores_GSE, scores_GSE / jnp.sum(scores_GSE, axis=-1, keepdims=True)
    raise ValueError(f"score_fn={score_fn!r} is unknown; choose one of {SCORE_FNS}")


def _slots_by_priority(expert_GN: jax.Array, priority_GN: jax.Array, num_experts: int) -> jax.Array:
    """Slot of each assignment: how many assignments to the same expert come earlier in priority.

    ``priority_GN`` must hold distinct integers in [0, 2N). One stable sort per group by (expert, priority)
    gives every expert's assignments in priority order; the slot is the rank inside that run.
    """
    n = expert_GN.shape[-1]
    key_GN = expert_GN.astype(jnp.int32) * (2 * n) + priority_GN.astype(jnp.int32)
    order_GN = jnp.argsort(key_GN, axis=-1, stable=True)
    rank_GN = inverse_permutation(order_GN)
    counts_GE = jax.nn.one_hot(expert_GN, num_experts, dtype=jnp.int32).sum(axis=1)
    start_GE = jnp.cumsum(counts_GE, axis=-1) - counts_GE
    return rank_GN - jnp.take_along_axis(start_GE, expert_GN, axis=-1)


def route_token_choice(
    logits_GSE: jax.Array,
    *,
    top_k: int,
    capacity: int | None,
    normalize_gates: bool,
    batch_prioritized: bool = False,
    token_major_priority: bool = False,
    selection_bias_E: jax.Array | None = None,
    mask_GS: jax.Array | None = None,
    score_fn: str = SOFTMAX,
    routed_scaling_factor: float = 1.0,
) -> Routing:
    """Top-K token-choice routing over softmax or sigmoid scores (softmax K=1 is Switch).

    Args:
        logits_GSE: router logits (cast to float32).
        top_k: experts per token.
        capacity: slots per expert per group; ``None`` is dropless.
        normalize_gates: renormalise each token's K gates to sum to one (Mixtral, DeepSeek-V3); Switch (K=1)
            and OLMoE do not.
        batch_prioritized: capacity priority by the token's top-1 score (descending) instead of position.
            In both cases all first choices come before all second choices, and so on.
        token_major_priority: capacity priority by position first (all K choices of token 0, then token
            1, ...). Causal decoders need it: with the k-major order a later token's first choice can take
            the slot of an earlier token's second choice, so a token's output would depend on the future.
        selection_bias_E: per-expert bias added to the scores for *selection only* (aux-loss-free
            balancing); gates come from the unbiased scores.
        mask_GS: True for real tokens; padding is never routed and is left out of losses and metrics.
        score_fn: ``softmax`` or ``sigmoid`` (DeepSeek-V3), see :func:`router_scores`. With ``sigmoid`` the
            gates are the sigmoid scores of the selected experts (renormalised over the K if
            ``normalize_gates``), and P_e of the load-balancing loss and the router entropy use the scores
            normalised per token to sum to one; the z-loss is the same logsumexp of the logits.
        routed_scaling_factor: multiplies every gate after the optional renormalisation (DeepSeek-V3: 2.5).
    """
    logits_GSE = logits_GSE.astype(jnp.float32)
    G, S, E = logits_GSE.shape
    scores_GSE, probs_GSE = router_scores(logits_GSE, score_fn)
    select_GSE = scores_GSE if selection_bias_E is None else scores_GSE + selection_bias_E.astype(jnp.float32)
    # A stable sort rather than lax.top_k: same choice (ties go to the lower expert index), and GSPMD keeps
    # a sort over the last dim sharded by groups, whereas its top-k gathers every group's scores.
    expert_GSK = jnp.argsort(-select_GSE, axis=-1, stable=True)[..., :top_k]
    gates_GSK = jnp.take_along_axis(scores_GSE, expert_GSK, axis=-1)
    if normalize_gates:
        gates_GSK = gates_GSK / jnp.sum(gates_GSK, axis=-1, keepdims=True)
    gates_GSK = _scale(gates_GSK, routed_scaling_factor)
    mask_GS = jnp.ones((G, S), bool) if mask_GS is None else mask_GS.astype(bool)

    # Priority: k-major (all first choices first), then token order within each k; or token-major.
    if batch_prioritized:
        top1_GS = jnp.max(scores_GSE, axis=-1)
        order_GS = jnp.argsort(-top1_GS, axis=-1, stable=True)
        token_rank_GS = inverse_permutation(order_GS)
    else:
        token_rank_GS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (G, S))
    if token_major_priority:
        priority_GSK = token_rank_GS[..., None] * top_k + jnp.arange(top_k, dtype=jnp.int32)
    else:
        priority_GSK = jnp.arange(top_k, dtype=jnp.int32) * S + token_rank_GS[..., None]
    # Padding goes last so it never takes a slot from a real token.
    priority_GSK = priority_GSK + jnp.where(mask_GS, 0, S * top_k)[..., None]

    expert_GN = expert_GSK.reshape(G, S * top_k).astype(jnp.int32)
    slot_GN = _slots_by_priority(expert_GN, priority_GSK.reshape(G, -1), E)
    valid_GN = jnp.repeat(mask_GS, top_k, axis=1)
    kept_GN = valid_GN if capacity is None else valid_GN & (slot_GN < capacity)
    weight_GN = jnp.where(kept_GN, gates_GSK.reshape(G, -1), 0.0)
    token_GN = jnp.repeat(jnp.arange(S, dtype=jnp.int32)[None], G, axis=0)
    token_GN = jnp.repeat(token_GN, top_k, axis=1)

    stats = routing_stats(
        logits_GSE,
        probs_GSE,
        mask_GS,
        expert_GN,
        valid_GN,
        contributing=kept_GN.sum(),
        eligible=valid_GN.sum(),
    )
    return Routing(expert_GN, token_GN, weight_GN, slot_GN, kept_GN, stats, TOKEN_CHOICE, top_k)


def route_expert_choice(
    logits_GSE: jax.Array,
    *,
    capacity: int,
    top_k: int,
    selection_bias_E: jax.Array | None = None,
    mask_GS: jax.Array | None = None,
    routed_scaling_factor: float = 1.0,
) -> Routing:
    """Expert-choice routing: each expert takes the ``capacity`` tokens of the group it scores highest.

    The combine weight is the token's router probability for that expert (softmax over experts; sigmoid
    scores are not offered here), times ``routed_scaling_factor``. A token may be taken by several experts or
    by none; "dropped" then means taken by none. Ties go to the earlier token. Padding is never taken (if an
    expert has more slots than real tokens, the rest stay empty).
    """
    logits_GSE = logits_GSE.astype(jnp.float32)
    G, S, E = logits_GSE.shape
    capacity = min(capacity, S)
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    scores_GSE = probs_GSE if selection_bias_E is None else probs_GSE + selection_bias_E.astype(jnp.float32)
    mask_GS = jnp.ones((G, S), bool) if mask_GS is None else mask_GS.astype(bool)
    # Probabilities are >= 0 (and bias is bounded), so -inf keeps padding out of every expert's top-C.
    scores_GES = jnp.where(mask_GS[:, None, :], jnp.swapaxes(scores_GSE, 1, 2), -jnp.inf)
    _, token_GEC = jax.lax.top_k(scores_GES, capacity)
    probs_GES = jnp.swapaxes(probs_GSE, 1, 2)
    weight_GEC = _scale(jnp.take_along_axis(probs_GES, token_GEC, axis=-1), routed_scaling_factor)
    kept_GEC = jnp.take_along_axis(jnp.broadcast_to(mask_GS[:, None, :], (G, E, S)), token_GEC, axis=-1)

    n = E * capacity
    token_GN = token_GEC.reshape(G, n).astype(jnp.int32)
    kept_GN = kept_GEC.reshape(G, n)
    expert_GN = jnp.broadcast_to(jnp.repeat(jnp.arange(E, dtype=jnp.int32), capacity), (G, n))
    slot_GN = jnp.broadcast_to(jnp.tile(jnp.arange(capacity, dtype=jnp.int32), E), (G, n))
    weight_GN = jnp.where(kept_GN, weight_GEC.reshape(G, n), 0.0)

    taken_GS = jax.vmap(lambda t, k: jnp.zeros((S,), bool).at[t].max(k))(token_GN, kept_GN)
    stats = routing_stats(
        logits_GSE,
        probs_GSE,
        mask_GS,
        expert_GN,
        kept_GN,
        contributing=(taken_GS & mask_GS).sum(),
        eligible=mask_GS.sum(),
    )
    return Routing(expert_GN, token_GN, weight_GN, slot_GN, kept_GN, stats, EXPERT_CHOICE, top_k)


def _scale(gates: jax.Array, factor: float) -> jax.Array:
    # Skipped at 1.0 so the default program (and its results) is exactly the unscaled one.
    return gates if factor == 1.0 else gates * jnp.float32(factor)


def routing_stats(
    logits_GSE: jax.Array,
    probs_GSE: jax.Array,
    mask_GS: jax.Array,
    expert_GN: jax.Array,
    counted_GN: jax.Array,
    contributing: jax.Array,
    eligible: jax.Array,
) -> dict:
    """Additive routing statistics over the real tokens of these groups.

    Sums, not means: shards of a batch (the expert-parallel ``shard_map`` path) add them with one ``psum``
    before :func:`aux_from_stats` turns them into losses and metrics, which then equal the unsharded ones.
    ``contributing`` / ``eligible`` count kept / all assignments (token choice) or taken / all tokens (expert
    choice).
    """
    E = logits_GSE.shape[-1]
    maskf_GS = mask_GS.astype(jnp.float32)
    lse_GS = jax.nn.logsumexp(logits_GSE, axis=-1)
    entropy_GS = -jnp.sum(probs_GSE * jnp.log(jnp.maximum(probs_GSE, 1e-30)), axis=-1)
    one_hot_GNE = jax.nn.one_hot(expert_GN, E, dtype=jnp.float32)
    return {
        "assignment_count_E": jnp.sum(one_hot_GNE * counted_GN[..., None], axis=(0, 1)),
        "prob_sum_E": jnp.sum(probs_GSE * maskf_GS[..., None], axis=(0, 1)),
        "num_tokens": maskf_GS.sum(),
        "z_sum": jnp.sum(jnp.square(lse_GS) * maskf_GS),
        "entropy_sum": jnp.sum(entropy_GS * maskf_GS),
        "contributing": jnp.asarray(contributing, jnp.float32),
        "eligible": jnp.asarray(eligible, jnp.float32),
    }


def aux_from_stats(stats: dict) -> dict:
    """Auxiliary losses and routing metrics from routing statistics (possibly summed over shards).

    Returns:
        load_balancing_loss: E · Σ_e f_e · P_e, f_e the share of assignments routed to e (before capacity
            drops), P_e the mean router probability of e (sigmoid scores: of the per-token scores normalised
            to sum to one, as in DeepSeek-V3's balance loss, here averaged over all tokens of the batch).
        router_z_loss: mean over tokens of logsumexp(logits)².
        expert_load: f_e, [E], sums to one.
        dropped_fraction: share of assignments (token choice) or tokens (expert choice) that contribute
            nothing.
        router_entropy: mean over tokens of the entropy of the router distribution (nats; sigmoid scores:
            of the normalised scores).
        max_load_ratio: max_e f_e / mean_e f_e (1 is perfectly balanced).
    """
    counts_E = stats["assignment_count_E"]
    E = counts_E.shape[-1]
    num_tokens = jnp.maximum(stats["num_tokens"], 1.0)
    load_E = counts_E / jnp.maximum(counts_E.sum(), 1.0)
    mean_prob_E = stats["prob_sum_E"] / num_tokens
    return {
        "load_balancing_loss": E * jnp.sum(load_E * mean_prob_E),
        "router_z_loss": stats["z_sum"] / num_tokens,
        "expert_load": load_E,
        "dropped_fraction": 1.0 - stats["contributing"] / jnp.maximum(stats["eligible"], 1.0),
        "router_entropy": stats["entropy_sum"] / num_tokens,
        "max_load_ratio": jnp.max(load_E) * E,
    }


def update_selection_bias(
    bias_E: jax.Array, expert_load_E: jax.Array, update_rate: float = 1e-3
) -> jax.Array:
    """Aux-loss-free balancing update (DeepSeek-V3): b_e += rate · sign(mean load − load_e).

    Overloaded experts get a lower selection bias, underloaded ones a higher; the bias only changes which
    experts are selected, never the gate values. Call it from the training loop after each step with the
    step's ``aux["expert_load"]`` of the layer.
    """
    mean_load = jnp.mean(expert_load_E)
    return bias_E + update_rate * jnp.sign(mean_load - expert_load_E).astype(bias_E.dtype)
