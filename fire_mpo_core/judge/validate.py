"""Minimality validator of preference pairs: the contract every judge's output must meet.

:func:`validate_pair` returns None for a valid pair, else a reason string::

    reason = validate_pair(pair, rollout.response, JudgeConfig())
    if reason: reject(pair, reason)

A pair is valid when

* chosen != rejected, each side's spans are in bounds, non-empty (holding a word), sorted and
  non-overlapping, and both sides declare the same number of spans;
* outside the spans the two texts are byte-identical, and every span pair really changes a word
  (not only punctuation or spacing) and is not a synonym or case swap (same word keys, see
  :mod:`fire_mpo_core.clinical.lexicon`);
* ``on_policy``: the sampled response is ``rejected`` (verdict incorrect) or ``chosen``
  (verdict correct), byte for byte; ``gt_style``: chosen is the reference text when given;
* minimal: changed words (the word-level edit distance of each span pair: max(len) - matched
  words, summed) are at most ``max_changed_fraction`` of the longer text's words when it has at
  least ``fraction_min_words`` words, and at most ``max_changed_words`` for shorter texts;
  reports (``answer_type == 'report'``) also keep the sentence count and change at most
  ``max_changed_words`` words per sentence, no span crossing a sentence boundary.

The one exception is the ``gt_style`` pair of a wrong response (chosen = the reference text,
rejected = the model's own response): the two texts are in different styles by design (that is
what the ablation measures), so only the per-side span checks apply to it (the
span counts may differ too).
"""

from __future__ import annotations

from fire_mpo_core.clinical.edits import (
    Span,
    changed_words,
    outside_spans,
    sentence_index,
    sentence_spans,
    words,
)
from fire_mpo_core.clinical.lexicon import TOKEN_RE, tokenize
from fire_mpo_core.data.records import PreferencePair
from fire_mpo_core.judge.config import JudgeConfig


def _check_spans(text: str, spans: list[Span], side: str) -> str | None:
    prev_end = -1
    for k, (s, e) in enumerate(spans):
        if not (0 <= s <= e <= len(text)):
            return f"{side} span {k} {(s, e)} is out of bounds (text has {len(text)} chars)"
        if s == e:
            return f"{side} span {k} {(s, e)} is empty"
        if s < prev_end:
            return f"{side} spans are not sorted and non-overlapping at span {k} {(s, e)}"
        if not TOKEN_RE.search(text[s:e]):
            return f"{side} span {k} {text[s:e]!r} holds no word"
        prev_end = e
    return None


def validate_pair(
    pair: PreferencePair,
    response: str,
    config: JudgeConfig | None = None,
    *,
    reference: str | None = None,
) -> str | None:
    """None if ``pair`` is a valid minimal-edit pair for the sampled ``response``, else why not.

    Args:
        pair: the pair to check.
        response: the rollout's sampled response the pair was built from.
        config: caps (``max_changed_fraction``, ``max_changed_words``, ``fraction_min_words``);
            defaults of :class:`JudgeConfig` when None.
        reference: for ``gt_style`` pairs, the reference text chosen must equal.
    """
    cfg = config or JudgeConfig()
    c, r = pair.chosen, pair.rejected
    cs = [tuple(s) for s in pair.chosen_spans]
    rs = [tuple(s) for s in pair.rejected_spans]
    if c == r:
        return "chosen and rejected are identical"
    for text, spans, side in ((c, cs, "chosen"), (r, rs, "rejected")):
        why = _check_spans(text, spans, side)
        if why:
            return why
    if pair.style == "gt_style" and reference is not None and c != reference:
        return "gt_style: chosen is not the reference text"
    cross_style = (
        pair.style == "gt_style" and pair.verdict == "incorrect" and r == response and c != r
    )
    if cross_style:
        return None
    if len(cs) != len(rs):
        return f"chosen has {len(cs)} spans but rejected has {len(rs)}"
    if outside_spans(c, cs) != outside_spans(r, rs):
        return "chosen and rejected differ outside the declared spans"
    total = 0
    per_span: list[int] = []
    for k, ((a, b), (x, y)) in enumerate(zip(cs, rs)):
        n = changed_words(c[a:b], r[x:y])
        if n == 0:
            return f"span {k} ({c[a:b]!r} vs {r[x:y]!r}) changes no word, only punctuation/spacing"
        if [t.key for t in tokenize(c[a:b])] == [t.key for t in tokenize(r[x:y])]:
            return f"span {k} ({c[a:b]!r} vs {r[x:y]!r}) is a synonym or case swap"
        per_span.append(n)
        total += n
    if pair.style == "on_policy":
        own = r if pair.verdict == "incorrect" else c
        if own != response:
            side = "rejected" if pair.verdict == "incorrect" else "chosen"
            return f"on_policy {pair.verdict}: {side} is not the sampled response"
    n_words = max(len(words(c)), len(words(r)))
    if n_words >= cfg.fraction_min_words:
        frac = total / n_words
        if frac > cfg.max_changed_fraction:
            return (
                f"not minimal: {total} of {n_words} words changed ({frac:.2f} > "
                f"{cfg.max_changed_fraction})"
            )
    elif total > cfg.max_changed_words:
        return f"not minimal: {total} words changed in a short answer (> {cfg.max_changed_words})"
    if pair.answer_type == "report":
        sc, sr = sentence_spans(c), sentence_spans(r)
        if len(sc) != len(sr) or (
            pair.style == "on_policy" and len(sc) != len(sentence_spans(response))
        ):
            return f"report sentence count changed ({len(sr)} rejected vs {len(sc)} chosen)"
        per_sentence: dict[int, int] = {}
        for (a, b), n in zip(cs, per_span):
            i = sentence_index(sc, a)
            if i < 0 or b > sc[i][1]:
                return f"span {(a, b)} {c[a:b]!r} crosses a sentence boundary"
            per_sentence[i] = per_sentence.get(i, 0) + n
        for i, n in sorted(per_sentence.items()):
            if n > cfg.max_changed_words:
                return f"not minimal: {n} words changed in sentence {i} (> {cfg.max_changed_words})"
    return None
