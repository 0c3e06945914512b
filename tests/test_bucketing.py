"""Length-bucketed training batches: each example once an epoch, similar lengths together, a few padded
shapes, deterministic, resumable, sharded; and the speech pipeline's use of them."""

import numpy as np
import pytest

from moe_jax.data.bucketing import bucket_length, bucketed_train_iterator, check_buckets, epoch_batches
from moe_jax.data.speech import SpeechData, train_tokenizer

RATE = 16_000
HOP = 160


def test_bucket_length_picks_the_smallest_that_fits():
    assert bucket_length(10, (16, 32, 64), 80) == 16
    assert bucket_length(16, (16, 32, 64), 80) == 16
    assert bucket_length(17, (64, 16, 32), 80) == 32
    assert bucket_length(65, (16, 32, 64), 80) == 80  # past the last bucket: the cap
    assert bucket_length(5, (), 80) == 80


@pytest.mark.parametrize(
    "buckets, message",
    [
        ((0, 16), "positive"),
        ((16, 16), "distinct"),
        ((16, 96), "above cap=80"),
        ("ab", "list of lengths"),
    ],
)
def test_bad_buckets_name_the_field(buckets, message):
    with pytest.raises(ValueError, match=message) as e:
        check_buckets(buckets, 80, "config.data.frame_buckets")
    assert "config.data.frame_buckets" in str(e.value)


def test_epoch_batches_cover_each_example_once_and_group_similar_lengths():
    rng = np.random.default_rng(0)
    lengths_N = rng.integers(50, 350, size=1003)
    batches_BK = epoch_batches(lengths_N, 16, seed=3, epoch=0, window_batches=1000)  # one window
    assert batches_BK.shape == (1003 // 16, 16)
    flat = batches_BK.ravel()
    assert len(np.unique(flat)) == flat.size and flat.max() < 1003
    # One window: sorted by their shortest example, the batches' length ranges do not overlap.
    spans = sorted((lengths_N[b].min(), lengths_N[b].max()) for b in batches_BK)
    assert all(hi <= nxt_lo for (_, hi), (nxt_lo, _) in zip(spans, spans[1:]))
    # Deterministic in (seed, epoch); another epoch or seed is another order.
    np.testing.assert_array_equal(
        batches_BK, epoch_batches(lengths_N, 16, seed=3, epoch=0, window_batches=1000)
    )
    assert not np.array_equal(batches_BK, epoch_batches(lengths_N, 16, seed=3, epoch=1, window_batches=1000))
    assert not np.array_equal(batches_BK, epoch_batches(lengths_N, 16, seed=4, epoch=0, window_batches=1000))


def test_windows_cut_padding_against_random_batches():
    lengths_N = np.random.default_rng(1).integers(60, 340, size=4096)
    buckets = (128, 192, 256, 352)

    def padded_fraction(batches_BK):
        padded = sum(bucket_length(lengths_N[b].max(), buckets, 352) * len(b) for b in batches_BK)
        return 1.0 - lengths_N[batches_BK].sum() / padded

    random_BK = np.random.default_rng(2).permutation(4096).reshape(-1, 32)
    bucketed_BK = epoch_batches(lengths_N, 32, seed=0, epoch=0, window_batches=32)
    assert padded_fraction(random_BK) > 0.4  # random batches almost always hold one long utterance
    assert padded_fraction(bucketed_BK) < 0.25


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "echo"]
    out = []
    for i in range(n):
        samples = rng.integers(30, 300) * HOP  # 31 to 300 frames
        out.append(
            {
                "speech": (rng.standard_normal(samples) * 3000).astype(np.int16),
                "text": " ".join(rng.choice(words, size=1 + i % 3)),
            }
        )
    return out


@pytest.fixture(scope="module")
def speech_data():
    examples = _examples(48)
    tok = train_tokenizer([e["text"] for e in examples], 64, "char")
    return SpeechData(
        tokenizer=tok,
        sources={"train": examples, "validation": examples[:8]},
        sample_rate=RATE,
        num_mel_bins=16,
        max_frames=304,
        max_target_len=24,
        name="in_memory",
        num_threads=1,
        frame_buckets=(96, 160, 224),
        bucket_window=6,
    )


def test_speech_batches_pad_to_their_bucket(speech_data):
    it = speech_data.train_iter(8, seed=0)
    seen = []
    for _ in range(12):  # two epochs of 6 batches
        batch = next(it)
        padded = batch["features"].shape[1]
        longest = int(batch["num_frames"].max())
        assert bucket_length(longest, (96, 160, 224), 304) == padded >= longest
        for row, n in zip(batch["features"], batch["num_frames"]):
            assert not row[n:].any() and row[:n].any()
        seen.append(batch["num_frames"])
    # 48 examples, 6 batches an epoch: each epoch holds every utterance once, in another order.
    every = np.sort(speech_data.frame_counts("train"))
    np.testing.assert_array_equal(np.sort(np.concatenate(seen[:6])), every)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen[6:])), every)
    assert not np.array_equal(np.concatenate(seen[:6]), np.concatenate(seen[6:]))
    # Evaluation stays at max_frames: a transcript never depends on its batch-mates.
    assert next(speech_data.eval_batches("validation", 4))["features"].shape[1] == 304


def test_speech_frame_counts_are_cached_and_exact(speech_data, tmp_path):
    import dataclasses

    from moe_jax.data.speech import log_mel

    cached = dataclasses.replace(speech_data, lengths_dir=str(tmp_path))
    counts = cached.frame_counts("train")
    for e, n in zip(speech_data.sources["train"][:5], counts):
        assert n == len(log_mel(e["speech"].astype(np.float32) / 32768, RATE, 16))
    np.testing.assert_array_equal(cached.frame_counts("train"), counts)  # now read back from the cache
    assert len(list(tmp_path.rglob("*.npy"))) == 1


def test_resume_replays_the_same_batches(speech_data):
    it = speech_data.train_iter(8, seed=5)
    next(it), next(it)
    state = it.get_state()
    expected = [next(it)["targets"] for _ in range(6)]  # crosses into the next epoch
    again = speech_data.train_iter(8, seed=5)
    again.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(again)["targets"], want)


def test_shards_are_disjoint():
    lengths_N = np.arange(40)
    source = [{"i": i} for i in range(40)]

    def first_epoch(index):
        it = bucketed_train_iterator(
            source,
            "t",
            4,
            lambda ex: {"i": np.array([e["i"] for e in ex])},
            lengths_N=lengths_N,
            seed=0,
            shard_index=index,
            num_shards=2,
            num_threads=1,
            window_batches=2,
        )
        return np.concatenate([next(it)["i"] for _ in range(5)])

    a, b = first_epoch(0), first_epoch(1)
    assert sorted(a) == list(range(0, 40, 2)) and sorted(b) == list(range(1, 40, 2))
