"""configs/lm.py: every variant builds; the plan-only shapes hold the published parameter counts.

Each plan-only model is built abstractly (``nnx.eval_shape``: shapes, no memory) and counted two ways:
walking the model's parameters (``moe_jax.models.counting``) and a closed-form count written here from the
architecture's numbers. The two must agree exactly, and both must match the published total and active
(per-token) counts within 2% — the published figures are rounded to 2-3 significant digits (Qwen3's 3.35 B
is published as "3.3 B"; DeepSeek-V3's 37.6 B, with our MLA-sized attention, as "37 B").
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from flax import nnx

from moe_jax.models import DecoderLM, ModelConfig
from moe_jax.models.counting import abstract_model, parameter_counts

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (total, active) in billions, with sources in configs/lm.py's docstring.
PUBLISHED = {
    "mixtral_8x7b": (46.7, 12.9),
    "olmoe_1b_7b": (6.9, 1.3),
    "qwen3_moe_30b_a3b": (30.5, 3.3),
    "deepseek_v3": (671.0, 37.0),
}


def lm_config(variant: str):
    spec = importlib.util.spec_from_file_location("lm_config_file", ROOT / "configs" / "lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def closed_form_counts(c) -> tuple[int, int]:
    """Total and active parameters from the config's numbers (independent of the model code)."""
    m, moe = c.model, c.model.moe
    V, D, L = c.data.vocab_size, m.d_model, m.num_decoder_layers
    H, KV = m.num_heads, m.num_kv_heads or m.num_heads
    Dh = m.head_dim or D // H
    attn = 2 * D * H * Dh + 2 * D * KV * Dh + (3 * (H + 2 * KV) * Dh if m.qkv_bias else 0)
    norms = 2 * D + {"none": 0, "head": 2 * Dh, "full": H * Dh + KV * Dh}[m.qk_norm]
    moe_layers = set(moe.layers)
    E, K, F = moe.num_experts, moe.top_k, moe.d_ff
    routed = E * 3 * D * F
    shared = 3 * D * moe.num_shared_experts * (moe.shared_d_ff or F)
    total = active = V * D * (1 if m.tie_embeddings else 2) + D  # embeddings (+ head) and the final norm
    for layer in range(L):
        if layer in moe_layers:
            block = attn + norms + routed + D * E + shared
            total += block
            active += block - routed * (E - K) // E
        else:
            total += attn + norms + 3 * D * m.d_ff
            active += attn + norms + 3 * D * m.d_ff
    return total, active


@pytest.mark.parametrize(
    "variant",
    [v if v != "deepseek_v3" else pytest.param(v, marks=pytest.mark.slow) for v in sorted(PUBLISHED)],
)
def test_plan_only_parameter_counts_match_the_published_figures(variant):
    c = lm_config(variant)
    cfg = ModelConfig.from_mapping(c.model.to_dict(), vocab_size=c.data.vocab_size)
    model = abstract_model(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    counts = parameter_counts(model)
    total, active = closed_form_counts(c)
    assert (counts["total"], counts["active"]) == (total, active)
    published_total, published_active = PUBLISHED[variant]
    assert abs(total / 1e9 - published_total) <= 0.02 * published_total, total
    assert abs(active / 1e9 - published_active) <= 0.02 * published_active, active


def test_deepseek_v3_routes_like_deepseek():
    c = lm_config("deepseek_v3")
    moe = c.model.moe
    assert (moe.num_experts, moe.top_k, moe.num_shared_experts) == (256, 8, 1)
    assert moe.score_fn == "sigmoid" and moe.selection_bias and moe.routed_scaling_factor == 2.5
    assert tuple(moe.layers) == tuple(range(3, 61))  # the first 3 blocks are dense


@pytest.mark.parametrize("variant", ["default", "dense", "smoke", "lm1b", "c4"])
def test_trainable_variants_build(variant):
    c = lm_config(variant)
    cfg = ModelConfig.from_mapping(c.model.to_dict(), vocab_size=c.data.vocab_size)
    assert cfg.moe.capacity_factor is None and cfg.moe.eval_capacity_factor is None  # dropless LM
    if variant == "dense":
        assert cfg.moe_layers(cfg.num_decoder_layers) == ()


def test_dense_variant_matches_the_moe_default_in_active_parameters():
    moe, dense = lm_config("default"), lm_config("dense")
    counts = {}
    for name, c in (("moe", moe), ("dense", dense)):
        cfg = ModelConfig.from_mapping(c.model.to_dict(), vocab_size=c.data.vocab_size)
        model = abstract_model(lambda cfg=cfg: DecoderLM(cfg, rngs=nnx.Rngs(0)))
        counts[name] = parameter_counts(model)
    # Equal FFN compute per token: top-2 x expert width = the dense width; the MoE adds only its routers.
    router = 3 * moe.model.d_model * moe.model.moe.num_experts
    assert counts["moe"]["active"] == counts["dense"]["active"] + router
    assert counts["moe"]["total"] > 2 * counts["dense"]["total"]


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="mixtral_8x7b"):
        lm_config("mixtral")
