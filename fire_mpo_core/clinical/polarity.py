"""Presence / negation flips by single-word edits: "there is a lesion" <-> "there is no lesion".

Used for yes/no answers without a "yes"/"no" word, for the clause after a "Yes," / "No," (so
that "No, there is no lesion." becomes "Yes, there is a lesion.", not "Yes, there is no
lesion."), and for report sentences whose finding is present in one text and absent in the other.

``strict`` limits the flips to the existential patterns (determiner "no" <-> "a"/"an",
"there is" + determiner, "present" <-> "absent"): the only ones safe to apply to the clause after
a yes/no word, where a "not" may belong to a contrast ("No, this is a CT, not an MRI.").
Both functions look at tokens ``lo..hi-1`` and return the edits of the first cue they find, or
None when the text has no cue they can flip.
"""

from __future__ import annotations

from collections.abc import Callable

from fire_mpo_core.clinical.edits import Edit, delete_token, insert_after, joined, replace_tokens
from fire_mpo_core.clinical.lexicon import FUNCTION_WORDS, Token, article_for, match_case, stem

COPULAS = frozenset({"is", "are", "was", "were"})
#: Nouns that take no article when a "no" is dropped ("no evidence of" -> "evidence of").
MASS_NOUNS = frozenset({"evidence", "fluid", "air", "gas", "edema", "bleeding", "hemorrhage"})
_NEG_SWAP = {"absent": "present", "negative": "positive", "without": "with"}
_POS_SWAP = {"present": "absent", "positive": "negative"}
_NT = {"won't": "will", "can't": "can", "cannot": "can", "shan't": "shall"}


def is_no_determiner(text: str, toks: list[Token], i: int) -> bool:
    """A "no" that quantifies a following noun ("no lesion"), not an interjection ("No, ...")."""
    return toks[i].lower == "no" and i + 1 < len(toks) and joined(text, toks[i], toks[i + 1])


def is_negation(text: str, toks: list[Token], i: int) -> bool:
    """Any negation cue: no, not, n't, without, absent, negative, none, free (of)."""
    low = toks[i].lower
    return low in {"no", "not", "none", "without", "absent", "negative", "free", "cannot"} or (
        low.endswith(("n't", "n’t"))
    )


def _head_plural_or_mass(
    text: str, toks: list[Token], i: int, is_noun: Callable[[str], bool]
) -> bool:
    """Is the noun phrase after word ``i`` plural or a mass noun? Its head is the last word
    before a function word or punctuation ("no evidence of focal consolidation" -> evidence,
    "no focal lesion is seen" -> lesion)."""
    head = toks[i + 1]
    for k in range(i + 1, min(i + 6, len(toks))):
        if k > i + 1 and not joined(text, toks[k - 1], toks[k]):
            break
        if toks[k].lower in FUNCTION_WORDS or toks[k].lower in {"or", "nor"}:
            break
        head = toks[k]
        if toks[k].key in MASS_NOUNS:
            break
    low = head.lower
    return low in MASS_NOUNS or head.key in MASS_NOUNS or stem(low) != low


def affirm(
    text: str,
    toks: list[Token],
    lo: int,
    hi: int,
    *,
    strict: bool,
    is_noun: Callable[[str], bool],
) -> list[Edit] | None:
    """Edits that remove the first negation in ``toks[lo:hi]`` ("no lesion" -> "a lesion", "is not
    seen" -> "is seen", "isn't" -> "is", "absent" -> "present"), or None."""
    for i in range(lo, hi):
        t = toks[i]
        low = t.lower
        if is_no_determiner(text, toks, i):
            if _head_plural_or_mass(text, toks, i, is_noun):
                ed = delete_token(text, toks, i)
                return [ed] if ed else None
            art = article_for(toks[i + 1].surface)
            return [Edit(t.start, t.end, match_case(t.surface, art))]
        if low in {"absent", "negative"}:
            return [Edit(t.start, t.end, match_case(t.surface, _NEG_SWAP[low]))]
        if strict:
            continue
        if low == "not":
            ed = delete_token(text, toks, i)
            return [ed] if ed else None
        if low in _NT or low.endswith(("n't", "n’t")):
            base = _NT.get(low, t.surface[:-3])
            return [Edit(t.start, t.end, match_case(t.surface, base))] if base else None
        if low == "without":
            return [Edit(t.start, t.end, match_case(t.surface, "with"))]
    return None


def negate(
    text: str,
    toks: list[Token],
    lo: int,
    hi: int,
    *,
    strict: bool,
    is_noun: Callable[[str], bool],
) -> list[Edit] | None:
    """Edits that negate the first positive statement in ``toks[lo:hi]``: "there is a X" ->
    "there is no X", "a small lesion is seen" -> "no small lesion is seen", "present" ->
    "absent", and (not strict) "is" -> "is not"; or None."""
    for i in range(lo, hi):
        low = toks[i].lower
        j = None
        if low in {"there's", "there’s"}:
            j = i + 1
        elif low == "there" and i + 1 < hi and toks[i + 1].lower in COPULAS:
            j = i + 2
        if j is None:
            continue
        if j < hi and toks[j].lower in {"a", "an", "some", "any"}:
            return [replace_tokens(text, toks, j, j, "no")]
        if j < hi and toks[j].lower in {"no", "not"}:
            return None  # already negative
        return [insert_after(text, toks, j - 1, "no")]
    for i in range(lo, hi):
        if toks[i].lower not in {"a", "an"}:
            continue
        for k in range(i + 1, min(i + 5, hi)):
            if not joined(text, toks[k - 1], toks[k]):
                break
            if is_noun(toks[k].key):
                return [Edit(toks[i].start, toks[i].end, match_case(toks[i].surface, "no"))]
    for i in range(lo, hi):
        low = toks[i].lower
        if low in _POS_SWAP:
            return [Edit(toks[i].start, toks[i].end, match_case(toks[i].surface, _POS_SWAP[low]))]
    if not strict:
        for i in range(lo, hi):
            if toks[i].lower in COPULAS:
                return [insert_after(text, toks, i, "not")]
    return None
