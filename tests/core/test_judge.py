"""Tests of the rules judge, the minimality validator, the pair styles and the HF export.

Expected pairs are written out by hand: for each edit kind the exact chosen / rejected texts and
the [start, end) spans, with everything outside the spans byte-identical to the response. Every
pair the judge emits is also checked with the validator.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from fire_mpo_core.clinical.edits import Edit, apply_edits, changed_words, sentence_spans
from fire_mpo_core.clinical.lexicon import (
    Lexicon,
    antonym,
    article_for,
    content_keys,
    match_case,
    split_parts,
    tokenize,
    word_key,
)
from fire_mpo_core.config import CycleConfig
from fire_mpo_core.data.records import PreferencePair, Rollout, VQARecord
from fire_mpo_core.judge import (
    JUDGES,
    Judge,
    JudgeConfig,
    Rejection,
    RulesJudge,
    build_judge,
    judge_rollouts,
    stable_seed,
    validate_pair,
)
from testing_support import REPO
from testing_support.stage_inputs import rollout

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def rec(
    answer: str,
    question_type: str,
    answer_type: str = "open",
    question: str = "What is seen?",
    reference: str | None = None,
    rid: str = "r1",
) -> VQARecord:
    return VQARecord(
        id=rid,
        image="images/a.png",
        question=question,
        answer=answer,
        reference=reference,
        answer_type=answer_type,
        question_type=question_type,
        split="train",
    )


def roll(response: str, rid: str = "r1", k: int = 0) -> Rollout:
    return rollout(rid, response, k=k)


def pair_of(
    record: VQARecord,
    response: str,
    judge: RulesJudge | None = None,
    **cfg,
) -> PreferencePair:
    """Judge a response; it must become a pair that passes the validator."""
    judge = judge or RulesJudge(JudgeConfig(**cfg), [record])
    res = judge.judge(record, roll(response, record.id))
    assert isinstance(res, PreferencePair), res
    ref = (record.reference or record.answer) if res.style == "gt_style" else None
    assert validate_pair(res, response, judge.config, reference=ref) is None
    return res


def texts(p: PreferencePair) -> tuple[list[str], list[str]]:
    return [p.chosen[s:e] for s, e in p.chosen_spans], [
        p.rejected[s:e] for s, e in p.rejected_spans
    ]


def make_pair(chosen, rejected, cs, rs, verdict="incorrect", answer_type="open", style="on_policy"):
    return PreferencePair(
        id="x#0",
        record_id="x",
        image="images/a.png",
        question="q",
        answer_type=answer_type,
        chosen=chosen,
        rejected=rejected,
        chosen_spans=cs,
        rejected_spans=rs,
        verdict=verdict,
        style=style,
    )


# ----------------------------------------------------------------------------------------------
# Config, registry, lexicon basics
# ----------------------------------------------------------------------------------------------


def test_config_defaults_forbid_extra_and_check_name():
    cfg = JudgeConfig()
    assert (cfg.name, cfg.style, cfg.max_changed_fraction, cfg.max_changed_words) == (
        "rules",
        "on_policy",
        0.5,
        3,
    )
    with pytest.raises(ValidationError, match="extra"):
        JudgeConfig(temperature=0.1)
    # The name is checked against the registry where the registry is importable: by the cycle
    # config (naming the field) and by build_judge (the judges import JudgeConfig).
    unknown = re.escape("judge.name 'gpt' is unknown; known: ['llm', 'rules']")
    with pytest.raises(ValidationError, match=unknown):
        CycleConfig(judge={"name": "gpt"})
    with pytest.raises(ValueError, match=unknown):
        build_judge(JudgeConfig(name="gpt"))
    with pytest.raises(ValidationError, match="needs the `llm` section"):
        JudgeConfig(name="llm")
    with pytest.raises(ValidationError):
        JudgeConfig(style="dpo")
    with pytest.raises(ValidationError):
        JudgeConfig(max_changed_fraction=0.0)
    assert all(f.description for f in JudgeConfig.model_fields.values())
    assert JUDGES["rules"] is RulesJudge
    judge = build_judge(cfg, [])
    assert isinstance(judge, RulesJudge) and isinstance(judge, Judge)


def test_word_keys_numbers_aliases_plurals():
    assert word_key("Two") == word_key("2") == "2"
    assert word_key("lungs") == "lung" and word_key("arteries") == "artery"
    assert word_key("pelvis") == "pelvis" and word_key("mass") == "mass"
    assert word_key("Top") == word_key("upper") == "upper"
    assert [t.key for t in tokenize("An X-Ray, then computed tomography")] == [
        "an",
        "xray",
        "then",
        "ct",
    ]
    assert content_keys("The Lower  Left Lung") == ("lower", "left", "lung")


def test_antonyms_articles_and_case():
    assert antonym("Left") == "right" and antonym("upper") == "lower"
    assert antonym("two") == "one" and antonym("1") == "2" and antonym("3") == "2"
    assert antonym("ct") == "mri" and antonym("hyperattenuating") == "hypoattenuating"
    assert antonym("4th") == "3rd"
    assert article_for("MRI") == "an" and article_for("CT") == "a"
    assert article_for("X-ray") == "an" and article_for("upper") == "an"
    assert article_for("lesion") == "a" and article_for("unit") == "a"
    assert match_case("Left", "right") == "Right"
    assert match_case("LEFT", "right") == "RIGHT"
    assert match_case("left", "Upper Left") == "upper left"
    assert match_case("CT", "mri") == "MRI" and match_case("ct", "mri") == "mri"


def test_sentence_spans_and_apply_edits():
    text = "No lesion. The mass is 3.4 cm wide! Done"
    assert [text[s:e] for s, e in sentence_spans(text)] == [
        "No lesion.",
        "The mass is 3.4 cm wide!",
        "Done",
    ]
    new, old, spans = apply_edits("left upper lobe", [Edit(0, 4, "right"), Edit(5, 10, "lower")])
    assert new == "right lower lobe"
    assert old == [(0, 4), (5, 10)] and spans == [(0, 5), (6, 11)]
    # Touching edits merge into one span.
    new, old, spans = apply_edits("ab", [Edit(0, 1, "x"), Edit(1, 2, "yz")])
    assert (new, old, spans) == ("xyz", [(0, 2)], [(0, 3)])
    with pytest.raises(ValueError, match="overlapping"):
        apply_edits("abc", [Edit(0, 2, "x"), Edit(1, 3, "y")])
    with pytest.raises(ValueError, match="invalid edit"):
        apply_edits("abc", [Edit(1, 1, "x")])


def test_lexicon_from_records_tags_and_vocabulary():
    recs = [
        rec("Liver", "Organ", rid="a"),
        rec("Small Bowel", "Organ", rid="b"),
        rec("Yes", "Organ", "closed", rid="c"),
        rec("upper left and lower right", "location", rid="d"),
    ]
    lex = Lexicon.from_records(recs)
    organs = {p.text for p in lex.vocabulary("Organ".lower())}
    assert {"Liver", "Small Bowel"} <= organs and "Yes" not in organs
    assert {p.keys for p in lex.vocabulary("location")} >= {("upper", "left"), ("lower", "right")}
    assert "organ" in lex.tags("bowels") and "location" in lex.tags("upper")
    assert lex.is_finding("nodule") and not lex.is_finding("left")


# ----------------------------------------------------------------------------------------------
# Yes/no
# ----------------------------------------------------------------------------------------------


YN = dict(question_type="presence", answer_type="closed", question="Is there a lesion?")


def test_yes_no_bare_answers():
    p = pair_of(rec("yes", **YN), "Yes.")
    assert (p.verdict, p.chosen, p.rejected) == ("correct", "Yes.", "No.")
    assert (p.chosen_spans, p.rejected_spans) == ([(0, 3)], [(0, 2)])
    p = pair_of(rec("Yes", **YN), "NO")
    assert (p.verdict, p.chosen, p.rejected) == ("incorrect", "YES", "NO")


def test_yes_no_first_token_and_consistent_clause():
    # The first yes/no word decides; the clause after it follows ("no lesion" -> "a lesion").
    p = pair_of(rec("yes", **YN), "No, there is no lesion.")
    assert p.verdict == "incorrect"
    assert p.rejected == "No, there is no lesion."
    assert p.chosen == "Yes, there is a lesion."
    assert texts(p) == (["Yes", "a"], ["No", "no"])
    assert p.chosen_spans == [(0, 3), (14, 15)] and p.rejected_spans == [(0, 2), (13, 15)]
    p = pair_of(rec("yes", **YN), "Yes, there is a lesion in the liver.")
    assert p.rejected == "No, there is no lesion in the liver."
    # A contrast "not" after the answer word is left alone (strict clause edits).
    p = pair_of(rec("no", **YN), "No, this is a CT, not an MRI.")
    assert (p.verdict, p.rejected) == ("correct", "Yes, this is a CT, not an MRI.")


def test_yes_no_quantifier_and_negation_without_yes_no_word():
    p = pair_of(rec("yes", **YN), "There is no lesion.")
    assert (p.verdict, p.chosen) == ("incorrect", "There is a lesion.")
    assert texts(p) == (["a"], ["no"])
    # Plural head: the quantifier is dropped, the next word carried into the span.
    p = pair_of(rec("yes", **YN), "No lesions are seen.")
    assert p.chosen == "Lesions are seen."
    assert texts(p) == (["Lesions"], ["No lesions"])
    p = pair_of(rec("yes", **YN), "The lesion is not visible.")
    assert p.chosen == "The lesion is visible."
    p = pair_of(rec("no", **YN), "A focal lesion is present.")
    assert (p.verdict, p.chosen) == ("incorrect", "No focal lesion is present.")


def test_no_answer_is_rejected_with_reason():
    judge = RulesJudge(JudgeConfig(), [])
    r = rec("yes", **YN)
    for response, code in (
        ("", "empty_response"),
        ("  ...  ", "empty_response"),
        ("blah blah", "no_answer_found"),
        ("I cannot answer that.", "no_answer_found"),
    ):
        res = judge.judge(r, roll(response))
        assert isinstance(res, Rejection) and res.code == code and res.reason
        assert (res.id, res.record_id) == ("r1#0", "r1")
    res = judge.judge(rec("left", "side"), roll("I am not sure what you mean."))
    assert isinstance(res, Rejection) and res.code == "no_answer_found"


# ----------------------------------------------------------------------------------------------
# Term answers
# ----------------------------------------------------------------------------------------------


def test_side_embedded_in_sentence_keeps_bytes_outside_span():
    r = rec("left", "side", question="Which side is the lesion on?")
    resp = "The lesion is on the RIGHT side, near the rib."
    p = pair_of(r, resp)
    assert p.verdict == "incorrect" and p.rejected == resp
    assert p.chosen == "The lesion is on the LEFT side, near the rib."
    assert p.rejected_spans == [(21, 26)] and p.chosen_spans == [(21, 25)]
    s, e = p.chosen_spans[0]
    assert p.chosen[:s] == resp[:21] and p.chosen[e:] == resp[26:]
    p = pair_of(r, "The lesion is on the left side.")
    assert (p.verdict, p.rejected) == ("correct", "The lesion is on the right side.")


def test_quadrant_order_free_and_two_word_fix():
    r = rec("upper left", "location", question="Where is the lesion?")
    p = pair_of(r, "left upper")
    assert p.verdict == "correct"
    assert p.rejected in {"right upper", "left lower"}
    p = pair_of(r, "The lesion is in the lower right region.")
    assert p.chosen == "The lesion is in the upper left region."
    assert texts(p) == (["upper", "left"], ["lower", "right"])
    # Two lesions: the list answer is matched item by item.
    r2 = rec("upper left and lower right", "location", question="Where are the lesions?")
    p = pair_of(r2, "upper left and upper right")
    assert p.chosen == "upper left and lower right" and texts(p) == (["lower"], ["upper"])
    res = RulesJudge(JudgeConfig(), [r2]).judge(r2, roll("upper left"))
    assert isinstance(res, Rejection) and res.code == "partial_answer"


def test_over_listed_item_is_deleted():
    r = rec("lower left", "location", question="Where is the lesion?")
    p = pair_of(r, "The lesions are in the upper left and lower left quadrants.")
    assert p.verdict == "incorrect"
    assert p.chosen == "The lesions are in the lower left quadrants."
    assert texts(p) == (["lower"], ["upper left and lower"])


def test_counts_words_and_digits():
    r = rec("two", "count", question="How many lesions are there?")
    assert pair_of(r, "2").verdict == "correct"
    assert pair_of(r, "2").rejected == "1"
    p = pair_of(r, "There are 3 lesions.")
    assert (p.verdict, p.chosen) == ("incorrect", "There are 2 lesions.")
    p = pair_of(r, "One.")
    assert p.chosen == "Two."
    p = pair_of(rec("2", "Quantity"), "There are two nodules.")
    assert (p.verdict, p.rejected) == ("correct", "There are one nodules.")
    # Zero: "no" before a noun, "none" alone.
    r0 = rec("none", "count", question="How many lesions are there?")
    assert pair_of(r0, "There are two lesions.").chosen == "There are no lesions."
    assert pair_of(r0, "two").chosen == "none"
    p = pair_of(r0, "There are no lesions.")
    assert (p.verdict, p.rejected) == ("correct", "There are two lesions.")


def test_size_and_intensity():
    r = rec("small", "size", question="How large is the lesion?")
    p = pair_of(r, "The lesion is small.")
    assert p.rejected == "The lesion is large."
    p = pair_of(r, "It is a large lesion.")
    assert p.chosen == "It is a small lesion."
    r = rec("hyperdense round lesion", "abnormality", question="What abnormality is seen?")
    p = pair_of(r, "A hypodense oval lesion.")
    assert p.chosen == "A hyperdense round lesion."
    assert texts(p) == (["hyperdense", "round"], ["hypodense", "oval"])


def test_modality_with_article_agreement_and_aliases():
    r = rec("ct", "modality", question="What modality is this?")
    p = pair_of(r, "This is a CT scan.")
    assert p.rejected == "This is an MRI scan."
    assert texts(p) == (["a CT"], ["an MRI"])
    p = pair_of(r, "This is an MRI.")
    assert (p.verdict, p.chosen) == ("incorrect", "This is a CT.")
    rx = rec("x-ray", "modality")
    for resp in ("X-Ray", "This is an xray.", "A radiograph."):
        assert pair_of(rx, resp).verdict == "correct"
    p = pair_of(rx, "This is an x-ray.")
    assert p.rejected == "This is a ct."  # lowercase style of the response kept


def test_open_vocabulary_counterfactual_from_dataset_vocabulary():
    recs = [rec(a, "Organ", rid=f"o{i}") for i, a in enumerate(["Liver", "Spleen", "Kidney"])]
    judge = RulesJudge(JudgeConfig(seed=0), recs)
    r = recs[0]
    seen = set()
    for k in range(12):
        res = judge.judge(r, roll("The liver is enlarged.", "o0", k))
        assert isinstance(res, PreferencePair) and res.verdict == "correct"
        assert validate_pair(res, "The liver is enlarged.") is None
        (new,) = texts(res)[1]
        assert new in {"spleen", "kidney"}
        seen.add(new)
    assert seen == {"spleen", "kidney"}  # both alternatives get drawn over 12 rollouts
    # Wrong organ: only the organ word is replaced, in the response's case.
    p = pair_of(r, "The Spleen is enlarged.", judge)
    assert p.chosen == "The Liver is enlarged."


def test_multi_word_terms():
    recs = [rec("Lower Left Lung", "Position", rid="p"), rec("Lung", "Organ", rid="q")]
    judge = RulesJudge(JudgeConfig(), [*recs, rec("Small Bowel", "Organ", rid="s")])
    p = pair_of(recs[0], "It is in the upper left lung.", judge)
    assert p.chosen == "It is in the lower left lung." and texts(p) == (["lower"], ["upper"])
    # A different multi-word term is replaced as a unit, not word by word ("small lung").
    p = pair_of(recs[1], "The small bowel.", judge)
    assert p.chosen == "The lung." and texts(p) == (["lung"], ["small bowel"])
    # Superset answers are right: "left upper lobe" answers "left".
    assert pair_of(rec("left", "side"), "In the left upper lobe.").verdict == "correct"


def test_answer_with_function_words_matches_verbatim():
    r = rec("proximal aspect of the appendix", "POS", question="Where is the obstruction?")
    p = pair_of(r, "It is at the proximal aspect of the appendix.")
    assert p.verdict == "correct"
    assert p.rejected == "It is at the distal aspect of the appendix."


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------

REPORT = (
    "The patient is positioned appropriately. There is a small hyperdense round lesion in the "
    "upper left region. No motion artifact is present."
)


def report(answer: str = REPORT, reference: str | None = None) -> VQARecord:
    return rec(answer, "report", "report", "Describe the findings.", reference=reference)


def test_report_wrong_attributes_fixed_in_place():
    resp = (
        "The patient is positioned appropriately. There is a large hyperdense oval lesion in the "
        "upper right region. No motion artifact is present."
    )
    p = pair_of(report(), resp)
    assert p.verdict == "incorrect" and p.rejected == resp
    assert p.chosen == REPORT
    assert texts(p) == (["small", "round", "left"], ["large", "oval", "right"])
    assert len(sentence_spans(p.chosen)) == len(sentence_spans(resp)) == 3


def test_report_presence_flip_and_hallucination():
    # The model misses the lesion: "No focal lesion is seen." -> "A focal lesion is seen."
    ref = "There is a small round lesion in the upper left region. Image quality is adequate."
    resp = "No focal lesion is seen. Image quality is adequate."
    p = pair_of(report(ref), resp)
    assert p.chosen == "A focal lesion is seen. Image quality is adequate."
    # The model reports a lesion the reference does not have.
    ref = "No focal lesion is seen. Image quality is adequate."
    resp = "There is a large lesion in the lower right region. Image quality is adequate."
    p = pair_of(report(ref), resp)
    assert (
        p.chosen == "There is no large lesion in the lower right region. Image quality is adequate."
    )


def test_report_correct_gets_one_locked_counterfactual():
    p = pair_of(report(), REPORT)
    assert p.verdict == "correct" and p.chosen == REPORT
    (old,), (new,) = texts(p)
    assert (old, new) in {
        ("small", "large"),
        ("hyperdense", "hypodense"),
        ("round", "irregular"),
        ("upper", "lower"),
        ("left", "right"),
    }
    assert changed_words(p.chosen, p.rejected) == 1
    # Filler sentences are never touched.
    assert p.rejected.startswith("The patient is positioned appropriately. There is a ")
    assert p.rejected.endswith(" region. No motion artifact is present.")


def test_report_too_many_errors_and_omission_rejected():
    judge = RulesJudge(JudgeConfig(), [])
    resp = (
        "The patient is positioned appropriately. There is a large hypodense oval lesion in the "
        "lower right region. No motion artifact is present."
    )
    res = judge.judge(report(), roll(resp))
    assert isinstance(res, Rejection) and res.code == "not_minimal"
    assert "5 changed words" in res.reason
    # The second lesion of the reference is missing: no in-place edit can add a sentence.
    two = REPORT + " There is a large hypodense oval lesion in the lower right region."
    res = judge.judge(report(two), roll(REPORT))
    assert isinstance(res, Rejection) and res.code == "omission"
    res = judge.judge(report(), roll("The patient is positioned appropriately."))
    assert isinstance(res, Rejection) and res.code == "no_answer_found"


# ----------------------------------------------------------------------------------------------
# Pair styles
# ----------------------------------------------------------------------------------------------


def test_gt_style_pairs():
    r = rec(
        "upper left",
        "location",
        question="Where is the lesion?",
        reference="The lesion is located in the left upper quadrant.",
    )
    # Wrong response: chosen = reference, rejected = the response itself (different style).
    p = pair_of(r, "lower right", style="gt_style")
    assert (p.style, p.verdict, p.chosen, p.rejected) == (
        "gt_style",
        "incorrect",
        r.reference,
        "lower right",
    )
    assert texts(p) == (["left upper"], ["lower", "right"])
    # Right response: rejected = the reference with its answer flipped (a minimal edit).
    p = pair_of(r, "upper left", style="gt_style")
    assert p.chosen == r.reference and changed_words(p.chosen, p.rejected) == 1
    assert p.rejected in {
        "The lesion is located in the right upper quadrant.",
        "The lesion is located in the left lower quadrant.",
    }
    # A reference that does not state the answer cannot be a chosen text.
    bad = rec("left", "side", reference="See the image.")
    res = RulesJudge(JudgeConfig(style="gt_style"), [bad]).judge(bad, roll("left"))
    assert isinstance(res, Rejection) and res.code == "no_answer_found"


def test_style_agnostic_pairs():
    r = rec("upper left", "location", question="Where is the lesion?")
    p = pair_of(r, "The lesion sits in the lower right region.", style="style_agnostic")
    assert (p.chosen, p.rejected) == ("The answer is upper left.", "The answer is lower right.")
    assert (p.chosen_spans, p.rejected_spans) == ([(14, 24)], [(14, 25)])
    p = pair_of(rec("yes", **YN), "Yes, it is there.", style="style_agnostic")
    assert (p.chosen, p.rejected) == ("The answer is yes.", "The answer is no.")
    p = pair_of(report(), REPORT, style="style_agnostic")
    assert p.chosen == REPORT and changed_words(p.chosen, p.rejected) == 1


# ----------------------------------------------------------------------------------------------
# Validator
# ----------------------------------------------------------------------------------------------


def test_validator_accepts_minimal_pair():
    resp = "The lesion is on the right side."
    p = make_pair("The lesion is on the left side.", resp, [(21, 25)], [(21, 26)])
    assert validate_pair(p, resp) is None


@pytest.mark.parametrize(
    ("chosen", "rejected", "cs", "rs", "why"),
    [
        # whole rewrite
        ("Left.", "The lesion is on the right side.", [(0, 4)], [(0, 31)], "7 of 7 words"),
        (
            "It is certainly located over on the left.",
            "The lesion is on the right side of it.",
            [(0, 41)],
            [(0, 38)],
            "not minimal",
        ),
        # wrong span: the texts also differ outside it
        (
            "The lesion is on the left side.",
            "The lesion is on the right side.",
            [(0, 3)],
            [(0, 3)],
            "outside",
        ),
        # empty, out-of-bounds, overlapping, unsorted spans
        (
            "The lesion is on the left side.",
            "The lesion is on the right side.",
            [(21, 21)],
            [(21, 26)],
            "empty",
        ),
        (
            "The lesion is on the left side.",
            "The lesion is on the right side.",
            [(21, 99)],
            [(21, 26)],
            "out of bounds",
        ),
        (
            "The lesion is on the left side.",
            "The lesion is on the right side.",
            [(21, 25), (22, 24)],
            [(21, 26), (22, 24)],
            "not sorted",
        ),
        # spans that change nothing but punctuation, or only the case / a synonym
        ("Left!", "Left.", [(4, 5)], [(4, 5)], "holds no word"),
        ("Left", "LEFT", [(0, 4)], [(0, 4)], "synonym or case"),
        ("An x-ray.", "An radiograph.", [(3, 8)], [(3, 13)], "synonym"),
        ("Left.", "Left.", [(0, 4)], [(0, 4)], "identical"),
        ("The left.", "The right.", [(4, 8)], [(4, 9), (0, 3)], "spans"),
    ],
)
def test_validator_rejects_with_reason(chosen, rejected, cs, rs, why):
    p = make_pair(chosen, rejected, cs, rs)
    reason = validate_pair(p, rejected)
    assert reason is not None and why in reason, reason


def test_validator_on_policy_side_and_short_answer_cap():
    resp = "The lesion is on the right side."
    p = make_pair("The lesion is on the left side.", resp, [(21, 25)], [(21, 26)])
    assert "not the sampled response" in validate_pair(p, "Something else.")
    # A bare answer may be all span, but no more than max_changed_words words.
    p = make_pair("upper left lung", "lower right kidney", [(0, 15)], [(0, 18)])
    assert validate_pair(p, "lower right kidney") is None
    p = make_pair("a b c d", "e f g h", [(0, 7)], [(0, 7)])
    assert "not minimal" in validate_pair(p, "e f g h", JudgeConfig(fraction_min_words=5))


def test_validator_report_rules():
    resp = "There is a large lesion in the upper right. The heart is normal."
    ok = "There is a small lesion in the upper left. The heart is normal."
    p = make_pair(ok, resp, [(11, 16), (37, 41)], [(11, 16), (37, 42)], answer_type="report")
    assert validate_pair(p, resp) is None
    # Four words changed in one sentence (cap 3), though only 4/13 of the report.
    bad = "There is a small nodule in the lower left. The heart is normal."
    p = make_pair(bad, resp, [(11, 41)], [(11, 42)], answer_type="report")
    assert "sentence 0" in validate_pair(p, resp, JudgeConfig(max_changed_fraction=1.0))
    # Sentence count changed by a span that adds a full stop.
    bad = "There is a small. Lesion in the upper right. The heart is normal."
    p = make_pair(bad, resp, [(11, 24)], [(11, 23)], answer_type="report")
    reason = validate_pair(p, resp)
    assert reason is not None and "sentence count" in reason


# ----------------------------------------------------------------------------------------------
# Batch helper, determinism
# ----------------------------------------------------------------------------------------------


def test_judge_rollouts_splits_pairs_and_rejections():
    recs = [rec("left", "side", rid="a"), rec("yes", rid="b", **YN)]
    rolls = [roll("left", "a"), roll("gibberish qq", "b"), roll("yes", "zzz")]
    pairs, rejects = judge_rollouts(RulesJudge(JudgeConfig(), recs), recs, rolls)
    assert [p.id for p in pairs] == ["a#0"]
    assert [(r.id, r.code) for r in rejects] == [
        ("b#0", "no_answer_found"),
        ("zzz#0", "unknown_record"),
    ]
    with pytest.raises(ValueError, match="answers"):
        RulesJudge(JudgeConfig(), recs).judge(recs[0], roll("left", "b"))


def test_stable_seed_is_sha256_based():
    import hashlib

    want = int.from_bytes(hashlib.sha256(b"7:r1#0").digest()[:8], "big")
    assert stable_seed(7, "r1#0") == want
    assert stable_seed(7, "r1#0") != stable_seed(8, "r1#0")


def _judge_dump(seed: int) -> list[str]:
    recs = [
        rec(a, "Organ", rid=f"o{i}") for i, a in enumerate(["Liver", "Spleen", "Kidney", "Heart"])
    ]
    judge = RulesJudge(JudgeConfig(seed=seed), recs)
    out = []
    for k in range(8):
        res = judge.judge(recs[k % 4], roll(f"The {recs[k % 4].answer.lower()}.", f"o{k % 4}", k))
        out.append(res.model_dump_json())
    return out


def test_determinism_across_processes_and_seeds():
    assert _judge_dump(0) == _judge_dump(0)
    assert _judge_dump(0) != _judge_dump(1)
    code = (
        "import json; from tests.core.test_judge import _judge_dump; "
        "print(json.dumps(_judge_dump(0)))"
    )
    outs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        outs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1] == _judge_dump(0)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def test_export_hf_dataset_roundtrip(tmp_path):
    import datasets

    (tmp_path / "data" / "images").mkdir(parents=True)
    img = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(img).save(tmp_path / "data" / "images" / "a.png")
    (tmp_path / "corrupt").mkdir()
    Image.fromarray(255 - img).save(tmp_path / "corrupt" / "a-noise.png")
    from fire_mpo_core.data.export import export_hf_dataset

    p1 = pair_of(rec("left", "side"), "The lesion is on the right side.")
    p2 = p1.model_copy(update={"id": "r1#1", "corrupted_image": "a-noise.png"})
    out = tmp_path / "hf"
    export_hf_dataset(
        [p1, p2], tmp_path / "data", out, corrupt_root=tmp_path / "corrupt", conversational=False
    )
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == 2
    assert {
        "images",
        "prompt",
        "chosen",
        "rejected",
        "id",
        "chosen_spans",
        "rejected_spans",
    } <= set(ds.column_names)
    row = ds[1]
    assert row["prompt"] == "What is seen?" and row["chosen"] == p1.chosen
    assert row["rejected"] == p1.rejected and row["verdict"] == "incorrect"
    assert row["chosen_spans"] == [list(s) for s in p1.chosen_spans]
    assert row["corrupted_image"] == "a-noise.png" and ds[0]["corrupted_image"] is None
    (im,) = row["images"]
    assert np.array_equal(np.asarray(im), img)  # the bytes are in the dataset
    assert np.array_equal(np.asarray(row["corrupted_images"][0]), 255 - img)
    assert ds[0]["corrupted_images"] == []
    # Conversational format (the default), with the plain texts under their own names.
    ds = export_hf_dataset([p1], tmp_path / "data", tmp_path / "hf2")
    row = datasets.load_from_disk(str(tmp_path / "hf2"))[0]
    assert (row["question"], row["chosen_text"]) == ("What is seen?", p1.chosen)
    assert row["prompt"][0]["role"] == "user"
    assert [c["type"] for c in row["prompt"][0]["content"]] == ["image", "text"]
    assert row["chosen"] == [
        {"role": "assistant", "content": [{"type": "text", "text": p1.chosen}]}
    ]
    with pytest.raises(FileNotFoundError):
        export_hf_dataset(
            [p1.model_copy(update={"image": "nope.png"})], tmp_path / "data", tmp_path / "x"
        )


# ----------------------------------------------------------------------------------------------
# SynthLesion: synthetic on-policy responses
# ----------------------------------------------------------------------------------------------

_SWAP = {
    "left": "right", "right": "left", "upper": "lower", "lower": "upper", "small": "large",
    "large": "small", "medium": "small", "hyperdense": "hypodense", "hypodense": "hyperdense",
    "round": "oval", "oval": "round", "irregular": "round",
}  # fmt: skip
_TEMPLATES = ("{}", "{}.", "The answer is {}.", "I think it is {}.")


def _wrong_report(answer: str) -> str:
    words = answer.split(" ")
    for i, w in enumerate(words):
        if w in _SWAP:
            words[i] = _SWAP[w]
            return " ".join(words)
    return answer.replace(
        "No focal lesion is seen.", "There is a small round lesion in the upper left region."
    )


def test_synthlesion_pair_rate(tmp_path):
    synth = pytest.importorskip("fire_mpo_core.data.synthlesion")
    from fire_mpo_core.config import DataConfig

    cfg = DataConfig(n_train_images=60, n_val_images=0, n_test_images=1, image_size=128, seed=3)
    synth.generate_synthlesion(cfg, tmp_path)
    recs = [r for r in synth.load_records(tmp_path) if r.split == "train"]
    rng = random.Random(0)
    by_type: dict[tuple[str, str], list[str]] = {}
    for r in recs:
        by_type.setdefault((r.answer_type, r.question_type), []).append(r.answer)
    judge = RulesJudge(JudgeConfig(), recs)
    rolls, truth = [], {}
    for k, r in enumerate(recs):
        right = k % 2 == 0
        if right:
            ans = r.answer
        elif r.answer_type == "report":
            ans = _wrong_report(r.answer)
        elif r.answer in ("yes", "no"):
            ans = "no" if r.answer == "yes" else "yes"
        else:
            # A wrong answer of the same question type listing as many items (a two-lesion
            # answer for a one-lesion scan is an over-listing no 50% edit can fix).
            n_items = len(split_parts(r.answer))
            alts = sorted(
                a
                for a in set(by_type[(r.answer_type, r.question_type)])
                if set(content_keys(a)) != set(content_keys(r.answer))
                and len(split_parts(a)) == n_items
            )
            ans = rng.choice(alts) if alts else r.answer
            right = not alts
        resp = ans if r.answer_type == "report" else rng.choice(_TEMPLATES).format(ans)
        rolls.append(roll(resp, r.id))
        truth[r.id] = right
    pairs, rejects = judge_rollouts(judge, recs, rolls)
    rate = len(pairs) / len(rolls)
    by_code: dict[str, int] = {}
    for rj in rejects:
        by_code[rj.code] = by_code.get(rj.code, 0) + 1
    print(
        f"\nSynthLesion train: {len(rolls)} rollouts -> {len(pairs)} pairs ({rate:.1%}); {by_code}"
    )
    assert rate >= 0.95
    responses = {ro.id: ro.response for ro in rolls}
    for p in pairs:
        assert validate_pair(p, responses[p.id]) is None
        assert p.verdict == ("correct" if truth[p.record_id] else "incorrect")
    assert "invalid_pair" not in by_code
