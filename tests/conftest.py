"""Test setup: 8 simulated CPU devices, configured before JAX runs any operation."""

import os

# Force CPU even on a GPU host so the multi-device tests see the same 8 devices everywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Exact float32 references: keep XLA from using reduced-precision matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    """Fails (never skips) when the simulated devices are missing."""
    assert len(jax.devices()) == 8, f"expected 8 simulated CPU devices, got {jax.devices()}"


# Long cases (10-30 s each on 2 cores) that run in the slow set to keep the default suite within 15
# minutes; every one has faster siblings covering the same code in the default suite.
SLOW_CASES = {
    "tests/test_vlm.py::test_text_is_causal_and_sees_the_image",
    "tests/test_lm_generate.py::test_generation_continues_the_teacher_forced_argmax",
    "tests/test_moe_layer.py::test_forward_and_gradients_match_reference[token_choice-einsum-dropless]",
    "tests/test_moe_layer.py::test_fine_grained_many_small_experts",
    "tests/test_moe_layer.py::test_expert_choice_forward_and_gradients_match_reference[grouped-cf1.5]",
    "tests/test_moe_layer.py::test_padding_mask_group_size_shared_experts[einsum]",
    "tests/test_hf_interop.py::test_cached_greedy_generation_equals_transformers[qwen2_moe]",
    "tests/test_vit.py::test_train_vs_eval_capacity_and_batch_prioritized_routing",
    "tests/test_routing_cases.py::test_single_expert_is_the_dense_ffn",
    "tests/test_routing_cases.py::test_top_k_equal_to_num_experts_is_the_softmax_mixture[einsum]",
    "tests/test_trainer.py::test_nonfinite_loss_stops_with_step_and_keeps_checkpoint",
    "tests/test_moe_mesh.py::test_sharded_layer_matches_single_device[mesh_shape0-ep-indices]",
    "tests/test_hf_interop.py::test_project_model_exports_as_mixtral_with_equal_logits",
    "tests/test_remat.py::test_remat_gives_the_same_loss_and_gradients[full]",
}


@pytest.hookimpl(tryfirst=True)  # before -m 'not slow' deselects
def pytest_collection_modifyitems(config, items):
    found = set()
    for item in items:
        if item.nodeid in SLOW_CASES:
            item.add_marker(pytest.mark.slow)
            found.add(item.nodeid)
    # A renamed test must not silently return to the default suite or vanish from the slow set.
    if not any("::" in str(a) for a in config.args):
        collected_files = {item.nodeid.split("::")[0] for item in items}
        stale = {c for c in SLOW_CASES - found if c.split("::")[0] in collected_files}
        assert not stale, f"SLOW_CASES names tests that were not collected: {sorted(stale)}"
