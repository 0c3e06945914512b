"""Greedy and beam-search decoding: exact search on a toy model, consistency on a real one."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.models import ModelConfig, MoeConfig, Seq2SeqTransformer
from moe_jax.train import decode

BOS, EOS, V = 2, 3, 4


class MarkovModel:
    """Next-token log-probs depend only on the previous token (and the row's first input token)."""

    def __init__(self, seed):
        self.table_RVV = jax.nn.log_softmax(3.0 * jax.random.normal(jax.random.key(seed), (2, V, V)), axis=-1)

    def encode(self, inputs_BK, deterministic=True):
        return inputs_BK[:, :, None].astype(jnp.float32), {}

    def decode(self, dec_in_BL, enc_BKD, inputs_BK, decoder_mask_BL=None, deterministic=True):
        row = inputs_BK[:, 0] % 2
        return self.table_RVV[row[:, None], dec_in_BL], {}


def brute_force(table_VV, max_len, alpha):
    best, best_score = None, -np.inf
    for n in range(1, max_len + 1):
        for body in itertools.product([t for t in range(V) if t != EOS], repeat=n - 1):
            seq = list(body) + [EOS]
            prev, lp = BOS, 0.0
            for t in seq:
                lp += float(table_VV[prev, t])
                prev = t
            score = lp / float(decode.length_penalty(n, alpha))
            if score > best_score:
                best, best_score = seq, score
    return best


def test_beam_search_is_exact_when_wide_enough():
    model = MarkovModel(0)
    inputs = jnp.array([[4, 1], [5, 1]])
    for alpha in (0.0, 0.6):
        out = decode.beam_search(model, inputs, beam_size=27, max_len=4, bos_id=BOS, eos_id=EOS, alpha=alpha)
        for b in range(2):
            want = brute_force(np.asarray(model.table_RVV[b]), 4, alpha)
            got = [int(t) for t in out[b]][: len(want)]
            assert got == want, (alpha, b, out[b])
            assert all(int(t) == 0 for t in out[b][len(want) :])


def test_greedy_follows_argmax_and_stops_at_eos():
    model = MarkovModel(1)
    inputs = jnp.array([[4, 1], [5, 1]])
    out = np.asarray(decode.greedy_decode(model, inputs, max_len=6, bos_id=BOS, eos_id=EOS))
    for b in range(2):
        prev, want = BOS, []
        for _ in range(6):
            prev = int(jnp.argmax(model.table_RVV[b, prev]))
            want.append(prev)
            if prev == EOS:
                break
        np.testing.assert_array_equal(out[b, : len(want)], want)
        assert (out[b, len(want) :] == 0).all()


def test_greedy_matches_teacher_forcing_on_a_moe_model():
    """Decoding with the recompute buffer gives the same tokens as argmax of teacher-forced logits.

    Pad's column of the (untied) output head is zeroed, so its logit 0 stays below the best of 29 random
    ones, and EOS is an id the model cannot emit: every row decodes ``max_len`` real tokens and all of them
    are compared, so an untrained model emitting pad or EOS first cannot make the check pass vacuously. An
    untied head also keeps the untrained model from repeating one token (tied, it echoes its input).
    """
    cfg = ModelConfig(
        vocab_size=30,
        d_model=16,
        num_heads=2,
        d_ff=32,
        num_encoder_layers=2,
        num_decoder_layers=2,
        tie_embeddings=False,
        moe=MoeConfig(num_experts=4, top_k=1, capacity_factor=2.0),
    )
    model = Seq2SeqTransformer(cfg, bos_id=BOS, rngs=nnx.Rngs(3))
    model.head[...] = model.head[...].at[:, 0].set(0.0)
    graphdef, state = nnx.split(model)
    inputs = jax.random.randint(jax.random.key(0), (3, 5), 4, 30)

    @jax.jit
    def check(state, inputs):
        m = nnx.merge(graphdef, state)
        out = decode.greedy_decode(m, inputs, max_len=6, bos_id=BOS, eos_id=-1)
        logits, _ = m(inputs, out, deterministic=True)
        return out, jnp.argmax(logits, axis=-1)

    out, teacher = map(np.asarray, check(state, inputs))
    assert out.shape == (3, 6) and (out != 0).all(), out  # six real tokens per row
    assert len(set(out.ravel().tolist())) > 3, out  # not one token repeated
    np.testing.assert_array_equal(out, teacher)


def test_to_token_lists():
    assert decode.to_token_lists(np.array([[5, 6, 3, 7], [3, 0, 0, 0], [5, 0, 6, 0]]), 3) == [
        [5, 6],
        [],
        [5, 6],
    ]
