"""Greedy and beam-search decoding over a ``logits_fn``, shared by every generating task, and LM generation.

``logits_fn(tokens_XL, t) -> logits_XLV`` runs the model over a fixed token buffer when position ``t`` is
the last filled one (seq2seq: the decoder over the encoder output; VLM: the prefix-LM decoder over the image
prefix); :func:`greedy` and :func:`beam` only pick tokens. :func:`greedy_decode` and :func:`beam_search`
bind them to :class:`~moe_jax.models.Seq2SeqTransformer`.

Correctness first: the encoder runs once, and every decoding step re-runs the decoder over a fixed
``[B, max_len]`` buffer (positions past the current one are masked out of attention by causality and out of
MoE routing by ``decoder_mask_BL``), so one compiled program serves every step and a token's logits are
computed exactly as in teacher-forced training. A KV cache would make a step O(L) instead of O(L²); at the
sequence lengths of the offline tasks (≤ 64) the recompute costs less than the evaluation's other parts.

The decoder-only LM generates with :func:`generate` (a KV cache, sampling with temperature / top-k / top-p);
its no-cache path is the same recompute-everything reference.

Outputs are ``int32[B, max_len]``: the generated tokens, ending with EOS when one was produced, pad 0 after.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1.0e9


def greedy(logits_fn, tokens_BL: jax.Array, start_B: jax.Array, *, steps: int, eos_id: int) -> jax.Array:
    """Greedy continuation: row b's token ``t`` goes to position ``start_B[b] + t`` of the buffer.

    Args:
        logits_fn: ``(tokens_BL, t) -> logits_BLV``; the logits at position p predict position p + 1.
        tokens_BL: the buffer (prompts, BOS, ...), pad 0 after each row's prompt.
        start_B: int32[B], where each row's first generated token goes.
        steps: at most this many tokens per row.
        eos_id: rows stop after emitting it.

    Returns:
        ``int32[B, steps]`` generated tokens, ending with EOS when one was produced, pad 0 after.
    """
    B, L = tokens_BL.shape
    rows_B = jnp.arange(B)

    def cond(carry):
        t, _, _, done_B = carry
        return (t < steps) & ~jnp.all(done_B)

    def body(carry):
        t, tokens_BL, out_BS, done_B = carry
        pos_B = start_B + t  # where this step's token goes
        logits_BLV = logits_fn(tokens_BL, t)
        logits_BV = logits_BLV[rows_B, jnp.clip(pos_B - 1, 0, L - 1)]
        tok_B = jnp.where(done_B | (pos_B > L), 0, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))
        out_BS = out_BS.at[:, t].set(tok_B)
        tokens_BL = tokens_BL.at[rows_B, pos_B].set(tok_B, mode="drop")
        return t + 1, tokens_BL, out_BS, done_B | (tok_B == eos_id) | (pos_B >= L)

    init = (
        jnp.int32(0),
        tokens_BL.astype(jnp.int32),
        jnp.zeros((B, steps), jnp.int32),
        jnp.zeros((B,), bool),
    )
    return jax.lax.while_loop(cond, body, init)[2]


def _seq2seq_logits_fn(model, inputs_XK, enc_XKD, max_len: int):
    positions_L = jnp.arange(max_len)

    def logits_fn(tokens_XL, t):
        # Positions past t are not real tokens yet: causal attention ignores them, and the mask keeps them out
        # of MoE routing (capacity) too.
        mask_XL = jnp.broadcast_to(positions_L <= t, tokens_XL.shape)
        logits_XLV, _ = model.decode(
            tokens_XL, enc_XKD, inputs_XK, decoder_mask_BL=mask_XL, deterministic=True
        )
        return logits_XLV

    return logits_fn


def greedy_decode(model, inputs_BK: jax.Array, *, max_len: int, bos_id: int, eos_id: int) -> jax.Array:
    """Greedy decoding of a :class:`~moe_jax.models.Seq2SeqTransformer`; rows stop at their first EOS."""
    enc_BKD, _ = model.encode(inputs_BK, deterministic=True)
    return greedy_decode_encoded(model, enc_BKD, inputs_BK, max_len=max_len, bos_id=bos_id, eos_id=eos_id)


def greedy_decode_encoded(
    model, enc_BKD: jax.Array, inputs_BK: jax.Array, *, max_len: int, bos_id: int, eos_id: int
) -> jax.Array:
    """:func:`greedy_decode` from an encoder output already computed (speech: encoded log-mel frames).

    ``inputs_BK`` only marks the real encoder positions (non-zero), as ``model.decode`` reads it.
    """
    B = inputs_BK.shape[0]
    tokens_BL = jnp.zeros((B, max_len), jnp.int32).at[:, 0].set(bos_id)
    start_B = jnp.ones((B,), jnp.int32)
    logits_fn = _seq2seq_logits_fn(model, inputs_BK, enc_BKD, max_len)
    return greedy(logits_fn, tokens_BL, start_B, steps=max_len, eos_id=eos_id)


def length_penalty(length, alpha: float):
    """GNMT length penalty ((5 + length) / 6) ** alpha."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam(
    logits_fn, batch_size: int, *, beam_size: int, max_len: int, bos_id: int, eos_id: int, alpha: float = 0.6
) -> jax.Array:
    """Beam search with a GNMT length penalty over ``logits_fn``; the best finished hypothesis per row.

    ``logits_fn(tokens_XL, t)`` sees the ``X = batch_size · beam_size`` beams flattened row-major (row b's
    beams are ``b·W .. b·W + W − 1``), each a buffer of BOS then the tokens so far. Keeps ``beam_size`` alive
    (no EOS yet) and ``beam_size`` finished hypotheses per row. Each step scores 2·W candidates; those ending
    in EOS enter the finished set with score log p / length_penalty, the rest compete for the alive set. It
    stops early once no alive beam can beat the worst finished one. A row without any finished hypothesis
    returns its best alive one.

    Returns:
        ``int32[B, max_len]`` tokens (EOS included when produced, pad 0 after).
    """
    B, W = batch_size, beam_size
    # Sequences hold BOS at index 0 and generated tokens at 1..max_len.
    alive_BWS = jnp.zeros((B, W, max_len + 1), jnp.int32).at[:, :, 0].set(bos_id)
    alive_lp_BW = jnp.tile(jnp.array([0.0] + [_NEG] * (W - 1), jnp.float32), (B, 1))
    fin_BWS = jnp.zeros_like(alive_BWS)
    fin_score_BW = jnp.full((B, W), _NEG, jnp.float32)
    fin_flag_BW = jnp.zeros((B, W), bool)

    def gather(x_BN, idx_BM):
        return jnp.take_along_axis(x_BN, idx_BM.reshape(idx_BM.shape + (1,) * (x_BN.ndim - 2)), axis=1)

    def cond(carry):
        t, _, alive_lp_BW, _, fin_score_BW, fin_flag_BW = carry
        best_possible_B = alive_lp_BW[:, 0] / length_penalty(max_len, alpha)
        worst_fin_B = jnp.min(jnp.where(fin_flag_BW, fin_score_BW, _NEG), axis=1)
        done_B = jnp.all(fin_flag_BW, axis=1) & (best_possible_B < worst_fin_B)
        return (t < max_len) & ~jnp.all(done_B)

    def body(carry):
        t, alive_BWS, alive_lp_BW, fin_BWS, fin_score_BW, fin_flag_BW = carry
        X = B * W
        logits_XLV = logits_fn(alive_BWS[:, :, :max_len].reshape(X, max_len), t)
        logits_XV = jax.lax.dynamic_index_in_dim(logits_XLV, t, axis=1, keepdims=False)
        V = logits_XV.shape[-1]
        logp_BWV = jax.nn.log_softmax(logits_XV.astype(jnp.float32), axis=-1).reshape(B, W, V)
        cand_BN = (alive_lp_BW[:, :, None] + logp_BWV).reshape(B, W * V)
        top_lp_BM, top_idx_BM = jax.lax.top_k(cand_BN, 2 * W)
        tok_BM = (top_idx_BM % V).astype(jnp.int32)
        seqs_BMS = gather(alive_BWS, top_idx_BM // V)
        seqs_BMS = jax.lax.dynamic_update_slice_in_dim(seqs_BMS, tok_BM[:, :, None], t + 1, axis=2)
        is_eos_BM = tok_BM == eos_id
        alive_lp_BW, alive_idx_BW = jax.lax.top_k(jnp.where(is_eos_BM, _NEG, top_lp_BM), W)
        alive_BWS = gather(seqs_BMS, alive_idx_BW)
        new_score_BM = jnp.where(is_eos_BM, top_lp_BM / length_penalty(t + 1, alpha), _NEG)
        all_score = jnp.concatenate([fin_score_BW, new_score_BM], axis=1)
        all_flag = jnp.concatenate([fin_flag_BW, is_eos_BM], axis=1)
        # Finished entries always outrank empty slots, whatever their score.
        fin_score_BW, fin_idx_BW = jax.lax.top_k(jnp.where(all_flag, all_score, 2 * _NEG), W)
        fin_BWS = gather(jnp.concatenate([fin_BWS, seqs_BMS], axis=1), fin_idx_BW)
        fin_flag_BW = gather(all_flag, fin_idx_BW)
        return t + 1, alive_BWS, alive_lp_BW, fin_BWS, fin_score_BW, fin_flag_BW

    init = (jnp.int32(0), alive_BWS, alive_lp_BW, fin_BWS, fin_score_BW, fin_flag_BW)
    _, alive_BWS, _, fin_BWS, _, fin_flag_BW = jax.lax.while_loop(cond, body, init)
    best_BS = jnp.where(fin_flag_BW[:, 0, None], fin_BWS[:, 0], alive_BWS[:, 0])
    return best_BS[:, 1:]


def beam_search(
    model, inputs_BK: jax.Array, *, beam_size: int, max_len: int, bos_id: int, eos_id: int, alpha: float = 0.6
) -> jax.Array:
    """Beam search of a :class:`~moe_jax.models.Seq2SeqTransformer` (see :func:`beam`)."""
    enc_BKD, _ = model.encode(inputs_BK, deterministic=True)
    return beam_search_encoded(
        model,
        enc_BKD,
        inputs_BK,
        beam_size=beam_size,
        max_len=max_len,
        bos_id=bos_id,
        eos_id=eos_id,
        alpha=alpha,
    )


def beam_search_encoded(
    model,
    enc_BKD: jax.Array,
    inputs_BK: jax.Array,
    *,
    beam_size: int,
    max_len: int,
    bos_id: int,
    eos_id: int,
    alpha: float = 0.6,
) -> jax.Array:
    """:func:`beam_search` from an encoder output already computed (``inputs_BK``: non-zero = real)."""
    B, W = inputs_BK.shape[0], beam_size
    enc_XKD = jnp.repeat(enc_BKD, W, axis=0)  # X = B·W flattened beams
    inputs_XK = jnp.repeat(inputs_BK, W, axis=0)
    logits_fn = _seq2seq_logits_fn(model, inputs_XK, enc_XKD, max_len)
    return beam(logits_fn, B, beam_size=W, max_len=max_len, bos_id=bos_id, eos_id=eos_id, alpha=alpha)


def to_token_lists(tokens_BL, eos_id: int) -> list[list[int]]:
    """Host lists of token ids, cut before the first EOS and without padding."""
    out = []
    for row in np.asarray(tokens_BL).tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        out.append([t for t in row if t != 0])
    return out


# -- Language-model generation: sampling, with or without a KV cache ------------------------------------


def sample(
    logits_BV: jax.Array, key: jax.Array | None, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """The next token of each row: argmax at ``temperature`` 0, else a draw from the filtered softmax.

    Args:
        logits_BV: next-token logits.
        key: randomness (unused when greedy).
        temperature: logits are divided by it before filtering; 0 is greedy (static Python number).
        top_k: keep the k most likely tokens (0 keeps all); tokens tied with the k-th are kept too.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus),
            measured on the distribution left after ``top_k`` (renormalised); the most likely token is
            always kept.

    Returns:
        ``int32[B]``.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # A token is kept when the tokens more likely than it hold less than top_p.
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, neg_inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def generate(
    model,
    prompt_BL: jax.Array,
    lengths_B: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    use_cache: bool = True,
) -> jax.Array:
    """Continues each prompt of a :class:`~moe_jax.models.DecoderLM` by up to ``max_new_tokens`` tokens.

    With ``use_cache`` the prompt runs once (``prefill``) and each new token is one ``decode_step`` against
    the cached keys and values: O(L) work per token. Without it every step re-runs the model over the
    whole buffer of prompt plus tokens so far, masked to the filled positions: the O(L²) reference the
    cached path must reproduce. With dropless MoE routing (the LM configs' default) the two give the same
    tokens and logits: a token's experts do not depend on the other tokens. Capacity routing would make
    them differ, because one token alone never meets the capacity competition of a full sequence.

    Step ``t`` draws with ``fold_in(key, t)``, so a seed gives the same continuation on both paths.

    Args:
        model: the decoder (evaluation mode: routing deterministic).
        prompt_BL: right-padded prompts (pad 0), usually starting with BOS.
        lengths_B: real tokens of each prompt (≥ 1).
        max_new_tokens: tokens to generate at most (static).
        eos_id: a row stops after emitting it.
        temperature, top_k, top_p: see :func:`sample` (static).
        key: sampling randomness; needed when ``temperature`` > 0.

    Returns:
        ``int32[B, max_new_tokens]``: the new tokens, EOS included when produced, pad 0 after.
    """
    if temperature and key is None:
        raise ValueError("generate: temperature > 0 samples, so pass key=jax.random.key(seed)")
    key = jax.random.key(0) if key is None else key
    B, Lp = prompt_BL.shape
    L = Lp + max_new_tokens
    rows_B = jnp.arange(B)
    lengths_B = lengths_B.astype(jnp.int32)
    positions_L = jnp.arange(L)
    if use_cache:
        logits_BLV, carry = model.prefill(prompt_BL, lengths_B, model.init_cache(B, L))

        def advance(cache, tok_B, pos_B):
            return model.decode_step(tok_B, pos_B, cache)
    else:
        carry = jnp.zeros((B, L), jnp.int32).at[:, :Lp].set(prompt_BL.astype(jnp.int32))
        logits_BLV, _ = model(carry, mask_BL=positions_L[None] < lengths_B[:, None])

        def advance(tokens_BL, tok_B, pos_B):
            tokens_BL = tokens_BL.at[rows_B, pos_B].set(tok_B)
            logits_BLV, _ = model(tokens_BL, mask_BL=positions_L[None] <= pos_B[:, None])
            return logits_BLV[rows_B, pos_B], tokens_BL

    def cond(loop):
        t, _, _, _, done_B = loop
        return (t < max_new_tokens) & ~jnp.all(done_B)

    def body(loop):
        t, logits_BV, carry, out_BS, done_B = loop
        key_t = jax.random.fold_in(key, t)
        tok_B = sample(logits_BV, key_t, temperature=temperature, top_k=top_k, top_p=top_p)
        tok_B = jnp.where(done_B, 0, tok_B)
        out_BS = out_BS.at[:, t].set(tok_B)
        logits_BV, carry = advance(carry, tok_B, lengths_B + t)
        return t + 1, logits_BV, carry, out_BS, done_B | (tok_B == eos_id)

    init = (
        jnp.int32(0),
        logits_BLV[rows_B, lengths_B - 1],
        carry,
        jnp.zeros((B, max_new_tokens), jnp.int32),
        jnp.zeros((B,), bool),
    )
    return jax.lax.while_loop(cond, body, init)[3]
