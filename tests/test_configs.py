"""Every config file and variant loads and validates; smoke variants train one step."""

import glob
import importlib.util
import os

import jax
import pytest
from flax import nnx

from moe_jax.models import ModelConfig, Seq2SeqTransformer
from moe_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, variant):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


VARIANTS = {
    "translation": ["default", "smoke", "large", "xl", "wmt14_de_en"],
    "summarization": ["default", "smoke", "cnn_dailymail", "xsum"],
}


def test_every_config_file_is_covered():
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert set(VARIANTS) <= files


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in VARIANTS.items() for v in vs])
def test_config_loads_validates_and_builds(name, variant):
    c = load_config(name, variant)
    assert c.task == name
    with c.unlocked():
        # Batch sizes of the big variants are multiples of 8, the simulated device count.
        trainer.validate_config(c)
    cfg = ModelConfig.from_mapping(c.model.to_dict(), vocab_size=c.data.vocab_size)
    abstract = nnx.eval_shape(lambda: Seq2SeqTransformer(cfg, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n > 0


def test_configs_state_how_to_run():
    for name in VARIANTS:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert "python -m moe_jax.main --config=configs/" in module.__doc__
        assert "Hardware" in module.__doc__ and "Expected" in module.__doc__


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown variant"):
        load_config("translation", "nope")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["summarization"])
def test_smoke_variant_trains_one_step(name, tmp_path):
    c = load_config(name, "smoke")
    c.data.source = "synthetic"
    c.train.update(num_train_steps=1, eval_every=0, checkpoint_every=0)
    c.eval.max_decode_examples = 8
    final = trainer.train_and_evaluate(c, str(tmp_path))
    assert {"val_loss", "greedy_rouge1", "beam_rougeL"} <= set(final)
