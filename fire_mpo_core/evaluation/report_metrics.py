"""Report-generation metrics: BLEU (sacrebleu), ROUGE-L (rouge-score), finding F1, token F1.

Both libraries are the reference implementations and run offline: sacrebleu's ``13a``
tokenizer and rouge-score's own tokenizer with the Porter stemmer are pure code (no NLTK data,
no Hub downloads)::

    from fire_mpo_core.evaluation.report_metrics import report_metrics
    report_metrics(predictions, references)
    # {'report_bleu': 0.31, 'report_rouge_l': 0.52, 'report_token_f1': 0.48,
    #  'clinical_precision': ..., 'clinical_recall': ..., 'clinical_f1': ...}

``report_bleu`` is corpus BLEU-4 on lowercased text, on a 0-1 scale (sacrebleu's score / 100) so
that every metric of ``metrics.json`` shares one scale; ``report_rouge_l`` is the mean ROUGE-L F
over reports.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from fire_mpo_core.evaluation.clinical import clinical_f1
from fire_mpo_core.evaluation.metrics import token_f1


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu defaults: ``13a`` tokens, exponential smoothing off), lowercased,
    on a 0-1 scale."""
    import sacrebleu

    _same_length(predictions, references)
    if not predictions:
        return 0.0
    score = sacrebleu.corpus_bleu(list(predictions), [list(references)], lowercase=True)
    return score.score / 100.0


@functools.cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one report (longest common subsequence of stemmed tokens)."""
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


def report_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU, mean ROUGE-L, mean token F1 and the clinical finding P / R / F1 of paired reports."""
    _same_length(predictions, references)
    n = len(predictions)
    if n == 0:
        return {}
    return {
        "report_bleu": bleu(predictions, references),
        "report_rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "report_token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n,
        **clinical_f1(predictions, references),
    }


def _same_length(a: Sequence[str], b: Sequence[str]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")
