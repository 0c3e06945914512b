"""VLM: prefix-LM mask, causality, loss on text only, modality split of expert load, greedy decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.models import MoeConfig
from moe_jax.models.vit import ViTConfig
from moe_jax.models.vlm import VisionLanguageModel, VLMConfig, prefix_lm_mask
from moe_jax.tasks import vlm as vlm_task

VISION = ViTConfig(
    image_size=8,
    patch_size=4,
    channels=3,
    num_classes=0,
    d_model=16,
    num_heads=2,
    d_ff=32,
    num_layers=2,
    moe=MoeConfig(num_experts=4, top_k=2, dispatch="indices", batch_prioritized=True),
)
P = 4  # (8 / 4)² image tokens
DECODER_MOE = MoeConfig(num_experts=4, top_k=2, d_ff=16, capacity_factor=None, dispatch="indices")


def _cfg(vision=VISION, **moe):
    """The tiny VLM; ``moe`` overrides fields of the decoder's MoE config."""
    return VLMConfig(
        vision=vision,
        vocab_size=20,
        d_model=16,
        num_heads=2,
        d_ff=32,
        num_layers=2,
        moe=dataclasses.replace(DECODER_MOE, **moe),
    )


def _vision(**moe):
    return dataclasses.replace(VISION, moe=dataclasses.replace(VISION.moe, **moe))


@pytest.fixture(scope="module")
def model():
    return VisionLanguageModel(_cfg(), rngs=nnx.Rngs(0))


def _images(key, b=2):
    return jax.random.normal(jax.random.key(key), (b, 8, 8, 3))


TEXT = jnp.array([[2, 5, 7, 9, 11, 3], [2, 6, 8, 3, 0, 0]], jnp.int32)


def test_prefix_lm_mask_exact():
    mask_BL = jnp.array([[True] * 5, [True] * 4 + [False]])
    m = np.asarray(prefix_lm_mask(2, mask_BL))
    expected = np.array(
        [
            [1, 1, 0, 0, 0],  # image token 0: sees both image tokens, no text
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],  # text token 2: images + itself
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(m[0], expected)
    # Padding (last key of row 1) is visible to no one.
    np.testing.assert_array_equal(m[1], expected & np.array([1, 1, 1, 1, 0], bool)[None])


@pytest.mark.slow  # 20-30 s on 2 cores; CI runs the slow set
def test_shapes_and_aux(model):
    logits, aux = model(_images(0), TEXT)
    assert logits.shape == (2, 6, 20) and logits.dtype == jnp.float32
    assert sorted(aux) == ["decoder/layer_1", "vision/vit/layer_1"]
    dec = aux["decoder/layer_1"]
    for k in ("expert_count_image", "expert_count_text", "expert_load_image", "expert_load_text"):
        assert dec[k].shape == (4,), k
    with pytest.raises(ValueError, match="image has 1 channels"):
        model(jnp.zeros((2, 8, 8, 1)), TEXT)
    with pytest.raises(ValueError, match="text must have shape"):
        model(_images(0), TEXT[:1])


def test_text_is_causal_and_sees_the_image(model):
    logits, _ = model(_images(0), TEXT)
    # A later text token never changes earlier logits.
    logits2, _ = model(_images(0), TEXT.at[:, 3].set(13))
    np.testing.assert_allclose(logits[:, :3], logits2[:, :3], atol=1e-5)
    assert not np.allclose(logits[0, 3:], logits2[0, 3:], atol=1e-4)
    # The first text token already depends on the image (image tokens are visible to every text token).
    logits3, _ = model(_images(1), TEXT)
    assert not np.allclose(logits[:, 0], logits3[:, 0], atol=1e-4)


def test_image_tokens_do_not_see_text(model):
    # Capture the decoder's image-token states through a text-independent path: with the image-token rows
    # of the mask blind to text, the image part of the residual stream must not move when text changes.
    prefix, _ = model.encode_image(_images(0))
    outs = []
    for text in (TEXT, TEXT.at[:, 1:].set(12)):
        x = jnp.concatenate([prefix, model.embed(text)], axis=1)
        mask = jnp.concatenate([jnp.ones((2, P), bool), text != 0], axis=1)
        pos = jnp.broadcast_to(jnp.arange(x.shape[1]), mask.shape)
        for layer in model.layers:
            x, _ = layer(x, attn_mask_BLL=prefix_lm_mask(P, mask), mask_BL=mask, positions_BL=pos)
        outs.append(x[:, :P])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_loss_is_on_weighted_text_tokens_only(model):
    task = vlm_task.VLMTask(ml_collections.ConfigDict({"loss": {"label_smoothing": 0.0}}))
    targets = jnp.concatenate([TEXT[:, 1:], jnp.zeros((2, 1), jnp.int32)], axis=1)
    weights = jnp.zeros((2, 6)).at[0, 2:5].set(1.0).at[1, 2].set(1.0)
    batch = {"image": _images(0), "text": TEXT, "targets": targets, "token_weight": weights}
    sums, _ = task.loss_sums(model, batch, dropout_key=None, deterministic=True)
    loss = sums["loss_sum"] / sums["weight_sum"]
    logits, _ = model(_images(0), TEXT)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(loss, (nll * weights).sum() / weights.sum(), rtol=1e-5)
    # Targets at unweighted positions do not matter.
    other = {**batch, "targets": jnp.where(weights > 0, targets, 17)}
    other_sums, _ = task.loss_sums(model, other, dropout_key=None, deterministic=True)
    np.testing.assert_allclose(other_sums["loss_sum"] / other_sums["weight_sum"], loss, rtol=1e-6)
    assert float(sums["weight_sum"]) == 4.0


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_modality_split_sums_to_the_layer_load(capacity_factor):
    m = VisionLanguageModel(_cfg(capacity_factor=capacity_factor), rngs=nnx.Rngs(1))
    _, aux = m(_images(2), TEXT, deterministic=True)
    dec = aux["decoder/layer_1"]
    n_image, n_text = 2 * P, int((TEXT != 0).sum())
    K = 2
    # Every real token's K assignments are counted once, by modality; padding in neither.
    assert float(dec["expert_count_image"].sum()) == n_image * K
    assert float(dec["expert_count_text"].sum()) == n_text * K
    total = dec["expert_count_image"] + dec["expert_count_text"]
    np.testing.assert_allclose(total / total.sum(), dec["expert_load"], atol=1e-6)
    share = n_image / (n_image + n_text)
    np.testing.assert_allclose(
        share * dec["expert_load_image"] + (1 - share) * dec["expert_load_text"],
        dec["expert_load"],
        atol=1e-6,
    )
    np.testing.assert_allclose(dec["expert_load_text"].sum(), 1.0, atol=1e-6)


def test_decoder_moe_is_causal():
    # The decoder's MoE layers are built with causal=True, so a non-causal router is refused.
    with pytest.raises(ConfigError, match="causal"):
        VisionLanguageModel(_cfg(router="expert_choice", capacity_factor=1.0), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="moe.batch_prioritized=True .*causal"):
        _cfg(batch_prioritized=True)
    # A dense vision tower and a dense decoder build too.
    dense = VisionLanguageModel(_cfg(layers=(), vision=_vision(layers=())), rngs=nnx.Rngs(0))
    assert dense(_images(0), TEXT)[1] == {}


@pytest.mark.slow
def test_greedy_decode_matches_teacher_forcing(model):
    """Every generated token is the argmax of teacher-forced logits after the tokens before it.

    Pad's embedding row is zeroed (its tied logit is then 0, below the best of 19 random logits) and EOS is
    an id the model cannot emit, so each row generates tokens until its buffer is full and every one of
    them is compared: an untrained model emitting pad or EOS first cannot pass vacuously.
    """
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x, state)  # the module fixture stays untouched
    state["embed"]["table"].set_value(state["embed"]["table"].get_value().at[0].set(0.0))
    m = nnx.merge(graphdef, state)
    T = 6
    prompt = jnp.array([[2, 5, 7, 0, 0, 0], [2, 6, 0, 0, 0, 0]], jnp.int32)
    prompt_len = jnp.array([3, 2], jnp.int32)
    out = np.asarray(vlm_task.greedy_decode_vlm(m, _images(0), prompt, prompt_len, eos_id=-1))
    for b in range(2):
        n = int(prompt_len[b])
        # The buffer holds T - n new tokens; one more comes from the logits at the last position.
        gen = [int(t) for t in out[b, : T - n + 1]]
        assert all(t != 0 for t in gen), out[b]
        assert (out[b, T - n + 1 :] == 0).all(), out[b]
        seq = list(np.asarray(prompt[b, :n])) + gen[: T - n]
        logits, _ = m(_images(0)[b : b + 1], jnp.array([seq], jnp.int32))
        assert [int(t) for t in jnp.argmax(logits[0, n - 1 :], axis=-1)] == gen
    assert len(set(out[out != 0].tolist())) > 1, out  # not one token repeated


def test_vqa_exact_match_and_bleu():
    assert vlm_task.vqa_exact_match(["Red", "blue ", "yes"], ["red", "blue", "no"]) == pytest.approx(200 / 3)
    assert vlm_task.caption_bleu(
        ["a small red square left of a big blue circle"], ["a small red square left of a big blue circle"]
    ) == pytest.approx(100.0)


def test_bad_inputs_name_the_field(model):
    with pytest.raises(ValueError, match="image is 16x16 .*image_size=8"):
        model(jnp.zeros((2, 16, 16, 3)), TEXT)
    with pytest.raises(ValueError, match="image has 1 channels .*channels=3"):
        model(jnp.zeros((2, 8, 8, 1)), TEXT)
    with pytest.raises(ValueError, match="text is empty"):
        model(_images(0), TEXT[:, :0])
    with pytest.raises(ConfigError, match="image_size=10 is not divisible by patch_size=4"):
        _cfg(vision=dataclasses.replace(VISION, image_size=10))


def test_vision_group_size_reaches_the_tower_and_pools_capacity_over_images():
    """``vision.group_size`` spans images: with tight capacity, one image's tokens change another's output."""
    prefix = {}
    for group in (None, 2 * P):
        vision = _vision(capacity_factor=0.5, eval_capacity_factor=0.5, layers=(1,), group_size=group)
        m = VisionLanguageModel(_cfg(vision=vision), rngs=nnx.Rngs(0))
        assert m.vision.layers[1].ffn.group_size == group
        images = _images(3)
        other = images.at[1].set(-images[1])  # change image 1 only
        prefix[group] = [np.asarray(m.encode_image(x)[0][0]) for x in (images, other)]
    # One group per image: image 0's tokens never see image 1's routing.
    np.testing.assert_array_equal(prefix[None][0], prefix[None][1])
    # A group of both images: image 1's tokens compete for the same capacity (the priority order of
    # batch-prioritized routing mixes them), so image 0's output moves.
    assert not np.allclose(prefix[2 * P][0], prefix[2 * P][1], atol=1e-6)
