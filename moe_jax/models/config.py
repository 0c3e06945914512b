"""Model configs: ONE :class:`MoeConfig` for every MoE layer, ONE strict ``from_mapping`` for every section.

Every model config is a frozen dataclass built from its config section (``config.model``,
``config.model.moe``, ``config.model.vision``, ``config.model.vision.moe``) with
:meth:`Section.from_mapping`, which refuses unknown keys and invalid values with one line naming the full
path::

    config.model.moe.num_expertz is not a field; known: batch_prioritized, capacity_factor, ...
    config.model.moe.top_k=9 must be in [1, num_experts=4]

Which layers are MoE: ``MoeConfig.layers``, the 0-based indices (per stack) of the blocks whose FFN is an
MoE layer; every other block has a dense FFN. ``None`` means the model family's default,
:func:`alternate_layers` (blocks 1, 3, 5, ...: the encoder-decoder, the decoder LM, the VLM decoder, the
feature classifier) or :func:`vmoe_layers` (every other block of the last half: the ViT); ``()`` is a dense
model. Any pattern is a tuple, e.g. the first N blocks dense: ``layers=tuple(range(N, num_layers))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax.numpy as jnp
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.moe import dispatch as dispatch_lib
from moe_jax.moe import experts as experts_lib
from moe_jax.moe import routing as routing_lib
from moe_jax.moe.expert_parallel import TRANSPORTS
from moe_jax.moe.layer import DISPATCH_CHOICES, EXPERT_PARALLEL_CHOICES, MoeLayer

NORMS = ("rmsnorm", "layernorm")


# -- checks: each raises ConfigError("<field>=<value> <requirement>"), the field relative to its section -----


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """Raises a ConfigError naming ``name`` unless ``value`` is an integer ≥ ``minimum`` (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name}={value!r} must be {what}")


def check_optional_int(name: str, value: Any) -> None:
    """Like :func:`check_int` (≥ 1), but ``None`` is allowed."""
    if value is not None:
        check_int(name, value)


def check_choice(name: str, value: Any, choices) -> None:
    """Raises a ConfigError naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}={value!r} is unknown; choose one of {tuple(choices)}")


def check_bool(name: str, value: Any) -> None:
    """Raises a ConfigError naming ``name`` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be True or False")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_dtype(name: str, value: Any) -> None:
    """Raises a ConfigError naming ``name`` unless ``value`` names a floating-point dtype."""
    try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ConfigError(f"{name}={value!r} is not a floating-point dtype (e.g. 'float32', 'bfloat16')")


def check_model_widths(cfg: Any, names: tuple[str, ...]) -> None:
    """The checks every model section shares: widths, activation, norm, dtypes and heads."""
    for name in names:
        check_int(name, getattr(cfg, name))
    check_choice("activation", cfg.activation, sorted(experts_lib.ACTIVATIONS))
    check_choice("norm", cfg.norm, NORMS)
    check_dtype("dtype", cfg.dtype)
    check_dtype("param_dtype", cfg.param_dtype)
    head_dim = getattr(cfg, "head_dim", None)
    check_optional_int("head_dim", head_dim)
    if head_dim is None and cfg.d_model % cfg.num_heads:
        extra = " (or set head_dim)" if hasattr(cfg, "head_dim") else ""
        raise ConfigError(f"d_model={cfg.d_model} must be divisible by num_heads={cfg.num_heads}{extra}")


# -- which layers are MoE ------------------------------------------------------------------------------------


def alternate_layers(num_layers: int) -> tuple[int, ...]:
    """Every other block, the second of each pair: 1, 3, 5, ... (the Transformer default)."""
    return tuple(range(1, num_layers, 2))


def vmoe_layers(num_layers: int) -> tuple[int, ...]:
    """V-MoE's default: every other block of the last half, counted back from the last block (8 → 5, 7)."""
    return tuple(i for i in range(num_layers // 2, num_layers) if (num_layers - 1 - i) % 2 == 0)


# -- strict sections -----------------------------------------------------------------------------------------


class Section:
    """Mixin for a frozen config dataclass: one strict :meth:`from_mapping` for every config section.

    ``_sections`` maps a field name to the class of a nested section (``moe`` → :class:`MoeConfig`); a
    mapping given for it is built with that class's ``from_mapping`` under ``<path>.<name>``, starting from
    the field's default (so ``ViTConfig``'s ``moe`` keeps its batch-prioritized default when the mapping
    omits it). Checks in ``__post_init__`` raise :class:`~moe_jax.errors.ConfigError` messages that begin
    with the field's name relative to the section; ``from_mapping`` prefixes the section's path.
    """

    _sections: ClassVar[dict[str, type]] = {}

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any] | None = None, *, path: str = "config.model", **overrides
    ):
        """Builds the section from a config mapping (``config.model.to_dict()``) plus keyword overrides.

        Args:
            values: the section's fields; nested sections may be mappings or built configs.
            path: the section's place in the config, used in error messages.
            **overrides: fields set by the caller (``vocab_size`` from the tokenizer); they win over
                ``values``.

        Raises:
            ConfigError: one line naming ``<path>.<field>``: an unknown key, a missing required field or an
                invalid value.
        """
        kwargs = {**dict(values or {}), **overrides}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            key = unknown[0]
            home = [n for n, sub in cls._sections.items() if key in {f.name for f in dataclasses.fields(sub)}]
            hint = f" (it belongs in {path}.{home[0]})" if home else ""
            raise ConfigError(f"{path}.{key} is not a field{hint}; known: {', '.join(sorted(fields))}")
        required = [
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in kwargs]
        if missing:
            raise ConfigError(f"{path}.{missing[0]} is required")
        for name, section_cls in cls._sections.items():
            sub = kwargs.get(name)
            if isinstance(sub, Mapping):
                f = fields[name]
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
                base = {} if default is None else _shallow_fields(default)
                kwargs[name] = section_cls.from_mapping({**base, **sub}, path=f"{path}.{name}")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{path}.{e}") from None


def _shallow_fields(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


@dataclasses.dataclass(frozen=True)
class MoeConfig(Section):
    """Everything a config says about its MoE layers (``config.model.moe``): the layer arguments and where.

    Attributes:
        num_experts: E routed experts per MoE layer.
        top_k: K experts per token (token choice), 1 ≤ K ≤ E; for expert choice it sets the capacity.
        d_ff: expert width; ``None`` is the model's ``d_ff``.
        layers: block indices (per stack) with an MoE FFN; ``None`` is the model family's default (see the
            module docstring), ``()`` a dense model.
        router: ``token_choice`` (top-K of the router scores; softmax K=1 is Switch) or ``expert_choice``.
        capacity_factor: capacity per expert relative to a balanced load; ``None`` is dropless.
        eval_capacity_factor: the capacity factor at evaluation; ``"same"`` is ``capacity_factor``.
        normalize_gates: renormalise each token's K gates to sum to one (Mixtral, DeepSeek-V3; OLMoE and
            Qwen-MoE do not).
        score_fn: router scores: ``softmax`` over experts, or ``sigmoid`` per expert (DeepSeek-V3; token
            choice only). Sigmoid selects by top-K of score + selection bias and gates by the selected scores;
            the balance loss and entropy use the scores normalised per token (see ``MoeLayer``). No
            group-limited selection (DeepSeek's n_group / topk_group).
        routed_scaling_factor: multiplies the routed experts' combine weights after renormalisation
            (DeepSeek-V3: 2.5); > 0.
        batch_prioritized: fill capacity by each token's top-1 gate instead of its position (V-MoE); a
            causal decoder refuses it unless ``allow_noncausal_routing``.
        capacity_multiple: round capacity up to a multiple of this.
        dispatch: ``auto``, ``einsum``, ``indices`` or ``grouped``.
        grouped_backend: the dropless matmuls: ``auto``, ``core`` or a ``grouped_matmul`` backend.
        expert_parallel: ``gspmd`` or ``shard_map`` (explicit collectives over the ``expert`` mesh axis).
        ep_transport: the ``shard_map`` token transport: ``capacity`` (all-to-all of capacity buffers),
            ``ring`` (all-gather tokens over ``expert``, reduce-scatter outputs) or ``ragged``
            (``ragged_all_to_all`` of exactly the routed rows; emulated on CPU). See
            ``moe/expert_parallel.py``.
        group_size: tokens per routing group (capacity is per group); ``None`` is one group per sequence
            (per image in the ViT).
        num_shared_experts: always-active dense experts added to the routed output.
        shared_d_ff: width of each shared expert; ``None`` is the expert width.
        shared_expert_gate: scale the shared experts' output per token by sigmoid(x · w_shared_gate)
            (Qwen2-MoE); needs ``num_shared_experts >= 1``.
        jitter_noise: multiplicative router-input noise in training, x·U(1−ε, 1+ε).
        selection_bias: aux-loss-free balancing (DeepSeek-V3), updated every training step.
        selection_bias_rate: the bias update per step.
        allow_noncausal_routing: accept expert choice / batch-prioritized routing in a causal decoder.
    """

    num_experts: int = 8
    top_k: int = 2
    d_ff: int | None = None
    layers: tuple[int, ...] | None = None
    router: str = routing_lib.TOKEN_CHOICE
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None | str = "same"
    normalize_gates: bool = True
    score_fn: str = routing_lib.SOFTMAX
    routed_scaling_factor: float = 1.0
    batch_prioritized: bool = False
    capacity_multiple: int = 1
    dispatch: str = "auto"
    grouped_backend: str = "auto"
    expert_parallel: str = "gspmd"
    ep_transport: str = "capacity"
    group_size: int | None = None
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    jitter_noise: float = 0.0
    selection_bias: bool = False
    selection_bias_rate: float = 1e-3
    allow_noncausal_routing: bool = False

    def __post_init__(self):
        check_int("num_experts", self.num_experts)
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ConfigError(f"top_k={self.top_k!r} must be in [1, num_experts={self.num_experts}]")
        check_optional_int("d_ff", self.d_ff)
        if self.layers is not None:
            if isinstance(self.layers, str) or not isinstance(self.layers, tuple | list):
                raise ConfigError(f"layers={self.layers!r} must be a tuple of block indices, or None")
            layers = tuple(self.layers)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ConfigError(f"layers={layers!r} must hold block indices >= 0")
            if len(set(layers)) != len(layers):
                raise ConfigError(f"layers={layers!r} lists a block twice")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        check_choice("router", self.router, routing_lib.ROUTERS)
        cf = self.capacity_factor
        if cf is not None and not (_is_number(cf) and cf > 0):
            raise ConfigError(f"capacity_factor={cf!r} must be a number > 0, or None for dropless routing")
        ecf = self.eval_capacity_factor
        if ecf != "same" and ecf is not None and not (_is_number(ecf) and ecf > 0):
            raise ConfigError(
                f"eval_capacity_factor={ecf!r} must be a number > 0, None (dropless) or 'same' (the "
                "training capacity_factor)"
            )
        check_choice("score_fn", self.score_fn, routing_lib.SCORE_FNS)
        if self.score_fn != routing_lib.SOFTMAX and self.router != routing_lib.TOKEN_CHOICE:
            raise ConfigError(
                f"score_fn={self.score_fn!r} needs router='token_choice' (router={self.router!r} ranks "
                "softmax probabilities); use score_fn='softmax'"
            )
        rsf = self.routed_scaling_factor
        if not (_is_number(rsf) and rsf > 0):
            raise ConfigError(f"routed_scaling_factor={rsf!r} must be a number > 0")
        names = ("normalize_gates", "batch_prioritized", "selection_bias", "allow_noncausal_routing")
        for name in names + ("shared_expert_gate",):
            check_bool(name, getattr(self, name))
        check_int("capacity_multiple", self.capacity_multiple)
        check_choice("dispatch", self.dispatch, DISPATCH_CHOICES)
        check_choice("grouped_backend", self.grouped_backend, dispatch_lib.GROUPED_BACKENDS)
        check_choice("expert_parallel", self.expert_parallel, EXPERT_PARALLEL_CHOICES)
        check_choice("ep_transport", self.ep_transport, TRANSPORTS)
        if self.ep_transport != "capacity" and self.expert_parallel != "shard_map":
            raise ConfigError(
                f"ep_transport={self.ep_transport!r} needs expert_parallel='shard_map' (got "
                f"{self.expert_parallel!r}); set model.moe.expert_parallel='shard_map'"
            )
        check_optional_int("group_size", self.group_size)
        check_int("num_shared_experts", self.num_shared_experts, 0)
        check_optional_int("shared_d_ff", self.shared_d_ff)
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ConfigError(
                "shared_expert_gate=True gates the shared experts but num_shared_experts=0; set "
                "num_shared_experts >= 1"
            )
        if not (_is_number(self.jitter_noise) and 0.0 <= self.jitter_noise < 1.0):
            raise ConfigError(f"jitter_noise={self.jitter_noise!r} must be in [0, 1)")
        if not (_is_number(self.selection_bias_rate) and self.selection_bias_rate >= 0):
            raise ConfigError(f"selection_bias_rate={self.selection_bias_rate!r} must be a number >= 0")

    def layer_indices(
        self, num_layers: int, default: Callable[[int], tuple[int, ...]] = alternate_layers
    ) -> tuple[int, ...]:
        """The MoE blocks of a stack of ``num_layers`` (``default`` when ``layers`` is None).

        Indices at or past ``num_layers`` (a shorter stack of an encoder-decoder) are left out.
        """
        layers = default(num_layers) if self.layers is None else self.layers
        return tuple(i for i in layers if i < num_layers)

    def check_layers(self, num_layers: int, depth: str) -> None:
        """Raises a ConfigError (``moe.layers=...``) when an index is past ``num_layers`` blocks.

        ``depth`` says where ``num_layers`` comes from (``"num_layers=4"``).
        """
        bad = [i for i in self.layers or () if i >= num_layers]
        if bad:
            raise ConfigError(
                f"moe.layers={self.layers} has indices {bad} outside [0, {num_layers}) ({depth})"
            )

    def causal_conflict(self) -> str | None:
        """Why these MoE layers cannot sit in a causal decoder (a ``moe.<field>=...`` message), or None.

        Expert choice and batch-prioritized routing rank a token against later tokens of its group, so a
        token's output would depend on the future.
        """
        if self.allow_noncausal_routing:
            return None
        fix = "or set allow_noncausal_routing=True"
        if self.router == routing_lib.EXPERT_CHOICE:
            return (
                f"moe.router={self.router!r} lets a token's output depend on later tokens in a causal "
                f"decoder; use router='token_choice', {fix}"
            )
        if self.batch_prioritized:
            return (
                "moe.batch_prioritized=True ranks tokens by the gates of later tokens in a causal decoder; "
                f"use batch_prioritized=False, {fix}"
            )
        return None

    def build(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str,
        causal: bool,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> MoeLayer:
        """The :class:`~moe_jax.moe.MoeLayer` of one block (the model supplies widths, activation, causality).

        Args:
            d_model: D of the block.
            d_ff: the model's dense FFN width, the expert width when ``self.d_ff`` is None.
            activation: FFN activation of the model.
            causal: the block is in a causal decoder (capacity filled token by token).
            dtype, param_dtype: compute and parameter dtypes.
            rngs: initialisation randomness.
        """
        return MoeLayer(
            d_model,
            self.d_ff or d_ff,
            self.num_experts,
            self.top_k,
            router=self.router,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            normalize_gates=self.normalize_gates,
            score_fn=self.score_fn,
            routed_scaling_factor=self.routed_scaling_factor,
            activation=activation,
            dispatch=self.dispatch,
            num_shared_experts=self.num_shared_experts,
            shared_d_ff=self.shared_d_ff,
            shared_expert_gate=self.shared_expert_gate,
            group_size=self.group_size,
            capacity_multiple=self.capacity_multiple,
            batch_prioritized=self.batch_prioritized,
            jitter_noise=self.jitter_noise,
            selection_bias=self.selection_bias,
            selection_bias_rate=self.selection_bias_rate,
            causal=causal,
            allow_noncausal_routing=self.allow_noncausal_routing,
            grouped_backend=self.grouped_backend,
            expert_parallel=self.expert_parallel,
            ep_transport=self.ep_transport,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )


def dtypes(cfg: Any) -> dict:
    """``{'dtype', 'param_dtype'}`` of a model config as numpy dtypes."""
    return {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
