"""Hugging Face ``config.json`` ↔ the project's LM config (``configs/lm.py``'s shape), both directions.

Supported architectures (``config.json: architectures[0]``): the MoE decoders ``MixtralForCausalLM``,
``OlmoeForCausalLM``, ``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM`` and the dense decoders
``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` (the sources for sparse upcycling).

What each one maps to (all: pre-norm RMSNorm, RoPE, SwiGLU, grouped-query attention, no embedding scaling,
dropless routing):

* Mixtral: every block MoE (``num_local_experts`` experts of ``intermediate_size``), softmax top-K
  renormalised.
* OLMoE: every block MoE, top-K not renormalised (``norm_topk_prob``), q/k RMSNorm over the whole
  projection (``qk_norm='full'``).
* Qwen2-MoE: MoE on the blocks HF's ``mlp_only_layers`` / ``decoder_sparse_step`` select (experts of
  ``moe_intermediate_size``; dense blocks of ``intermediate_size``), one shared expert of
  ``shared_expert_intermediate_size`` behind a sigmoid gate, q/k/v biases.
* Qwen3-MoE: as Qwen2-MoE without shared expert or biases, per-head q/k RMSNorm (``qk_norm='head'``).
* Llama / Mistral / Qwen2: every block dense (Qwen2 with q/k/v biases).

Options the project does not implement are refused with a ``ValueError`` naming them: sliding-window
attention, RoPE scaling of any kind, partial rotary embeddings, attention or MLP biases other than
Qwen's q/k/v, OLMoE's ``clip_qkv``, Mixtral's router jitter (HF jitters the experts' input as well), an
activation other than SiLU, non-zero attention dropout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import ml_dtypes  # noqa: F401 - lets NumPy name bfloat16
import numpy as np

from moe_jax.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What distinguishes one supported Hugging Face architecture.

    Attributes:
        name: the ``architectures`` entry.
        model_type: HF's ``model_type``.
        moe: "mixtral" (``block_sparse_moe``, w1/w3/w2), "mlp" (``mlp.experts.N.{gate,up,down}_proj``) or
            None (dense).
        qk_norm: the project's ``qk_norm`` value.
        qkv_bias: q/k/v projection biases (Qwen2 family).
        shared_expert: Qwen2-MoE's gated shared expert.
        layer_pattern: MoE blocks chosen by ``mlp_only_layers`` / ``decoder_sparse_step`` (Qwen-MoE) rather
            than all of them.
    """

    name: str
    model_type: str
    moe: str | None
    qk_norm: str = "none"
    qkv_bias: bool = False
    shared_expert: bool = False
    layer_pattern: bool = False


ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("MixtralForCausalLM", "mixtral", "mixtral"),
        Architecture("OlmoeForCausalLM", "olmoe", "mlp", qk_norm="full"),
        Architecture(
            "Qwen2MoeForCausalLM", "qwen2_moe", "mlp", qkv_bias=True, shared_expert=True, layer_pattern=True
        ),
        Architecture("Qwen3MoeForCausalLM", "qwen3_moe", "mlp", qk_norm="head", layer_pattern=True),
        Architecture("LlamaForCausalLM", "llama", None),
        Architecture("MistralForCausalLM", "mistral", None),
        Architecture("Qwen2ForCausalLM", "qwen2", None, qkv_bias=True),
    )
}


def architecture(hf: dict[str, Any], where: str = "config.json") -> Architecture:
    """The :class:`Architecture` that ``config.json`` names.

    Raises:
        ValueError: none, several, or an unsupported one.
    """
    names = hf.get("architectures") or []
    if len(names) != 1:
        raise ValueError(f"{where}: 'architectures' must name one architecture, got {names!r}")
    if names[0] not in ARCHITECTURES:
        raise ValueError(
            f"{where}: architecture {names[0]!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[names[0]]


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    """RoPE theta from ``rope_parameters`` (transformers 5) or ``rope_theta`` / ``rope_scaling`` (4.x)."""
    params = hf.get("rope_parameters")
    if params is not None:
        kind = params.get("rope_type", "default")
        extra = sorted(set(params) - {"rope_type", "rope_theta"})
        if kind != "default" or extra:
            raise ValueError(
                f"{where}: rope_parameters={params} (RoPE scaling) is not implemented; only rope_type "
                "'default' with rope_theta"
            )
        return float(params.get("rope_theta", 10_000.0))
    if hf.get("rope_scaling"):
        raise ValueError(f"{where}: rope_scaling={hf['rope_scaling']} is not implemented")
    return float(hf.get("rope_theta", 10_000.0))


def _refuse_unsupported(hf: dict[str, Any], arch: Architecture, where: str) -> None:
    def refuse(key, why):
        raise ValueError(f"{where}: {key}={hf.get(key)!r} {why}")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "is not supported (SwiGLU with SiLU only)")
    if float(hf.get("attention_dropout", 0.0) or 0.0) != 0.0:
        refuse("attention_dropout", "is not implemented (set it to 0.0)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "is not implemented (full rotary embeddings only)")
    # Qwen configs carry a sliding_window size that only applies with use_sliding_window=True.
    if arch.model_type.startswith("qwen"):
        if hf.get("use_sliding_window"):
            refuse("use_sliding_window", "(sliding-window attention) is not implemented")
        if any(t != "full_attention" for t in hf.get("layer_types") or ()):
            refuse("layer_types", "has sliding-window layers, which are not implemented")
    elif hf.get("sliding_window") is not None:
        refuse("sliding_window", "(sliding-window attention) is not implemented; it must be null")
    if hf.get("attention_bias") and not arch.qkv_bias:
        refuse("attention_bias", "(biases on the attention projections) is not implemented")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", "is not implemented")
    if hf.get("clip_qkv") is not None:
        refuse("clip_qkv", "is not implemented; it must be null")
    if float(hf.get("router_jitter_noise", 0.0) or 0.0) != 0.0:
        refuse("router_jitter_noise", "is not implemented the way HF applies it (to the experts' input too)")
    if arch.qkv_bias and hf.get("qkv_bias", True) is False:
        refuse("qkv_bias", f"must be true for {arch.name}")


def _moe_layers(hf: dict[str, Any], arch: Architecture, num_layers: int) -> tuple[int, ...]:
    if not arch.layer_pattern:
        return tuple(range(num_layers))
    dense = set(hf.get("mlp_only_layers") or ())
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def _num_experts(hf: dict[str, Any]) -> int:
    for key in ("num_local_experts", "num_experts"):
        if hf.get(key):
            return int(hf[key])
    raise ValueError("config.json: no num_local_experts / num_experts")


def model_section(hf: dict[str, Any], where: str = "config.json") -> tuple[Architecture, dict[str, Any]]:
    """``(architecture, config.model as a dict)`` of a Hugging Face ``config.json``.

    Raises:
        ValueError: an unsupported architecture or option (naming it).
    """
    arch = architecture(hf, where)
    _refuse_unsupported(hf, arch, where)
    d_model, num_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    num_layers = int(hf["num_hidden_layers"])
    head_dim = hf.get("head_dim")
    head_dim = (
        None if head_dim in (None, d_model // num_heads) and d_model % num_heads == 0 else int(head_dim)
    )
    kv_heads = hf.get("num_key_value_heads")
    model = dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=d_model,
        num_heads=num_heads,
        num_kv_heads=None if kv_heads in (None, num_heads) else int(kv_heads),
        head_dim=head_dim,
        d_ff=int(hf["intermediate_size"]),
        num_encoder_layers=0,
        num_decoder_layers=num_layers,
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        positions="rope",
        rope_theta=_rope_theta(hf, where),
        qk_norm=arch.qk_norm,
        qkv_bias=arch.qkv_bias,
        logits_soft_cap=None,
        max_len=int(hf.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        scale_embeddings=False,
        pad_id=None,
        dropout_rate=0.0,
        dtype="float32",
        param_dtype="float32",
    )
    moe = dict(capacity_factor=None, eval_capacity_factor=None, layers=())
    if arch.moe is not None:
        moe.update(
            num_experts=_num_experts(hf),
            top_k=int(hf["num_experts_per_tok"]),
            layers=_moe_layers(hf, arch, num_layers),
            normalize_gates=True if arch.moe == "mixtral" else bool(hf.get("norm_topk_prob", False)),
            d_ff=int(
                hf["intermediate_size"]
                if arch.moe == "mixtral"
                else hf.get("moe_intermediate_size") or hf["intermediate_size"]
            ),
        )
        shared = int(hf.get("shared_expert_intermediate_size", 0) or 0) if arch.shared_expert else 0
        if shared:
            moe.update(num_shared_experts=1, shared_d_ff=shared, shared_expert_gate=True)
    model["moe"] = moe
    ModelConfig.from_mapping(model, path="config.model")  # every value valid for the project
    return arch, model


def lm_config(hf: dict[str, Any], where: str = "config.json") -> ml_collections.ConfigDict:
    """The project's LM config (``configs/lm.py``'s shape) for a Hugging Face ``config.json``.

    ``config.model`` is the imported architecture, ``config.data.vocab_size`` its vocabulary; training
    settings are ``configs/lm.py``'s defaults; ``config.hf`` keeps the architecture name and the original
    ``config.json`` (what :func:`hf_config` writes back: token ids, ``max_position_embeddings``, ...).
    """
    from moe_jax import config_lib

    arch, model = model_section(hf, where)
    c = config_lib.lm_config()
    moe = model.pop("moe")
    c.model.update(model)
    c.model.moe.update(moe)
    c.data.vocab_size = model["vocab_size"]
    if hf.get("router_aux_loss_coef") is not None and arch.moe is not None:
        c.loss.lb_weight = float(hf["router_aux_loss_coef"])
    c.hf = ml_collections.ConfigDict({"architecture": arch.name, "source_config": dict(hf)})
    return c


def infer_architecture(cfg: ModelConfig) -> Architecture:
    """The HF architecture that computes exactly what ``cfg`` computes.

    Raises:
        ValueError: ``cfg`` uses something none of the supported architectures has (naming it).
    """
    moe = cfg.moe
    layers = cfg.moe_layers(cfg.num_decoder_layers)
    if cfg.num_encoder_layers:
        raise ValueError("model.num_encoder_layers must be 0 (a decoder-only LM)")
    for field, want in (("activation", "swiglu"), ("norm", "rmsnorm"), ("positions", "rope")):
        if getattr(cfg, field) != want:
            raise ValueError(
                f"model.{field}={getattr(cfg, field)!r} has no Hugging Face equivalent here ({want!r})"
            )
    if cfg.logits_soft_cap is not None:
        raise ValueError("model.logits_soft_cap has no equivalent in the supported architectures")
    if not layers:
        return ARCHITECTURES["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"]
    if cfg.qk_norm != "none" and cfg.qkv_bias:
        raise ValueError("model.qk_norm with model.qkv_bias has no Hugging Face equivalent")
    if moe.score_fn != "softmax" or moe.routed_scaling_factor != 1.0 or moe.selection_bias:
        raise ValueError(
            "model.moe.score_fn / routed_scaling_factor / selection_bias (DeepSeek-style routing) have no "
            "equivalent in the supported architectures"
        )
    if moe.router != "token_choice":
        raise ValueError(f"model.moe.router={moe.router!r} has no equivalent (token choice only)")
    all_layers = layers == tuple(range(cfg.num_decoder_layers))
    if moe.num_shared_experts:
        if moe.num_shared_experts != 1 or not moe.shared_expert_gate or cfg.qk_norm != "none":
            raise ValueError(
                "model.moe shared experts export as Qwen2-MoE: one gated shared expert "
                "(num_shared_experts=1, shared_expert_gate=True) and no qk_norm"
            )
        return ARCHITECTURES["Qwen2MoeForCausalLM"]
    if cfg.qkv_bias:
        raise ValueError(
            "model.qkv_bias with MoE blocks exports as Qwen2-MoE, which needs a gated shared expert"
        )
    if cfg.qk_norm == "full":
        if not all_layers or moe.normalize_gates:
            raise ValueError("model.qk_norm='full' exports as OLMoE: every block MoE, normalize_gates=False")
        return ARCHITECTURES["OlmoeForCausalLM"]
    if cfg.qk_norm == "head":
        return ARCHITECTURES["Qwen3MoeForCausalLM"]
    if all_layers and moe.normalize_gates:
        return ARCHITECTURES["MixtralForCausalLM"]
    raise ValueError(
        f"model.moe.layers={layers} / normalize_gates={moe.normalize_gates} without qk_norm match no "
        "supported architecture (Mixtral: every block MoE, renormalised gates; set qk_norm='head' for "
        "Qwen3-MoE)"
    )


def hf_config(cfg: ModelConfig, arch: Architecture, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` as ``arch`` (``source``: the imported file's extra keys to keep).

    The embedding table is always written untied when ``cfg.scale_embeddings`` (the sqrt(D) factor is
    folded into ``embed_tokens``, which a tied head cannot share).
    """
    moe = cfg.moe
    layers = cfg.moe_layers(cfg.num_decoder_layers)
    head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    keep = {
        k: v
        for k, v in (source or {}).items()
        if k in ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "max_window_layers")
    }
    out = dict(
        keep,
        architectures=[arch.name],
        model_type=arch.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        head_dim=head_dim,
        num_hidden_layers=cfg.num_decoder_layers,
        intermediate_size=cfg.d_ff,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=(source or {}).get("max_position_embeddings", cfg.max_len),
        tie_word_embeddings=cfg.tie_embeddings and not cfg.scale_embeddings,
        attention_dropout=0.0,
        dtype=str(np.dtype(cfg.param_dtype)),  # the dtype the tensors are written in
    )
    if arch.model_type in ("mixtral", "mistral"):
        out["sliding_window"] = None
    if arch.model_type.startswith("qwen"):
        out["use_sliding_window"] = False
    if arch.qkv_bias and arch.model_type == "qwen2_moe":
        out["qkv_bias"] = True
    if arch.moe is None:
        return out
    if arch.moe == "mixtral":
        out.update(num_local_experts=moe.num_experts, intermediate_size=moe.d_ff or cfg.d_ff)
    else:
        out.update(num_experts=moe.num_experts, norm_topk_prob=moe.normalize_gates)
        if arch.model_type == "olmoe":
            out["intermediate_size"] = moe.d_ff or cfg.d_ff
    out["num_experts_per_tok"] = moe.top_k
    out["router_jitter_noise"] = 0.0
    out["output_router_logits"] = False
    if arch.layer_pattern:
        out.update(
            moe_intermediate_size=moe.d_ff or cfg.d_ff,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(cfg.num_decoder_layers) if i not in layers],
        )
    if arch.shared_expert:
        out["shared_expert_intermediate_size"] = moe.num_shared_experts * (
            moe.shared_d_ff or moe.d_ff or cfg.d_ff
        )
    return out
