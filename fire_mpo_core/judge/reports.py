"""Structurally locked report judging: compare findings sentence by sentence, edit words in place.

A report (``answer_type == 'report'``) is split into sentences; a *clinical* sentence names a
finding (lesion, nodule, effusion, ...) or states an organ's condition ("The heart is normal
in size."); the rest is filler and is never touched. Each clinical sentence becomes a
:class:`Frame`: its finding groups (lesion / nodule / mass / tumor / opacity count as one group,
so they align but are never swapped), negation (present / absent) and attributes (side,
upper/lower, size, intensity, shape, count, severity, organ state).

Response frames are aligned one-to-one with the reference's (``record.answer``) by shared finding
group, then attribute agreement, then sentence order. Then, in place:

* presence differs -> the response sentence's polarity is flipped ("No focal lesion is seen." ->
  "A focal lesion is seen."); a positive finding the reference does not have is negated;
* attribute values differ (compared by key, so "top" == "upper": no synonym swaps) -> the
  response's word is replaced by the reference's value ("upper left" -> "lower left");
* a reference finding the response omits cannot be added without a new sentence: it is not
  fixed (a report with nothing else wrong is rejected as an ``omission``);
* more than ``max_changed_words`` changed words in one sentence -> ``not_minimal``.

A correct report gets one counterfactual: one attribute of a finding sentence flipped (left <->
right, small <-> large, hyperdense <-> hypodense, ...), else one finding's presence flipped,
else one organ state (normal <-> abnormal); the choice is drawn from the judge's seeded RNG.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fire_mpo_core.clinical.edits import Edit, Span, changed_words, replace_tokens
from fire_mpo_core.clinical.frames import Frame, parse_frames
from fire_mpo_core.clinical.lexicon import (
    NORMAL_STATES,
    Lexicon,
    Token,
    antonym,
    number_surface,
    tokenize,
    word_key,
)
from fire_mpo_core.clinical.polarity import affirm, negate
from fire_mpo_core.judge.types import Analysis, Unjudgeable


def _value(toks: list[Token], f: Frame, cls: str) -> str:
    key = toks[f.attrs[cls][0]].key
    if cls == "count" and key == "single":
        return "1"
    if cls == "state":
        return "normal" if key in NORMAL_STATES else "abnormal"
    return key


def _shared(r: Frame, g: Frame) -> set[str]:
    if r.findings and g.findings:
        return r.groups & g.groups
    if not r.findings and not g.findings:
        return r.organs & g.organs
    return set()


def _align(
    rt: list[Token], rf: list[Frame], gt: list[Token], gf: list[Frame]
) -> list[tuple[Frame, Frame]]:
    scored = []
    for a, r in enumerate(rf):
        for b, g in enumerate(gf):
            shared = _shared(r, g)
            if not shared:
                continue
            agree = sum(1 for c in r.attrs if c in g.attrs and _value(rt, r, c) == _value(gt, g, c))
            score = 10 * len(shared) + agree + (r.negated == g.negated)
            scored.append((-score, abs(r.index - g.index), a, b))
    used_r: set[int] = set()
    used_g: set[int] = set()
    out = []
    for _, _, a, b in sorted(scored):
        if a in used_r or b in used_g:
            continue
        used_r.add(a)
        used_g.add(b)
        out.append((rf[a], gf[b]))
    return out


def _edit_size(text: str, edits: list[Edit]) -> int:
    return sum(changed_words(text[e.start : e.end], e.text) for e in edits)


def _flip_attribute(text: str, toks: list[Token], i: int, cls: str) -> Edit | None:
    alt = antonym(toks[i].surface)
    if alt is None or word_key(alt) == toks[i].key:
        return None
    if cls == "state" and (toks[i].key in NORMAL_STATES) == (word_key(alt) in NORMAL_STATES):
        return None
    return replace_tokens(text, toks, i, i, alt)


def _clinical_spans(toks: list[Token], frames: list[Frame]) -> list[Span]:
    spans = set()
    for f in frames:
        for i in f.findings + f.negations + [i for v in f.attrs.values() for i in v]:
            spans.add((toks[i].start, toks[i].end))
    return sorted(spans)


def analyse_report(
    text: str, reference: str, lex: Lexicon, rng: random.Random, max_changed_words: int
) -> Analysis:
    """Judge a report against the reference report (see the module docstring).

    Returns an :class:`Analysis`: incorrect with the in-place fixes, or correct with one
    counterfactual edit and the clinical spans of ``text``.

    Raises:
        Unjudgeable: ``no_answer_found`` (no clinical sentence), ``not_minimal``, ``omission``
            or ``no_counterfactual``.
    """
    rt, gt = tokenize(text), tokenize(reference)
    rf = [f for f in parse_frames(text, rt, lex) if f.clinical]
    gf = [f for f in parse_frames(reference, gt, lex) if f.clinical]
    if not rf:
        raise Unjudgeable("no_answer_found", "the report states no finding or organ condition")
    aligned = _align(rt, rf, gt, gf)
    partner = {id(r): g for r, g in aligned}
    matched_g = {id(g) for _, g in aligned}

    def noun(k: str) -> bool:
        return lex.is_noun(k)

    edits: list[Edit] = []
    for r in rf:
        edits.extend(_sentence_fix(text, rt, r, gt, partner.get(id(r)), noun, max_changed_words))
    omitted = [g for g in gf if id(g) not in matched_g and not g.negated and g.findings]
    if edits:
        return Analysis("incorrect", sorted(edits), [], wrong_text=None)
    if omitted:
        raise Unjudgeable(
            "omission",
            f"the report omits {len(omitted)} reference finding(s) "
            f"(sentence {omitted[0].index}); an in-place edit cannot add them",
        )
    for tier in _counterfactual_tiers(text, rt, rf, noun):
        if tier:
            return Analysis("correct", rng.choice(tier), _clinical_spans(rt, rf))
    raise Unjudgeable("no_counterfactual", "the report has no clinical sentence to flip")


def _sentence_fix(
    text: str,
    rt: list[Token],
    r: Frame,
    gt: list[Token],
    g: Frame | None,
    noun: Callable[[str], bool],
    max_changed_words: int,
) -> list[Edit]:
    """The in-place edits that make response sentence ``r`` agree with its reference partner
    ``g`` (None: unmatched), within ``max_changed_words``.

    Raises:
        Unjudgeable: ``not_minimal`` when no word edit does it or it needs too many words.
    """
    fix: list[Edit] | None = []
    what = ""
    if g is None:
        if r.findings and not r.negated:
            what = "negate a finding the reference does not report"
            fix = negate(text, rt, r.lo, r.hi, strict=False, is_noun=noun)
    elif r.negated != g.negated:
        what = "flip the finding's presence"
        flip = negate if g.negated else affirm
        fix = flip(text, rt, r.lo, r.hi, strict=False, is_noun=noun)
    elif not r.negated:
        for cls in r.attrs:
            if cls not in g.attrs or _value(rt, r, cls) == _value(gt, g, cls):
                continue
            what = f"replace the {cls}"
            i = r.attrs[cls][0]
            want = gt[g.attrs[cls][0]]
            if cls == "count" and (rt[i].surface.isdigit() != want.surface.isdigit()):
                new = number_surface(int(_value(gt, g, cls)), rt[i].surface)
            else:
                new = want.surface
            fix.append(replace_tokens(text, rt, i, i, new))
    if fix is None:
        raise Unjudgeable("not_minimal", f"sentence {r.index}: cannot {what} by a word edit")
    n = _edit_size(text, fix)
    if n > max_changed_words:
        raise Unjudgeable(
            "not_minimal",
            f"sentence {r.index} needs {n} changed words (> {max_changed_words})",
        )
    return fix


def _counterfactual_tiers(
    text: str, rt: list[Token], rf: list[Frame], noun: Callable[[str], bool]
) -> list[list[list[Edit]]]:
    """Candidate counterfactuals of a correct report, best tier first: a finding sentence's
    attribute flipped, its presence flipped, then the same two for organ sentences (the organ
    state, normal <-> abnormal, then the polarity)."""
    tiers: list[list[list[Edit]]] = [[], [], [], []]
    for f in rf:
        finding = bool(f.findings)
        if not f.negated:
            for cls, idx in f.attrs.items():
                ed = _flip_attribute(text, rt, idx[0], cls)
                if ed is not None:
                    tiers[0 if finding else 2].append([ed])
        flip = affirm if f.negated else negate
        pol = flip(text, rt, f.lo, f.hi, strict=False, is_noun=noun)
        if pol:
            tiers[1 if finding else 3].append(pol)
    return tiers
