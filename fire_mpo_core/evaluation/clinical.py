"""Rule-based clinical finding F1 for reports, and the clinical words of an answer.

A report is read sentence by sentence with the rules judge's parser
(:func:`fire_mpo_core.judge.reports.parse_frames`). Each clinical sentence gives findings::

    (finding, polarity, location)      e.g. ("effusion", "absent", ""),
                                            ("lesion", "present", "left+upper")
    (organ, "state", normal|abnormal)  e.g. ("heart", "state", "normal")

Finding nouns are grouped as the judge groups them (lesion / nodule / mass / tumor / opacity are
one ``lesion`` finding); polarity comes from a negation cue in the sentence ("No pneumothorax or
effusion" -> both absent); location is the sorted side / vertical words of the sentence (empty
for absent findings). A predicted finding counts as correct only if all three parts match a
reference finding, so a wrong side or a missed negation is an error, as in the paper's
fine-grained view::

    from fire_mpo_core.evaluation.clinical import clinical_f1, extract_findings
    extract_findings("No pneumothorax. Small lesion in the left upper lobe.")
    clinical_f1(predictions, references)   # {'clinical_precision', 'clinical_recall',
                                           #  'clinical_f1'}: micro-averaged over all reports

:func:`clinical_spans` marks the clinical words of a short answer or report (findings, organs,
attributes, negations, yes/no, counts); the attention-grounding metric reads attention on them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from fire_mpo_core.clinical.frames import parse_frames
from fire_mpo_core.clinical.lexicon import BUILTIN, LESION_LIKE, NORMAL_STATES, Lexicon, tokenize
from fire_mpo_core.clinical.polarity import is_negation

Finding = tuple[str, str, str]

#: Word keys that carry the answer of a closed or count question.
_ANSWER_WORDS = frozenset({"yes", "no", "none", "present", "absent", "single"})
_CLINICAL_KEYS = frozenset().union(*BUILTIN.values()) | LESION_LIKE | _ANSWER_WORDS


@functools.cache
def _lexicon() -> Lexicon:
    return Lexicon()


def extract_findings(text: str, lex: Lexicon | None = None) -> set[Finding]:
    """The set of (finding, polarity, location) and (organ, "state", value) tuples of a text."""
    lex = lex or _lexicon()
    toks = tokenize(text)
    out: set[Finding] = set()
    for f in parse_frames(text, toks, lex):
        if not f.clinical:
            continue
        if f.findings:
            polarity = "absent" if f.negated else "present"
            where = ""
            if not f.negated:
                words = {toks[i].key for c in ("side", "vertical") for i in f.attrs.get(c, [])}
                where = "+".join(sorted(words))
            for group in f.groups:
                out.add((group, polarity, where))
        else:
            state = toks[f.attrs["state"][0]].key
            value = "normal" if state in NORMAL_STATES else "abnormal"
            if f.negated:  # "the heart is not enlarged" -> normal
                value = "abnormal" if value == "normal" else "normal"
            for organ in f.organs:
                out.add((organ, "state", value))
    return out


def finding_counts(prediction: str, reference: str) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of one report's findings."""
    pred, ref = extract_findings(prediction), extract_findings(reference)
    tp = len(pred & ref)
    return tp, len(pred) - tp, len(ref) - tp


def clinical_f1(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Micro-averaged finding precision, recall and F1 over paired reports.

    Returns ``clinical_precision``, ``clinical_recall``, ``clinical_f1`` in [0, 1] (0.0 where
    the denominator is empty).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    tp = fp = fn = 0
    for p, r in zip(predictions, references):
        a, b, c = finding_counts(p, r)
        tp, fp, fn = tp + a, fp + b, fn + c
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"clinical_precision": precision, "clinical_recall": recall, "clinical_f1": f1}


def clinical_spans(text: str) -> list[tuple[int, int]]:
    """Half-open character spans of the clinical words of ``text``: finding nouns, organs,
    attribute words (side, size, intensity, ...), negation cues, yes / no / none, numbers."""
    toks = tokenize(text)
    spans = []
    for i, t in enumerate(toks):
        if (
            t.key in _CLINICAL_KEYS
            or t.key.isdigit()
            or _lexicon().is_finding(t.key)
            or is_negation(text, toks, i)
        ):
            spans.append((t.start, t.end))
    return spans
