"""``MoeLayer``: router + dispatcher + stacked experts (+ optional shared experts), in Flax NNX.

Shape letters are defined in ``moe_jax/moe/__init__.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding
from moe_jax.moe import dispatch as dispatch_lib
from moe_jax.moe import expert_parallel as expert_parallel_lib
from moe_jax.moe import experts as experts_lib
from moe_jax.moe import routing as routing_lib

DISPATCH_CHOICES = ("auto",) + dispatch_lib.DISPATCHERS
EXPERT_PARALLEL_CHOICES = ("gspmd", "shard_map")


class SelectionBias(nnx.Variable):
    """Per-expert selection bias for aux-loss-free balancing: state, not a trained parameter."""


def _expert_init(in_axis: int, out_axis: int) -> nnx.Initializer:
    # Fan-in scaling per expert: the leading expert dim is a batch dim, not part of the fan.
    return nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis, batch_axis=(0,)
    )


class MoeLayer(nnx.Module):
    """Sparse Mixture-of-Experts feed-forward layer.

    ``y_BLD, aux = layer(x_BLD)``. Routing math is float32; expert matmuls run in ``dtype``; the combine is
    float32. Works on one device with no mesh, and under ``jax.set_mesh`` with parameters placed by
    ``moe_jax.sharding.shard_state`` (experts over the ``expert`` mesh axis for the ``ep`` presets).

    Args:
        d_model: D, input and output width.
        d_ff: F, hidden width of each expert.
        num_experts: E routed experts.
        top_k: K experts per token (token choice); for expert choice, the nominal experts per token that
            sets the capacity.
        router: ``"token_choice"`` (top-K of the scores; softmax K=1 is Switch) or ``"expert_choice"``.
        capacity_factor: ``None`` is dropless (token choice). Otherwise each expert takes
            C = ceil(K·S·capacity_factor/E) assignments per group (rounded up to ``capacity_multiple``); the
            rest are dropped in priority order. Expert choice with ``None`` uses 1.0.
        eval_capacity_factor: capacity factor when ``deterministic`` (evaluation); defaults to
            ``capacity_factor``.
        normalize_gates: renormalise the K gates of a token to sum to one (Mixtral, DeepSeek-V3; OLMoE and
            Qwen-MoE do not).
        score_fn: router scores, ``"softmax"`` over the experts or ``"sigmoid"`` per expert (DeepSeek-V3,
            token choice only): experts are selected by top-K of sigmoid(logits) + selection bias, the gates
            are the selected sigmoid scores (renormalised with ``normalize_gates``). The load-balancing
            loss's P_e and the router entropy then use the scores normalised per token to sum to one; the
            z-loss is unchanged. DeepSeek-V3's group-limited selection (n_group / topk_group) is not
            implemented: top-K runs over all experts.
        routed_scaling_factor: multiplies the routed experts' combine weights after the optional
            renormalisation (DeepSeek-V3 uses 2.5); > 0. Shared experts are not scaled.
        activation: ``swiglu`` / ``geglu`` (gated, with ``w_gate``) or ``gelu`` / ``relu`` / ``silu``.
        dispatch: ``einsum``, ``indices``, ``grouped`` or ``auto`` (``grouped`` when dropless, else
            ``einsum`` on TPU and ``indices`` elsewhere).
        num_shared_experts: always-active dense experts of width ``shared_d_ff`` each (default ``d_ff``),
            added to the routed output (DeepSeek-MoE style), stored fused as one FFN.
        shared_d_ff: width of each shared expert.
        shared_expert_gate: multiply the shared experts' output per token by sigmoid(x · w_shared_gate),
            ``w_shared_gate`` a [D, 1] parameter (Qwen2-MoE); needs ``num_shared_experts >= 1``.
        group_size: tokens per routing group (capacity is per group). ``None``: one group per sequence.
        capacity_multiple: round C up to a multiple of this (hardware-friendly buffer shapes).
        batch_prioritized: capacity priority by top-1 gate value instead of position (V-MoE BPR).
        jitter_noise: multiplicative uniform noise on the router input in training, x·U(1−ε, 1+ε).
        selection_bias: keep a per-expert selection bias (aux-loss-free balancing, DeepSeek-V3). It is
            added to the router scores for selection only (gates stay unbiased).
        selection_bias_rate: with ``selection_bias``, every training call (``deterministic=False``)
            updates the bias by ``update_selection_bias(bias, this call's expert_load, rate)`` after routing
            with the old bias; 0 freezes it (then update it yourself). Training steps that merge the model
            inside ``jax.grad`` must carry the new ``SelectionBias`` state out (``train/step.py`` does).
        causal: the layer sits in a causal decoder. Token choice then fills capacity in position order
            (all K choices of a token before the next token's), so no token's output depends on later
            tokens; expert choice and batch-prioritized routing (both look at later tokens of the group)
            raise unless ``allow_noncausal_routing``.
        allow_noncausal_routing: accept expert choice / batch-prioritized routing in a causal decoder.
        grouped_backend: the grouped dispatcher's matmuls: ``core`` (the core + overflow layout,
            ``core_layout.py``), a ``grouped_matmul.gmm`` backend, or ``auto`` (the platform's grouped
            kernels on TPU / Hopper GPUs, ``core`` elsewhere).
        expert_parallel: ``gspmd`` (sharding constraints on the dispatched buffers; the compiler inserts
            the all-to-all) or ``shard_map`` (explicit ``all_to_all`` of capacity buffers over the
            ``expert`` mesh axis, see ``expert_parallel.py``; needs a mesh, ignores ``dispatch``).
        ep_transport: with ``expert_parallel="shard_map"``: ``capacity`` (all-to-all of capacity buffers;
            dropless routing pads them to C = S), ``ring`` (all-gather the tokens over ``expert``, local
            grouped experts, reduce-scatter) or ``ragged`` (``ragged_all_to_all`` of exactly the routed
            rows). ``ring`` and ``ragged`` run the local experts with ``grouped_backend``.
        dtype: compute dtype of the expert matmuls and of the output.
        param_dtype: parameter dtype.
        rngs: ``nnx.Rngs`` for initialisation (and the ``jitter`` stream, if jitter is on).

    Raises:
        ValueError: an argument is out of range or unknown (the message names it and the allowed values).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        *,
        router: str = routing_lib.TOKEN_CHOICE,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None | str = "same",
        normalize_gates: bool = True,
        score_fn: str = routing_lib.SOFTMAX,
        routed_scaling_factor: float = 1.0,
        activation: str = "swiglu",
        dispatch: str = "auto",
        num_shared_experts: int = 0,
        shared_d_ff: int | None = None,
        shared_expert_gate: bool = False,
        group_size: int | None = None,
        capacity_multiple: int = 1,
        batch_prioritized: bool = False,
        jitter_noise: float = 0.0,
        selection_bias: bool = False,
        selection_bias_rate: float = 1e-3,
        causal: bool = False,
        allow_noncausal_routing: bool = False,
        grouped_backend: str = "auto",
        expert_parallel: str = "gspmd",
        ep_transport: str = "capacity",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_positive_int("d_model", d_model)
        _check_positive_int("d_ff", d_ff)
        _check_positive_int("num_experts", num_experts)
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k!r} must be an integer in [1, num_experts={num_experts}]")
        if router not in routing_lib.ROUTERS:
            raise ValueError(f"router={router!r} is unknown; choose one of {routing_lib.ROUTERS}")
        if score_fn not in routing_lib.SCORE_FNS:
            raise ValueError(f"score_fn={score_fn!r} is unknown; choose one of {routing_lib.SCORE_FNS}")
        if score_fn != routing_lib.SOFTMAX and router != routing_lib.TOKEN_CHOICE:
            raise ValueError(
                f"score_fn={score_fn!r} needs router='token_choice'; expert choice ranks softmax "
                "probabilities (use score_fn='softmax')"
            )
        rsf = routed_scaling_factor
        if isinstance(rsf, bool) or not isinstance(rsf, int | float) or not rsf > 0:
            raise ValueError(f"routed_scaling_factor={routed_scaling_factor!r} must be > 0")
        if eval_capacity_factor == "same":
            eval_capacity_factor = capacity_factor
        for name, value in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value!r} must be > 0, or None for dropless routing")
        if dispatch not in DISPATCH_CHOICES:
            raise ValueError(f"dispatch={dispatch!r} is unknown; choose one of {DISPATCH_CHOICES}")
        experts_lib.check_activation(activation)
        if grouped_backend not in dispatch_lib.GROUPED_BACKENDS:
            choices = dispatch_lib.GROUPED_BACKENDS
            raise ValueError(f"grouped_backend={grouped_backend!r} is unknown; choose one of {choices}")
        if expert_parallel not in EXPERT_PARALLEL_CHOICES:
            raise ValueError(
                f"expert_parallel={expert_parallel!r} is unknown; choose one of {EXPERT_PARALLEL_CHOICES}"
            )
        check_ep_transport(ep_transport, expert_parallel)
        if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={num_shared_experts!r} must be an integer >= 0")
        if shared_expert_gate and not num_shared_experts:
            raise ValueError(
                f"shared_expert_gate={shared_expert_gate!r} gates the shared experts but "
                f"num_shared_experts={num_shared_experts}; set num_shared_experts >= 1"
            )
        if group_size is not None:
            _check_positive_int("group_size", group_size)
        _check_positive_int("capacity_multiple", capacity_multiple)
        if not selection_bias_rate >= 0:
            raise ValueError(f"selection_bias_rate={selection_bias_rate!r} must be >= 0")
        if not 0.0 <= jitter_noise < 1.0:
            raise ValueError(f"jitter_noise={jitter_noise!r} must be in [0, 1)")
        if router == routing_lib.EXPERT_CHOICE and causal and not allow_noncausal_routing:
            raise ValueError(
                "router='expert_choice' in a causal decoder (causal=True) lets a token's output depend on "
                "later tokens of its group; use router='token_choice', or pass allow_noncausal_routing=True"
            )
        if batch_prioritized and causal and not allow_noncausal_routing:
            raise ValueError(
                "batch_prioritized=True in a causal decoder (causal=True) ranks tokens by gates of later "
                "tokens of the group; use batch_prioritized=False, or pass allow_noncausal_routing=True"
            )

        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.router_type = router
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.normalize_gates = normalize_gates
        self.score_fn = score_fn
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.activation = activation
        self.dispatch = dispatch
        self.group_size = group_size
        self.capacity_multiple = capacity_multiple
        self.batch_prioritized = batch_prioritized
        self.causal = causal
        self.jitter_noise = jitter_noise
        self.grouped_backend = grouped_backend
        self.expert_parallel = expert_parallel
        self.ep_transport = ep_transport
        self.dtype, self.param_dtype = dtype, param_dtype
        # Training mode by default; ``module.eval()`` sets it (eval capacity factor, no jitter).
        self.deterministic = False

        gated = experts_lib.ACTIVATIONS[activation][1]
        E, D, F = num_experts, d_model, d_ff
        self.router = sharding.param(
            nnx.initializers.lecun_normal()(rngs.params(), (D, E), param_dtype), ("embed", None)
        )
        init_in, init_out = _expert_init(1, 2), _expert_init(1, 2)
        self.w_gate = (
            sharding.param(init_in(rngs.params(), (E, D, F), param_dtype), ("expert", "embed", "mlp"))
            if gated
            else None
        )
        self.w_up = sharding.param(init_in(rngs.params(), (E, D, F), param_dtype), ("expert", "embed", "mlp"))
        self.w_down = sharding.param(
            init_out(rngs.params(), (E, F, D), param_dtype), ("expert", "mlp", "embed")
        )

        self.num_shared_experts = num_shared_experts
        if num_shared_experts:
            Fs = num_shared_experts * (shared_d_ff or d_ff)
            dense_init = nnx.initializers.lecun_normal()
            self.shared_w_gate = (
                sharding.param(dense_init(rngs.params(), (D, Fs), param_dtype), ("embed", "mlp"))
                if gated
                else None
            )
            self.shared_w_up = sharding.param(
                dense_init(rngs.params(), (D, Fs), param_dtype), ("embed", "mlp")
            )
            self.shared_w_down = sharding.param(
                dense_init(rngs.params(), (Fs, D), param_dtype), ("mlp", "embed")
            )
        self.selection_bias = SelectionBias(jnp.zeros((E,), jnp.float32)) if selection_bias else None
        self.selection_bias_rate = selection_bias_rate
        self.jitter_rngs = nnx.Rngs(jitter=rngs.params()) if jitter_noise > 0 else None
        # Drawn last, and only when enabled, so every other parameter (and the jitter key) is the same draw
        # as in a layer without the gate.
        self.w_shared_gate = (
            sharding.param(
                nnx.initializers.lecun_normal()(rngs.params(), (D, 1), param_dtype), ("embed", None)
            )
            if shared_expert_gate
            else None
        )

    # -- helpers -------------------------------------------------------------------------------------------

    def _capacity(self, tokens_per_group: int, capacity_factor: float | None) -> int | None:
        if capacity_factor is None:
            if self.router_type == routing_lib.EXPERT_CHOICE:
                capacity_factor = 1.0
            else:
                return None
        c = routing_lib.capacity_per_group(tokens_per_group, self.num_experts, self.top_k, capacity_factor)
        return -(-c // self.capacity_multiple) * self.capacity_multiple

    def _dispatcher(self, capacity: int | None) -> str:
        if self.dispatch != "auto":
            return self.dispatch
        if capacity is None:
            return "grouped"
        return "einsum" if jax.default_backend() == "tpu" else "indices"

    def _weights(self):
        cast = lambda p: None if p is None else p[...].astype(self.dtype)
        return cast(self.w_gate), cast(self.w_up), cast(self.w_down)

    # -- forward -------------------------------------------------------------------------------------------

    def __call__(
        self, x_BLD: jax.Array, *, mask_BL: jax.Array | None = None, deterministic: bool | None = None
    ) -> tuple[jax.Array, dict]:
        """Applies the layer.

        Args:
            x_BLD: input tokens.
            mask_BL: True for real tokens. Padding is never routed (its routed output is zero) and is left
                out of the losses and metrics.
            deterministic: evaluation mode (no jitter, ``eval_capacity_factor``); defaults to
                ``self.deterministic``, which ``module.eval()`` / ``module.train()`` set.

        Returns:
            ``(y_BLD, aux)``; ``aux`` holds ``load_balancing_loss``, ``router_z_loss``, ``expert_load`` [E],
            ``dropped_fraction``, ``router_entropy`` and ``max_load_ratio`` (see ``routing.aux_from_stats``).
        """
        if x_BLD.ndim != 3:
            raise ValueError(f"x must have shape [batch, length, d_model]; got shape {x_BLD.shape}")
        if x_BLD.shape[-1] != self.d_model:
            raise ValueError(
                f"input last dim {x_BLD.shape[-1]} != d_model={self.d_model}; pass x of shape "
                f"[batch, length, {self.d_model}]"
            )
        deterministic = self.deterministic if deterministic is None else deterministic
        B, L, D = x_BLD.shape
        T = B * L
        if self.group_size is None:
            G, S = B, L
        else:
            if T % self.group_size:
                raise ValueError(
                    f"group_size={self.group_size} must divide the {T} tokens of the batch (batch {B} × "
                    f"length {L})"
                )
            G, S = T // self.group_size, self.group_size
        x_GSD = sharding.constrain(x_BLD.reshape(G, S, D), ("act_batch", "act_length", "act_embed"))
        x32_GSD = x_GSD.astype(jnp.float32)
        mask_GS = None if mask_BL is None else mask_BL.reshape(G, S)

        router_in_GSD = x32_GSD
        if self.jitter_noise > 0 and not deterministic:
            noise = jax.random.uniform(
                self.jitter_rngs.jitter(),
                x_GSD.shape,
                jnp.float32,
                1.0 - self.jitter_noise,
                1.0 + self.jitter_noise,
            )
            router_in_GSD = router_in_GSD * noise
        # True float32 routing: default f32 matmuls are TF32 on GPU and bf16 passes on TPU, which can flip
        # the top-K choice of near-tied tokens relative to float32.
        logits_GSE = jnp.matmul(
            router_in_GSD, self.router[...].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )

        capacity = self._capacity(S, self.eval_capacity_factor if deterministic else self.capacity_factor)
        bias_E = None if self.selection_bias is None else self.selection_bias[...]
        route = functools.partial(self._route, capacity=capacity, bias_E=bias_E)
        w_gate, w_up, w_down = self._weights()
        x_GSD = x_GSD.astype(self.dtype)
        # Dropless through a capacity buffer: S slots per expert hold every assignment of a group.
        buffer_capacity = S if capacity is None else min(capacity, S)
        experts_ECD = functools.partial(
            experts_lib.expert_ffn_ECD,
            w_gate_EDF=w_gate,
            w_up_EDF=w_up,
            w_down_EFD=w_down,
            activation=self.activation,
        )

        if self.expert_parallel == "shard_map":
            mask_GS = jnp.ones((G, S), bool) if mask_GS is None else mask_GS
            y_GSD, stats = expert_parallel_lib.expert_parallel_moe(
                x_GSD,
                logits_GSE,
                mask_GS,
                (w_gate, w_up, w_down),
                route=route,
                num_experts=self.num_experts,
                capacity=buffer_capacity,
                activation=self.activation,
                transport=self.ep_transport,
                grouped_backend=dispatch_lib.resolve_grouped_backend(
                    self.grouped_backend, jnp.dtype(self.dtype)
                ),
            )
            aux = routing_lib.aux_from_stats(stats)
        else:
            routing = route(logits_GSE, mask_GS)
            aux = routing.aux
            kind = self._dispatcher(capacity)
            if kind == "grouped":
                backend = dispatch_lib.resolve_grouped_backend(self.grouped_backend, jnp.dtype(self.dtype))
                # Under fsdp the weights' embed dim is gathered first, as for every other weight; grouped
                # matmuls on embed-sharded weights make GSPMD replicate whole activation gradients.
                gathered = lambda w, axes: None if w is None else sharding.constrain(w, axes)
                experts_grouped = functools.partial(
                    experts_lib.expert_ffn_grouped,
                    w_gate_EDF=gathered(w_gate, ("expert", "act_embed", "mlp")),
                    w_up_EDF=gathered(w_up, ("expert", "act_embed", "mlp")),
                    w_down_EFD=gathered(w_down, ("expert", "mlp", "act_embed")),
                    activation=self.activation,
                    backend=backend,
                )
                y_GSD = dispatch_lib.dispatch_grouped(
                    x_GSD,
                    routing,
                    self.num_experts,
                    experts_grouped,
                    layout="core" if backend == "core" else "sorted",
                )
            else:
                fn = dispatch_lib.dispatch_einsum if kind == "einsum" else dispatch_lib.dispatch_indices
                y_GSD = fn(x_GSD, routing, self.num_experts, buffer_capacity, experts_ECD)

        if self.selection_bias is not None and self.selection_bias_rate > 0 and not deterministic:
            self.selection_bias[...] = routing_lib.update_selection_bias(
                bias_E, jax.lax.stop_gradient(aux["expert_load"]), self.selection_bias_rate
            )

        if self.num_shared_experts:
            cast = lambda p: None if p is None else p[...].astype(self.dtype)
            shared_TD = experts_lib.dense_ffn(
                x_GSD.reshape(T, D),
                cast(self.shared_w_gate),
                cast(self.shared_w_up),
                cast(self.shared_w_down),
                self.activation,
            )
            shared_GSD = shared_TD.reshape(G, S, D).astype(jnp.float32)
            if self.w_shared_gate is not None:
                # Full float32 like the router logits (one dot per token): no TF32 / bf16 passes in the gate.
                gate_logit_GS1 = jnp.matmul(
                    x32_GSD,
                    self.w_shared_gate[...].astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST,
                )
                shared_GSD = shared_GSD * jax.nn.sigmoid(gate_logit_GS1)
            y_GSD = y_GSD + shared_GSD
        y_BLD = sharding.constrain(y_GSD.reshape(B, L, D), ("act_batch", "act_length", "act_embed"))
        return y_BLD.astype(self.dtype), aux

    def _route(self, logits_GSE, mask_GS, *, capacity, bias_E) -> routing_lib.Routing:
        if self.router_type == routing_lib.TOKEN_CHOICE:
            return routing_lib.route_token_choice(
                logits_GSE,
                top_k=self.top_k,
                capacity=capacity,
                normalize_gates=self.normalize_gates,
                batch_prioritized=self.batch_prioritized,
                token_major_priority=self.causal and not self.batch_prioritized,
                selection_bias_E=bias_E,
                mask_GS=mask_GS,
                score_fn=self.score_fn,
                routed_scaling_factor=self.routed_scaling_factor,
            )
        return routing_lib.route_expert_choice(
            logits_GSE,
            capacity=capacity,
            top_k=self.top_k,
            selection_bias_E=bias_E,
            mask_GS=mask_GS,
            routed_scaling_factor=self.routed_scaling_factor,
        )


def check_ep_transport(ep_transport: str, expert_parallel: str) -> None:
    """Raises ValueError for an unknown transport, or one that needs ``expert_parallel='shard_map'``."""
    if ep_transport not in expert_parallel_lib.TRANSPORTS:
        raise ValueError(
            f"ep_transport={ep_transport!r} is unknown; choose one of {expert_parallel_lib.TRANSPORTS}"
        )
    if ep_transport != "capacity" and expert_parallel != "shard_map":
        raise ValueError(
            f"ep_transport={ep_transport!r} is a shard_map transport but "
            f"expert_parallel={expert_parallel!r}; set expert_parallel='shard_map' "
            "(or ep_transport='capacity')"
        )


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
