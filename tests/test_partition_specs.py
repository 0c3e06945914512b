"""Golden PartitionSpecs per sharding preset for every parameter and optimizer-state leaf.

A change to ``moe_jax/sharding.py`` or to a module's logical axes shows up here as a diff against
``tests/golden/partition_specs.json``; change that file only on purpose:

    MOE_JAX_UPDATE_GOLDENS=1 python -m pytest tests/test_partition_specs.py
"""

import json
import os

import jax
import pytest
from flax import nnx

from moe_jax import sharding
from moe_jax.models import ModelConfig, Seq2SeqTransformer
from moe_jax.train import optim, step
from tests.test_configs import load_config

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "partition_specs.json")
MESH = {"data": 2, "fsdp": 2, "expert": 2}  # tensor gets 1; ep_tp below uses its own mesh
PRESET_MESHES = {p: MESH for p in sharding.PRESETS} | {"ep_tp": {"data": 2, "expert": 2, "tensor": 2}}


def specs_for(preset: str) -> dict[str, str]:
    config = load_config("translation", "smoke")
    tx, _ = optim.make_optimizer(config.optim, config.train.num_train_steps)

    def build():
        cfg = ModelConfig.from_mapping(config.model.to_dict(), vocab_size=64)
        model = Seq2SeqTransformer(cfg, bos_id=2, rngs=nnx.Rngs(params=0))
        return step.create_train_state(model, tx)[1]

    state = nnx.eval_shape(build)
    mesh = sharding.make_mesh(PRESET_MESHES[preset])
    shardings = sharding.state_shardings(state, mesh, sharding.preset_rules(preset))
    flat = jax.tree_util.tree_leaves_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    return {jax.tree_util.keystr(path): str(tuple(s.spec)) for path, s in flat}


def test_partition_specs_match_golden():
    table = {preset: specs_for(preset) for preset in sorted(sharding.PRESETS)}
    if os.environ.get("MOE_JAX_UPDATE_GOLDENS"):
        with open(GOLDEN, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        pytest.fail("goldens rewritten; review the diff and rerun without MOE_JAX_UPDATE_GOLDENS")
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert table == golden


def test_expert_weights_and_their_adam_moments_are_sharded_over_expert_under_ep():
    specs = specs_for("ep")
    # MoE layers' stacked weights are the rank-3 ones (dense FFNs use the same names at rank 2).
    expert_leaves = {k: v for k, v in specs.items() if ("w_up" in k or "w_down" in k) and v.count(",") == 2}
    assert any("opt_state" in k and "['mu']" in k for k in expert_leaves), sorted(expert_leaves)[:5]
    assert any("opt_state" in k and "['nu']" in k for k in expert_leaves), sorted(expert_leaves)[:5]
    assert expert_leaves and all(v.startswith("('expert'") for v in expert_leaves.values()), expert_leaves
