"""Text-generation metrics: corpus BLEU (sacrebleu) and ROUGE-1/2/L (rouge-score), both on a 0-100 scale."""

from __future__ import annotations

from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU with sacrebleu's defaults (13a tokenization, exp smoothing, one reference each).

    Args:
      hypotheses: model outputs, detokenized.
      references: one reference per hypothesis.

    Returns:
      BLEU in [0, 100]; 0.0 for empty input.
    """
    import sacrebleu

    _check(hypotheses, references)
    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge(
    hypotheses: Sequence[str], references: Sequence[str], *, use_stemmer: bool = True
) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over examples, as in the summarization literature (rouge-score, Porter stemmer).

    rouge-score's tokenizer keeps only ASCII letters and digits, so this suits English summaries.

    Args:
      hypotheses: model outputs.
      references: one reference per hypothesis.
      use_stemmer: stem words before matching (the usual setting for CNN/DailyMail and XSum numbers).

    Returns:
      ``{'rouge1': F, 'rouge2': F, 'rougeL': F}``, each the mean F1 x 100; zeros for empty input.
    """
    from rouge_score import rouge_scorer

    _check(hypotheses, references)
    if not hypotheses:
        return dict.fromkeys(ROUGE_TYPES, 0.0)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hypothesis, reference in zip(hypotheses, references):
        # score(target, prediction): the reference comes first.
        scores = scorer.score(reference, hypothesis)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(hypotheses) for key, total in totals.items()}
