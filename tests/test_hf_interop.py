"""Hugging Face checkpoints in and out against transformers' own outputs (needs only numpy + safetensors).

The fixtures under tests/fixtures/hf/ are tiny random models written by transformers (``make_fixtures.py``
there, with the versions that wrote them), with transformers' float32 logits for fixed ids (id 0 included)
and its 32-token greedy continuation of a prompt.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from moe_jax import sharding
from moe_jax.interop import hf
from moe_jax.train import decode

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
MOE = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]
DENSE = ["llama", "mistral", "qwen2"]
ALL = MOE + DENSE


def _reference(name):
    return dict(np.load(os.path.join(FIXTURES, name, "reference.npz")))


def _hf_tensors(path):
    out = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(path, file), framework="numpy") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - not a dict
    return out


@nnx.jit
def _forward(model, ids_BL):
    return model(ids_BL)


def _params(model):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("name", ALL)
def test_logits_equal_transformers(name):
    """Every architecture's logits equal transformers' to 1e-4 of their largest magnitude (float32)."""
    model, config = hf.load(os.path.join(FIXTURES, name))
    ref = _reference(name)
    logits_BLV, aux = _forward(model, jnp.asarray(ref["ids_BL"], jnp.int32))
    scale = np.abs(ref["logits_BLV"]).max()
    np.testing.assert_allclose(np.asarray(logits_BLV), ref["logits_BLV"], rtol=0, atol=1e-4 * scale)
    assert config.task == "language_modeling"
    assert bool(aux) == (name in MOE)  # MoE layers report their routing aux


# Mixtral and the other architectures: tests/test_hf_transformers.py (slow set).
@pytest.mark.parametrize("name", ["qwen2_moe", "llama"])
def test_cached_greedy_generation_equals_transformers(name):
    model, _ = hf.load(os.path.join(FIXTURES, name))
    ref = _reference(name)
    prompt = jnp.asarray(ref["prompt_L"], jnp.int32)[None]
    tokens = decode.generate(model, prompt, jnp.asarray([prompt.shape[1]]), max_new_tokens=32, eos_id=-1)
    np.testing.assert_array_equal(np.asarray(tokens[0]), ref["greedy_L"])


@pytest.mark.parametrize("name", ALL)
def test_save_writes_back_the_same_tensors_and_config(name, tmp_path):
    """load → save reproduces every tensor transformers wrote, bit for bit; load again gives equal params."""
    src = os.path.join(FIXTURES, name)
    model, config = hf.load(src)
    out = str(tmp_path / "out")
    hf.save(model, config, out)
    original, written = _hf_tensors(src), _hf_tensors(out)
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    with open(os.path.join(src, "config.json")) as f:
        source = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    for key in ("architectures", "hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
        assert saved[key] == source[key], key
    again, _ = hf.load(out)
    mine, back = _params(model), _params(again)
    assert sorted(mine) == sorted(back)
    for key in mine:
        np.testing.assert_array_equal(back[key], mine[key])


def test_sharded_save_writes_an_index_and_loads_back(tmp_path):
    model, config = hf.load(os.path.join(FIXTURES, "mixtral"))
    out = str(tmp_path / "sharded")
    names = hf.save(model, config, out, max_shard_size=64 * 1024)
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 2 and hf.INDEX_FILE in names
    with open(os.path.join(out, hf.INDEX_FILE)) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # each shard within the limit (a single larger tensor would get its own)
        assert os.path.getsize(os.path.join(out, shard)) <= 64 * 1024 + 4096
    again, _ = hf.load(out)
    for key, value in _params(model).items():
        np.testing.assert_array_equal(_params(again)[key], value)


def test_save_from_an_expert_parallel_mesh_equals_one_device(tmp_path):
    """Experts sharded over an 8-way ``expert`` axis: the files equal those saved from one device."""
    model, config = hf.load(os.path.join(FIXTURES, "olmoe"))  # 8 experts
    hf.save(model, config, str(tmp_path / "one"))
    mesh = sharding.make_mesh({"data": 1, "expert": 8})
    graphdef, state = nnx.split(model)
    with nnx.logical_axis_rules(sharding.preset_rules("ep")):
        shardings = sharding.state_shardings(state, mesh, sharding.preset_rules("ep"))
    sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
    w_up = sharded.decoder.layers[0].ffn.w_up.get_value()
    assert len(w_up.sharding.device_set) == 8 and w_up.addressable_shards[0].data.shape[0] == 1
    hf.save(sharded, config, str(tmp_path / "mesh"))
    one, mesh_files = _hf_tensors(str(tmp_path / "one")), _hf_tensors(str(tmp_path / "mesh"))
    assert sorted(one) == sorted(mesh_files)
    for key in one:
        np.testing.assert_array_equal(mesh_files[key], one[key])


def test_project_model_exports_as_mixtral_with_equal_logits(tmp_path):
    """A model trained here (sqrt(D) embedding scale, tied table) exports exactly: the scale is folded into
    an untied input table."""
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
            tie_embeddings=True,
            moe=dict(num_experts=4, top_k=2, layers=(0, 1), capacity_factor=None, eval_capacity_factor=None),
        )
    )
    model = DecoderLM(cfg, rngs=nnx.Rngs(3))
    model.eval()
    out = str(tmp_path / "export")
    hf.save(model, {}, out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["MixtralForCausalLM"]
    again, _ = hf.load(out)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 96, (2, 10)), jnp.int32)
    want, _ = _forward(model, ids)
    got, _ = _forward(again, ids)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.abs(want).max())
    )


def _copy_fixture(name, tmp_path, edit_config=None, edit_tensors=None):
    from safetensors.numpy import save_file

    src = os.path.join(FIXTURES, name)
    dst = tmp_path / name
    dst.mkdir()
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if edit_config:
        edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = _hf_tensors(src)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return str(dst)


@pytest.mark.parametrize(
    "name, edit_config, edit_tensors, message",
    [
        (
            "mixtral",
            lambda c: c.update(architectures=["GPT2LMHeadModel"]),
            None,
            "GPT2LMHeadModel.*not supported",
        ),
        ("mixtral", lambda c: c.update(sliding_window=4096), None, "sliding_window=4096"),
        (
            "llama",
            lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
            None,
            "RoPE scaling",
        ),
        ("qwen2_moe", lambda c: c.update(use_sliding_window=True), None, "use_sliding_window"),
        ("olmoe", lambda c: c.update(clip_qkv=8.0), None, "clip_qkv"),
        ("llama", lambda c: c.update(hidden_act="gelu"), None, "hidden_act"),
        (
            "mixtral",
            None,
            lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"),
            "experts.3.w2.weight is missing",
        ),
        (
            "llama",
            None,
            lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": np.ones(4, np.float32)}),
            "not used.*rotary.inv_freq",
        ),
        (
            "qwen3_moe",
            None,
            lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}),
            "q_norm.weight: shape",
        ),
        ("mistral", lambda c: c.update(num_hidden_layers=3), None, "model.layers.2.* is missing"),
    ],
)
def test_bad_checkpoints_name_the_problem(tmp_path, name, edit_config, edit_tensors, message):
    path = _copy_fixture(name, tmp_path, edit_config, edit_tensors)
    with pytest.raises(ValueError, match=message):
        hf.load(path)


def test_save_refuses_a_used_directory_and_leaves_nothing_on_failure(tmp_path):
    model, config = hf.load(os.path.join(FIXTURES, "qwen3_moe"))
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an empty directory"):
        hf.save(model, config, str(used))
    assert os.listdir(used) == ["notes.txt"]
    with pytest.raises(ValueError, match="architecture 'BertModel' is not supported"):
        hf.save(model, config, str(tmp_path / "new"), architecture="BertModel")
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["used"]
    with pytest.raises(ValueError, match="model.* cannot be written as MixtralForCausalLM"):
        hf.save(model, config, str(tmp_path / "new"), architecture="MixtralForCausalLM")
    assert [p.name for p in tmp_path.iterdir()] == ["used"]


@pytest.mark.parametrize(
    "name, options",
    [
        ("llama", dict(num_experts=4, top_k=2)),
        ("mistral", dict(num_experts=2, top_k=1, granularity=4)),  # 8 experts of 12, top-4
        ("qwen2", dict(num_experts=3, top_k=2, granularity=2, layers=(1,))),
    ],
)
def test_upcycled_model_starts_with_the_dense_logits(name, options):
    dense, _ = hf.load(os.path.join(FIXTURES, name))
    moe, config = hf.load(os.path.join(FIXTURES, name), upcycle=options)
    g = options.get("granularity", 1)
    assert config.model.moe.num_experts == options["num_experts"] * g
    assert config.model.moe.top_k == options["top_k"] * g
    assert moe.cfg.moe_layers(moe.cfg.num_decoder_layers) == tuple(options.get("layers", (0, 1)))
    ids = jnp.asarray(_reference(name)["ids_BL"], jnp.int32)
    want, _ = _forward(dense, ids)
    got, aux = _forward(moe, ids)
    assert aux
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.abs(want).max())
    )


def test_upcycled_model_with_noise_differs_and_exports_as_mixtral(tmp_path):
    dense, _ = hf.load(os.path.join(FIXTURES, "llama"))
    moe, config = hf.load(
        os.path.join(FIXTURES, "llama"), upcycle=dict(num_experts=4, top_k=2, noise_std=0.1)
    )
    w = np.asarray(moe.decoder.layers[0].ffn.w_up.get_value())
    assert not np.array_equal(w[0], w[1])
    ids = jnp.asarray(_reference("llama")["ids_BL"], jnp.int32)
    want, _ = _forward(dense, ids)
    got, _ = _forward(moe, ids)
    assert 0 < float(jnp.abs(got - want).max()) < 0.5 * float(jnp.abs(want).max())
    hf.save(moe, config, str(tmp_path / "moe"))
    with open(tmp_path / "moe" / "config.json") as f:
        assert json.load(f)["architectures"] == ["MixtralForCausalLM"]
    with pytest.raises(ValueError, match="granularity=5 must divide the dense d_ff=48"):
        hf.load(os.path.join(FIXTURES, "llama"), upcycle=dict(num_experts=2, top_k=1, granularity=5))
    with pytest.raises(ValueError, match="already has MoE blocks"):
        hf.load(os.path.join(FIXTURES, "mixtral"), upcycle=dict(num_experts=2, top_k=1))


def test_bfloat16_parameters_save_and_load_as_bfloat16(tmp_path):
    model, config = hf.load(os.path.join(FIXTURES, "qwen3_moe"), param_dtype="bfloat16")
    out = str(tmp_path / "bf16")
    hf.save(model, config, out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    written = _hf_tensors(out)
    original = _hf_tensors(os.path.join(FIXTURES, "qwen3_moe"))
    for key, value in original.items():
        assert written[key].dtype.name == "bfloat16", key
        np.testing.assert_array_equal(written[key], value.astype(written[key].dtype))
    again, _ = hf.load(out, param_dtype="bfloat16")
    for key, value in _params(model).items():
        np.testing.assert_array_equal(_params(again)[key], value)
