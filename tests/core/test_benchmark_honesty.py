"""What makes the embedded benchmark honest: confidence intervals and paired tests with
hand-derived values, corruption that says whether the lesion evidence is gone, the visual gate
that keeps the reverse term where it is right, and sentence-style answers."""

from __future__ import annotations

import numpy as np
import pytest

from fire_mpo_core.corruption import corrupt
from fire_mpo_core.corruption.ops import dilate_mask
from fire_mpo_core.corruption.quality import corruption_quality
from fire_mpo_core.data.records import PreferencePair, VQARecord, lesion_removal_reverses
from fire_mpo_core.data.synthlesion import framed, sentence_answer
from fire_mpo_core.evaluation.metrics import closed_correct
from fire_mpo_core.evaluation.stats import mcnemar, paired_bootstrap, rate_with_ci, wilson_ci
from fire_mpo_core.losses import LossConfig
from fire_mpo_core.training.batching import load_pairs


def test_wilson_interval_hand_derived():
    # 2/3, z = 1.959964: centre (p + z^2/2n) / (1 + z^2/n) = 0.57309, half-width 0.36539.
    lo, hi = wilson_ci(2, 3)
    assert (lo, hi) == pytest.approx((0.20765, 0.93849), abs=1e-4)
    # 0/10: the interval starts at 0 and ends at 2 * centre = 2 * 0.19208 / 1.38415 = 0.27754.
    lo, hi = wilson_ci(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.27754, abs=1e-4)
    assert wilson_ci(0, 0) == (None, None)
    got = rate_with_ci("x", [True, False, True])
    assert got == {"x": 0.6667, "x_n": 3, "x_ci_low": 0.2077, "x_ci_high": 0.9385}


def test_mcnemar_exact_hand_derived():
    # a right where b is wrong 3 times, never the other way: p = 2 * 0.5^3 = 0.25.
    got = mcnemar([1, 1, 1, 0, 1], [0, 0, 0, 0, 1])
    assert (got["a_only"], got["b_only"], got["n"], got["diff"]) == (3, 0, 5, 0.6)
    assert got["p"] == pytest.approx(0.25)
    # 1 vs 1 discordant: p = 1; no discordant pair: p = 1.
    assert mcnemar([1, 0], [0, 1])["p"] == pytest.approx(1.0)
    assert mcnemar([1, 1], [1, 1])["p"] == 1.0
    with pytest.raises(ValueError, match="length"):
        mcnemar([1], [1, 0])


def test_paired_bootstrap_identical_and_shifted():
    same = paired_bootstrap([0.5, 0.2, 0.9], [0.5, 0.2, 0.9])
    assert same["diff"] == 0.0 and same["p"] == 1.0
    up = paired_bootstrap([1.0] * 30, [0.0] * 30)
    assert up["diff"] == 1.0 and up["ci_low"] == 1.0 and up["p"] == 0.0


def _scan(polarity: float):
    """A flat 100-grey image with a disk of +-40 (radius 5) at the centre: contrast 40."""
    yy, xx = np.mgrid[0:48, 0:48]
    lesion = (yy - 24) ** 2 + (xx - 24) ** 2 <= 25
    img = np.full((48, 48), 100, np.uint8)
    img[lesion] = 100 + polarity * 40
    return img, lesion


@pytest.mark.parametrize("polarity", [1.0, -1.0])
def test_evidence_numbers_hand_derived(polarity):
    img, lesion = _scan(polarity)
    region = dilate_mask(lesion, 2)
    # Noise keeps the lesion's mean shift: evidence stays (zero-mean noise, clipped at 0/255).
    noisy = corrupt(img, region, "noise", seed=0, sigma=45.0)
    q = corruption_quality(img, noisy, region, lesion)
    assert q.lesion_contrast_before == pytest.approx(40.0)
    assert q.evidence_remaining > 0.5 and q.evidence_removed is False
    # Inpainting the grown mask of a flat image fills it with (about) the background level.
    filled = corrupt(img, region, "inpaint", seed=0)
    q = corruption_quality(img, filled, region, lesion)
    assert q.lesion_contrast_after == pytest.approx(0.0, abs=2.0)
    assert q.evidence_remaining <= 0.05 and q.evidence_removed is True
    # Without the lesion's own mask there are no evidence numbers.
    assert corruption_quality(img, filled, region).evidence_removed is None


def _record(answer_type, qtype, mask="masks/a.png"):
    return VQARecord(
        id="r", image="images/a.png", mask=mask, question="q?", answer="yes",
        answer_type=answer_type, question_type=qtype, split="train",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("answer_type", "qtype", "chosen", "rejected", "mask", "expected"),
    [
        ("closed", "presence", "yes", "no", "m.png", True),
        (
            "closed",
            "quadrant",
            "Yes, based on the image.",
            "No, based on the image.",
            "m.png",
            True,
        ),
        ("closed", "count", "yes", "no", "m.png", True),
        ("closed", "presence", "no", "yes", "m.png", False),  # v' keeps "no" right
        ("closed", "modality", "yes", "no", "m.png", False),  # v' does not change modality
        ("closed", "side", "yes", "no", "m.png", False),  # a lesion attribute: undefined on v'
        ("closed", "presence", "yes", "no", None, False),  # lesion-free scan: nothing removed
        ("open", "count", "two", "none", "m.png", True),
        ("open", "count", "two", "one", "m.png", False),  # v' makes neither right
        ("open", "abnormality", "hyperdense round lesion", "none", "m.png", True),
        ("open", "location", "upper left", "lower right", "m.png", False),
    ],
)
def test_lesion_removal_reverses(answer_type, qtype, chosen, rejected, mask, expected):
    rec = _record(answer_type, qtype, mask)
    assert lesion_removal_reverses(rec, chosen, rejected) is expected


def test_visual_gate_drops_v_prime_where_the_reverse_term_is_wrong(tmp_path):
    def pair(i, reverses):
        return PreferencePair(
            id=f"p{i}", record_id=f"r{i}", image="images/a.png", question="q?",
            answer_type="closed", chosen="yes", rejected="no",
            chosen_spans=[(0, 3)], rejected_spans=[(0, 2)], verdict="correct",
            corrupted_image=f"images/c{i}.png", reverses_on_removal=reverses,
        )  # fmt: skip

    path = tmp_path / "data.jsonl"
    pairs = [pair(0, True), pair(1, False), pair(2, None)]
    path.write_text("".join(p.model_dump_json() + "\n" for p in pairs))
    ungated = load_pairs(path)
    assert [p.corrupted_image is not None for p in ungated] == [True, True, True]
    gated = load_pairs(path, visual_gate=True)
    assert [p.corrupted_image is not None for p in gated] == [True, False, False]
    with pytest.raises(ValueError, match="visual_gate"):
        LossConfig(name="dpo", visual_gate=True)
    with pytest.raises(ValueError, match="visual_direction"):
        LossConfig(name="fire_mpo", visual_direction="v1", visual_gate=True)


def test_sentence_answers_score_like_bare_ones():
    assert sentence_answer("upper left") == "Upper left, based on the image."
    assert closed_correct("yes", "Yes, based on the image.")
    assert closed_correct("Yes, based on the image.", "yes")
    assert not closed_correct("No, based on the image.", "Yes, based on the image.")
    # The frame is a property of the phrasing: stable, and about the configured share.
    qs = [f"Question number {i}?" for i in range(2000)]
    share = sum(framed(q, 0.5) for q in qs) / len(qs)
    assert 0.45 < share < 0.55 and framed(qs[0], 0.5) == framed(qs[0], 0.5)
    assert not any(framed(q, 0.0) for q in qs) and all(framed(q, 1.0) for q in qs)


def test_pair_statistics_hand_counted():
    from fire_mpo_core.judge.stats import pair_statistics

    def pair(chosen, cs, rejected, rs, reverses):
        return PreferencePair(
            id=chosen, record_id="r", image="images/a.png", question="q?", answer_type="closed",
            chosen=chosen, rejected=rejected, chosen_spans=cs, rejected_spans=rs,
            verdict="correct", reverses_on_removal=reverses,
        )  # fmt: skip

    pairs = [
        pair("yes", [(0, 3)], "no", [(0, 2)], True),  # 2 words, both in spans
        # "Yes, based on the image." 5 words, 1 in the span; same for the rejected side.
        pair("Yes, based on the image.", [(0, 3)], "No, based on the image.", [(0, 2)], False),
    ]
    assert pair_statistics(pairs) == {
        "span_word_share": round(4 / 12, 4),
        "pairs_all_span": 1,
        "visual_reversible": 1,
    }
