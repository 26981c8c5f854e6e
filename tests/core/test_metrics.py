"""Answer metrics on hand-worked examples."""

from __future__ import annotations

import pytest

from fire_mpo_core.evaluation.metrics import (
    closed_correct,
    exact_match,
    normalize,
    token_f1,
    token_recall,
    yes_no,
)


def test_normalize_and_yes_no_shortcut():
    assert normalize("The Lesion, in the Upper-Left!") == "lesion in upper-left"
    assert yes_no("Yes, there is a lesion.") == "yes"
    assert yes_no("There is no lesion; yes is wrong") == "no"  # first standalone token wins
    assert yes_no("nodule seen") is None  # 'no' inside a word does not count


@pytest.mark.parametrize(
    ("pred", "ref", "ok"),
    [
        ("yes", "yes", True),
        ("Yes, a focal lesion is present.", "yes", True),
        ("no", "yes", False),
        ("unclear", "no", False),
        ("CT", "ct", True),  # non yes/no closed answers: normalised exact match
        ("mri", "ct", False),
    ],
)
def test_closed_correct(pred, ref, ok):
    assert closed_correct(pred, ref) is ok


def test_open_metrics_hand_worked():
    # "two" normalises to "2", articles drop: exact match.
    assert exact_match("Two", "2") and exact_match("the upper left", "upper left")
    assert not exact_match("left upper", "upper left")  # exact match is order-sensitive
    # ref tokens {upper, left}; prediction has "left" only -> recall 1/2.
    assert token_recall("left", "upper left") == 0.5
    # pred [lesion, in, upper, right], ref [upper, left]: common 1 -> P=1/4, R=1/2,
    # F1 = 2 * (1/4 * 1/2) / (1/4 + 1/2) = 1/3.
    assert token_f1("lesion in upper right", "upper left") == pytest.approx(1 / 3)
    assert token_f1("", "upper left") == 0.0 and token_recall("x", "") == 0.0


# ---------------------------------------------------------------------------- reports


def test_bleu_hand_worked():
    from fire_mpo_core.evaluation.report_metrics import bleu

    # pred  "the cat sat on the mat" vs ref "the cat sat on a mat" (equal length: BP = 1).
    # Clipped n-gram precisions: 1-gram 5/6 ("the" twice vs once), 2-gram 3/5, 3-gram 2/4,
    # 4-gram 1/3. BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** (1/4).
    got = bleu(["The cat sat on the mat"], ["the cat sat on a mat"])  # lowercased
    assert got == pytest.approx((1 / 12) ** 0.25, abs=1e-6)
    assert bleu(["no effusion"], ["no effusion"]) == 0.0  # no 4-gram at all: BLEU-4 is 0
    assert bleu([], []) == 0.0


def test_rouge_l_and_report_metrics_hand_worked():
    from fire_mpo_core.evaluation.report_metrics import report_metrics, rouge_l

    # Stemmed tokens: LCS("the lung are clear", "lung were clear") = [lung, clear] = 2,
    # P = 2/4, R = 2/3, F = 2PR / (P + R) = 4/7.
    assert rouge_l("The lungs are clear.", "Lungs were clear.") == pytest.approx(4 / 7)
    m = report_metrics(["The lungs are clear."], ["Lungs were clear."])
    assert m["report_rouge_l"] == pytest.approx(4 / 7)
    # token F1: pred {lungs, are, clear}, ref {lungs, were, clear}: 2 common, P = R = 2/3.
    assert m["report_token_f1"] == pytest.approx(2 / 3)
    assert m["clinical_f1"] == 1.0  # both say ("lung", state, normal)
    assert report_metrics([], []) == {}
    with pytest.raises(ValueError, match="predictions"):
        report_metrics(["a"], [])


def test_extract_findings_negation_location_and_state():
    from fire_mpo_core.evaluation.clinical import extract_findings

    assert extract_findings("No pneumothorax or pleural effusion is seen.") == {
        ("pneumothorax", "absent", ""),
        ("effusion", "absent", ""),
    }
    # Location words of the sentence, synonyms folded, order-free: both are the same finding.
    a = extract_findings("There is a small hyperdense round lesion in the upper left region.")
    b = extract_findings("A small nodule is noted in the left upper quadrant.")
    assert a == b == {("lesion", "present", "left+upper")}
    assert extract_findings("The heart is not enlarged. The lungs are clear.") == {
        ("heart", "state", "normal"),
        ("lung", "state", "normal"),
    }
    assert extract_findings("Image quality is adequate.") == set()  # filler: no finding


def test_clinical_f1_hand_worked():
    from fire_mpo_core.evaluation.clinical import clinical_f1, finding_counts

    pred = "No pneumothorax. There is a small lesion in the right upper lobe. The heart is normal."
    ref = (
        "No pneumothorax or effusion. There is a small lesion in the left upper lobe. "
        "The heart is normal in size."
    )
    # pred {pneumothorax absent, lesion present right+upper, heart normal}
    # ref  {pneumothorax absent, effusion absent, lesion present left+upper, heart normal}
    # TP 2 (pneumothorax, heart), FP 1 (lesion on the wrong side), FN 2 (effusion, left lesion).
    assert finding_counts(pred, ref) == (2, 1, 2)
    m = clinical_f1([pred, "No focal lesion is seen."], [ref, "A lesion is seen."])
    # Second pair: (lesion absent) vs (lesion present): TP 0, FP 1, FN 1. Micro totals:
    # TP 2, FP 2, FN 3 -> P = 1/2, R = 2/5, F1 = 2 * 0.2 / 0.9 = 4/9.
    assert m["clinical_precision"] == pytest.approx(1 / 2)
    assert m["clinical_recall"] == pytest.approx(2 / 5)
    assert m["clinical_f1"] == pytest.approx(4 / 9)


def test_clinical_spans_mark_clinical_words_only():
    from fire_mpo_core.evaluation.clinical import clinical_spans

    text = "There is no lesion in the upper left."
    words = [text[s:e] for s, e in clinical_spans(text)]
    assert words == ["no", "lesion", "upper", "left"]
    assert clinical_spans("Yes") == [(0, 3)]
    assert clinical_spans("Image quality is adequate.") == []
