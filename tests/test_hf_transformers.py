"""Our exports load in transformers and compute what we compute (the ``hf`` extra: transformers + torch).

Slow set: ``pip install -e '.[hf]'`` then ``pytest -m slow tests/test_hf_transformers.py``. Missing
transformers is a failure, not a skip.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.interop import hf
from moe_jax.train import decode

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
pytestmark = pytest.mark.slow


def _perturbed(name):
    """A fixture's model with every parameter moved (so the export is ours, not a copy of the file)."""
    model, config = hf.load(os.path.join(FIXTURES, name))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [x * (1.0 + 0.05 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    model.eval()
    return model, config


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "llama", "mistral", "qwen2"])
def test_export_loads_in_transformers_with_equal_logits_and_greedy_tokens(name, tmp_path):
    import torch
    import transformers

    model, config = _perturbed(name)
    out = str(tmp_path / name)
    hf.save(model, config, out, max_shard_size=100 * 1024)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        want = theirs(torch.from_numpy(ids)).logits.numpy()
    got, _ = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * np.abs(want).max())
    prompt = ids[:1, :6]
    with torch.no_grad():
        greedy = theirs.generate(
            torch.from_numpy(prompt),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 6:].numpy()
    ours = decode.generate(
        model, jnp.asarray(prompt, jnp.int32), jnp.asarray([6]), max_new_tokens=32, eos_id=-1
    )
    np.testing.assert_array_equal(np.asarray(ours[0]), greedy)


def test_project_and_upcycled_models_load_in_transformers(tmp_path):
    """A model built here (tied, sqrt(D)-scaled embeddings) and an upcycled Llama export as Mixtral."""
    import torch
    import transformers

    from moe_jax.models import DecoderLM, ModelConfig

    cfg = ModelConfig.from_mapping(
        dict(
            vocab_size=96,
            d_model=32,
            num_heads=4,
            num_kv_heads=2,
            d_ff=48,
            num_encoder_layers=0,
            num_decoder_layers=2,
            rope_theta=5e4,
            moe=dict(num_experts=4, top_k=2, layers=(0, 1), capacity_factor=None, eval_capacity_factor=None),
        )
    )
    scratch = DecoderLM(cfg, rngs=nnx.Rngs(5))
    scratch.eval()
    upcycled, up_config = hf.load(
        os.path.join(FIXTURES, "llama"), upcycle=dict(num_experts=4, top_k=2, noise_std=0.1)
    )
    for label, model, config in (("scratch", scratch, {}), ("upcycled", upcycled, up_config)):
        out = str(tmp_path / label)
        hf.save(model, config, out)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(theirs).__name__ == "MixtralForCausalLM"
        ids = np.random.default_rng(2).integers(1, model.cfg.vocab_size, (2, 12))  # id 0 pads here
        with torch.no_grad():
            want = theirs(torch.from_numpy(ids)).logits.numpy()
        got, _ = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids, jnp.int32))
        np.testing.assert_allclose(
            np.asarray(got), want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=label
        )
