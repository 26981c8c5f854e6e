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
