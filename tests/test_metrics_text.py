"""BLEU and ROUGE against values computed by hand."""

import math

import pytest

from moe_jax.train import metrics_text


def test_bleu_identical_is_100_and_disjoint_is_0():
    refs = ["the cat sat on the mat today", "a quick brown fox jumps high"]
    assert metrics_text.bleu(refs, refs) == pytest.approx(100.0)
    assert metrics_text.bleu(["zz yy xx ww vv", "qq rr ss tt uu"], refs) == pytest.approx(0.0)
    assert metrics_text.bleu([], []) == 0.0


def test_bleu_matches_hand_computation():
    hyp = "the quick brown fox jumps over the dog"  # 8 tokens
    ref = "the quick brown fox jumps over the lazy dog"  # 9 tokens
    # n-gram precisions 8/8, 6/7, 5/6, 4/5; brevity penalty exp(1 - 9/8).
    expected = (
        100
        * math.exp(1 - 9 / 8)
        * math.exp((math.log(1) + math.log(6 / 7) + math.log(5 / 6) + math.log(4 / 5)) / 4)
    )
    assert metrics_text.bleu([hyp], [ref]) == pytest.approx(expected, abs=1e-4)


def test_rouge_matches_hand_computation():
    scores = metrics_text.rouge(["the cat sat"], ["the cat sat down"])
    # ROUGE-1: P 3/3, R 3/4 -> F 6/7. ROUGE-2: P 2/2, R 2/3 -> F 4/5. ROUGE-L: LCS 3 -> 6/7.
    assert scores["rouge1"] == pytest.approx(100 * 6 / 7)
    assert scores["rouge2"] == pytest.approx(100 * 4 / 5)
    assert scores["rougeL"] == pytest.approx(100 * 6 / 7)


def test_rouge_averages_over_examples_and_checks_lengths():
    scores = metrics_text.rouge(["the cat sat", "nothing here"], ["the cat sat", "entirely different"])
    assert scores == pytest.approx({"rouge1": 50.0, "rouge2": 50.0, "rougeL": 50.0})
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        metrics_text.rouge(["a", "b"], ["a"])
