"""Term answers in the rules judge (:mod:`.rules`): closed choices and open answers.

Verdict: the response's *clinical runs* (:mod:`.runs`) are the maximal runs of words of the
question's category (side, location, organ, count, modality, ...; see
:class:`~fire_mpo_core.clinical.lexicon.Lexicon`); the answer run is the first one that does not
only echo the question's words. It is correct when it holds every content word of the reference
answer, compared by key (lowercase, no punctuation or articles, "two" == "2", "x-ray" == "xr",
order-free: "left upper" == "upper left"; a superset is fine: "left upper lobe" answers "left").
List answers ("upper left and lower right") match part by part against that many runs.

Edit: a wrong run gets only its wrong words replaced, word for word in their class where possible
("lower right" -> "upper left": two one-word edits), else the whole run replaced by the reference
answer (:func:`fix_run`); items listed beside the answer are deleted. A right answer gets a
counterfactual (:mod:`.counterfactuals`)::

    a = analyse_terms(lexicon, cap, record, text, tokenize(text), rng)
"""

from __future__ import annotations

import itertools
import random

from fire_mpo_core.clinical.edits import Edit, Span, replace_tokens
from fire_mpo_core.clinical.lexicon import (
    ARTICLES,
    BUILTIN,
    FUNCTION_WORDS,
    SOFT_WORDS,
    ZERO_WORDS,
    Lexicon,
    Token,
    category_of,
    content_keys,
    is_number,
    split_parts,
    tokenize,
)
from fire_mpo_core.data.records import VQARecord
from fire_mpo_core.judge.counterfactuals import counterfactual, word_classes
from fire_mpo_core.judge.runs import (
    KeyFn,
    Pairing,
    Run,
    clinical_runs,
    count_surface,
    delete_item,
    find_phrase,
    list_mates,
    match_parts,
    neutral,
    run_text,
)
from fire_mpo_core.judge.types import Analysis, Unjudgeable

#: Attribute classes: a wrong attribute word is replaced by the right one even when the run has
#: no other word in common with the answer.
ATTRIBUTE_WORD_CLASSES = frozenset(BUILTIN) - {"organ", "abnormality"} | {"count"}
#: Words that state a "none" answer ("No abnormality is seen.", "none", "nothing").
NONE_WORDS = frozenset({"no", "none", "nothing"})


def analyse_terms(
    lexicon: Lexicon,
    cap: int,
    record: VQARecord,
    text: str,
    toks: list[Token],
    rng: random.Random,
) -> Analysis:
    """Verdict of ``text`` as a term answer to ``record`` and the edits that flip it (see the
    module docstring); ``cap`` is the judge's ``max_changed_words``.

    Raises:
        Unjudgeable: ``no_answer_found``, ``partial_answer`` or ``no_counterfactual``.
    """
    cat = category_of(record.question_type)
    count = cat == "count"
    # A "none" answer (no abnormality, no finding) is stated by "none" or a quantifier "no".
    none_answer = not count and content_keys(record.answer) in {("none",), ("nothing",)}
    ckey = _key_fn(count, none_answer)
    parts = _answer_parts(record.answer, ckey)
    all_keys = [k for _, ks in parts for k in ks]
    group = lexicon.group(cat, all_keys)

    verbatim = _verbatim_answer(record.answer, toks, all_keys, ckey)
    if verbatim is not None:
        pairing, spans = verbatim
        edits = counterfactual(lexicon, cap, text, toks, pairing, cat, group, ckey, rng)
        return Analysis("correct", edits, spans)
    runs = clinical_runs(text, toks, _core_fn(lexicon, group, count, none_answer, ckey))
    if not runs:
        raise Unjudgeable("no_answer_found", f"no {cat} term in the response")
    q_keys = {ckey(k) for k in content_keys(record.question)}
    selected = _answer_runs(toks, runs, q_keys, set(all_keys), len(parts), ckey)
    pairing = match_parts(parts, selected, toks, ckey)
    wrong = _correction(lexicon, record.answer, text, toks, runs, selected, pairing, q_keys, ckey)
    if wrong is not None:
        return wrong
    spans = [(toks[r.core[0]].start, toks[r.core[-1]].end) for r in selected]
    edits = counterfactual(lexicon, cap, text, toks, pairing, cat, group, ckey, rng)
    return Analysis("correct", edits, spans)


def _key_fn(count: bool, none_answer: bool) -> KeyFn:
    """The comparison key in the question's context: counts read "no"/"zero"/"none" as "0" and
    "single" as "1"; a "none" answer reads "no"/"none"/"nothing" as "none"."""

    def ckey(t: Token | str) -> str:
        k = t.key if isinstance(t, Token) else t
        if count and k in ZERO_WORDS | {"none"}:
            return "0"
        if count and k == "single":
            return "1"
        if none_answer and k in NONE_WORDS:
            return "none"
        return k

    return ckey


def _answer_parts(answer: str, ckey: KeyFn) -> list[tuple[str, list[str]]]:
    """(part text, its hard keys) of each part of a list answer ("upper left and lower right");
    soft words count only when a part has nothing else."""
    parts = []
    for p in split_parts(answer):
        keys = [ckey(k) for k in content_keys(p)]
        hard = [k for k in keys if k not in SOFT_WORDS] or keys
        hard = hard or [ckey(t) for t in tokenize(p)]
        if hard:
            parts.append((p, hard))
    if not parts:
        raise Unjudgeable("no_answer_found", f"the reference answer {answer!r} has no word")
    return parts


def _core_fn(lexicon: Lexicon, group: frozenset[str], count: bool, none_answer: bool, ckey: KeyFn):
    """Whether a token is a clinical word of the question's category (a run's core)."""

    def core(t: Token) -> bool:
        if count and ckey(t) in {"0", "1"} and t.key in ZERO_WORDS | {"none", "single"}:
            return True
        if none_answer and t.key in NONE_WORDS:
            return True
        return t.lower not in FUNCTION_WORDS and bool(lexicon.tags(t.key) & group)

    return core


def _verbatim_answer(
    answer: str, toks: list[Token], all_keys: list[str], ckey: KeyFn
) -> tuple[list[Pairing], list[Span]] | None:
    """Answers with inner function words ("Symmetrical to the bone marrow", "CT with contrast")
    are not one clinical run: a verbatim occurrence (articles aside) is right. Returns its
    pairing and span, or None (no such answer, or not found verbatim)."""
    if not any(t.lower in FUNCTION_WORDS - ARTICLES - {"and", "or"} for t in tokenize(answer)):
        return None
    window = find_phrase(toks, tokenize(answer), ckey)
    if window is None:
        return None
    i0, i1 = window
    idx = list(range(i0, i1 + 1))
    run = Run(idx, [i for i in idx if toks[i].lower not in FUNCTION_WORDS] or idx)
    return [(answer, all_keys, run)], [(toks[i0].start, toks[i1].end)]


def _answer_runs(
    toks: list[Token], runs: list[Run], q_keys: set[str], want: set[str], k: int, ckey: KeyFn
) -> list[Run]:
    """The ``k`` answer runs, in text order: runs that do not only echo the question first;
    among them, the most answer words, then the longest, then the first ("Two lesions are seen:
    a hypodense round lesion ..." -> "hypodense round lesion")."""

    def rank(r: Run) -> tuple[int, int, int, int]:
        keys = {ckey(toks[i]) for i in r.core}
        return (keys <= q_keys, -len(keys & want), -len(r.core), r.idx[0])

    selected = sorted(sorted(runs, key=rank)[:k], key=lambda r: r.idx[0])
    if len(selected) < k:
        raise Unjudgeable(
            "partial_answer", f"the answer lists {k} items, the response names {len(selected)}"
        )
    return selected


def _correction(
    lexicon: Lexicon,
    answer: str,
    text: str,
    toks: list[Token],
    runs: list[Run],
    selected: list[Run],
    pairing: list[Pairing],
    q_keys: set[str],
    ckey: KeyFn,
) -> Analysis | None:
    """The incorrect verdict with its fixes, or None when every answer run is right and nothing
    is listed beside them."""
    run_keys = {id(r): {ckey(toks[i]) for i in r.core} for r in selected}
    wrong = [(p, ks, r) for p, ks, r in pairing if not set(ks) <= run_keys[id(r)]]
    # Items listed beside the answer ("upper left and lower left" for one lesion) are wrong
    # too: over-listing is a hallucinated finding. They are deleted with their separator.
    extra = [
        r
        for r in list_mates(text, toks, runs, selected)
        if not {ckey(toks[i]) for i in r.core} <= q_keys
    ]
    if not wrong and not extra:
        return None
    edits: list[Edit] = []
    for p, ks, r in wrong:
        edits += fix_run(lexicon, text, toks, p, ks, r, ckey)
    for r in extra:
        edits.append(delete_item(text, toks, r, selected))
    edits.sort()
    shown = sorted(selected + extra, key=lambda r: r.idx[0])
    if any(b.start < a.end for a, b in itertools.pairwise(edits)):
        # Item fixes collide: replace the whole list by the answer; the validator decides
        # whether that is still minimal.
        edits = [replace_tokens(text, toks, shown[0].idx[0], shown[-1].idx[-1], neutral(answer))]
    wrong_text = " and ".join(run_text(text, toks, r) for r in shown)
    return Analysis("incorrect", edits, wrong_text=wrong_text)


def fix_run(
    lexicon: Lexicon,
    text: str,
    toks: list[Token],
    part: str,
    keys: list[str],
    run: Run,
    ckey: KeyFn,
) -> list[Edit]:
    """Correct one run: when it shares words with the answer, replace each wrong word by the
    answer's word of the same built-in class ("lower right" -> "lower left"); otherwise, or
    when a word has no counterpart, replace the run's clinical words by the answer."""
    run_keys = [ckey(toks[i]) for i in run.core]
    missing = [k for k in dict.fromkeys(keys) if k not in run_keys]
    extra = [i for i in run.core if ckey(toks[i]) not in keys]
    surface = {ckey(t): t.surface for t in tokenize(part)}
    subs: list[tuple[int, str]] = []
    used: set[int] = set()
    # With no word in common, only attribute words pair up ("right lower lobe" answers
    # "left": right -> left); a different noun is a different term altogether ("small
    # bowel" for "lung"), replaced as a unit rather than word by word ("small lung").
    common = len(extra) < len(run.core)
    for m in missing:
        cls_m = word_classes(m) if common else word_classes(m) & ATTRIBUTE_WORD_CLASSES
        cand = [i for i in extra if i not in used and word_classes(ckey(toks[i])) & cls_m]
        if not cand and common and len(missing) == 1 and len(extra) == 1:
            shared = lexicon.tags(m) & lexicon.tags(toks[extra[0]].key)
            cand = extra if shared else []
        if not cand:
            break
        used.add(cand[0])
        subs.append((cand[0], m))
    else:
        edits = []
        for i, m in subs:
            if is_number(m):
                new = count_surface(int(float(m)), text, toks, i)
            else:
                new = surface.get(m, m)
            edits.append(replace_tokens(text, toks, i, i, new))
        return edits
    return [replace_tokens(text, toks, run.core[0], run.core[-1], neutral(part))]
