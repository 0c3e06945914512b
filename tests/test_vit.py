"""V-MoE ViT: shapes, the MoE pattern, patching, input errors, capacity in train vs eval, BPR."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.models import MoeConfig, vmoe_layers
from moe_jax.models.vit import ViTClassifier, ViTConfig, patchify

TINY_MOE = MoeConfig(num_experts=4, top_k=2, dispatch="indices", batch_prioritized=True)
TINY = dict(
    image_size=8,
    patch_size=2,
    channels=1,
    num_classes=10,
    d_model=16,
    num_heads=2,
    d_ff=32,
    num_layers=4,
    moe=TINY_MOE,
)


def _moe(**kw) -> MoeConfig:
    return dataclasses.replace(TINY_MOE, **kw)


def _images(key, shape=(3, 8, 8, 1)):
    return jax.random.normal(jax.random.key(key), shape)


def test_shapes_and_default_vmoe_pattern():
    assert vmoe_layers(8) == (5, 7) and vmoe_layers(4) == (3,) and vmoe_layers(6) == (3, 5)
    assert vmoe_layers(12) == (7, 9, 11) and vmoe_layers(5) == (2, 4) and vmoe_layers(2) == (1,)
    # The ViT's default is batch-prioritized V-MoE routing, also when the moe section omits it.
    assert ViTConfig().moe.batch_prioritized and ViTConfig.from_mapping({"moe": {}}).moe.batch_prioritized
    model = ViTClassifier(ViTConfig(**TINY), rngs=nnx.Rngs(0))
    logits, aux = model(_images(0))
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert list(aux) == ["vit/layer_3"]
    assert aux["vit/layer_3"]["expert_load"].shape == (4,)
    assert [layer.use_moe for layer in model.encoder.layers] == [False, False, False, True]
    # An explicit pattern and a dense ViT.
    model = ViTClassifier(ViTConfig(**{**TINY, "moe": _moe(layers=(0, 2))}), rngs=nnx.Rngs(0))
    assert sorted(model(_images(0))[1]) == ["vit/layer_0", "vit/layer_2"]
    assert ViTClassifier(ViTConfig(**{**TINY, "moe": _moe(layers=())}), rngs=nnx.Rngs(0))(_images(0))[1] == {}


def test_patchify_order_and_values():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    p = patchify(x, 2)
    assert p.shape == (2, 6, 12)
    # Patch 4 is grid row 1, column 1: pixels rows 2-3, columns 2-3.
    np.testing.assert_array_equal(p[1, 4], np.asarray(x[1, 2:4, 2:4, :]).reshape(-1))


def test_bad_input_errors_name_the_field():
    with pytest.raises(ConfigError, match="image_size=10 is not divisible by patch_size=4"):
        ViTConfig(**{**TINY, "image_size": 10, "patch_size": 4})
    with pytest.raises(ValueError, match="not divisible by patch_size=3"):
        patchify(jnp.zeros((1, 8, 8, 1)), 3)
    model = ViTClassifier(ViTConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="image has 3 channels .*channels=1"):
        model(jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="image is 16x16 .*image_size=8"):
        model(jnp.zeros((2, 16, 16, 1)))
    with pytest.raises(ConfigError, match=r"moe.layers=\(4,\) has indices \[4\] outside \[0, 4\)"):
        ViTConfig(**{**TINY, "moe": _moe(layers=(4,))})


def test_train_vs_eval_capacity_and_batch_prioritized_routing():
    cfg = ViTConfig(
        **{**TINY, "moe": _moe(capacity_factor=0.5, eval_capacity_factor=4.0, batch_prioritized=True)}
    )
    model = ViTClassifier(cfg, rngs=nnx.Rngs(0))
    images = _images(1, (4, 8, 8, 1))
    _, aux_train = model(images, deterministic=False)
    _, aux_eval = model(images, deterministic=True)
    # Capacity 0.5 cannot hold all 16·2 assignments per image; 4.0 always can.
    assert float(aux_train["vit/layer_3"]["dropped_fraction"]) > 0.2
    assert float(aux_eval["vit/layer_3"]["dropped_fraction"]) == 0.0
    moe = model.encoder.layers[3].ffn
    assert moe.batch_prioritized and moe.capacity_factor == 0.5 and moe.eval_capacity_factor == 4.0


@pytest.mark.slow  # 20-30 s on 2 cores; CI runs the slow set
def test_gradients_reach_experts_and_router():
    model = ViTClassifier(ViTConfig(**TINY), rngs=nnx.Rngs(0))
    # A nonzero head so the class loss depends on the encoder.
    model.head_w[...] = jax.random.normal(jax.random.key(3), model.head_w[...].shape)
    labels = jnp.array([1, 2, 3])

    def loss(m):
        logits, aux = m(_images(2), deterministic=False)
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
        return ce + 0.01 * aux["vit/layer_3"]["load_balancing_loss"]

    grads = nnx.grad(loss)(model)
    moe_grads = grads["encoder"]["layers"][3]["ffn"]
    for name in ("router", "w_up", "w_down"):
        assert float(jnp.abs(moe_grads[name][...]).sum()) > 0, name
