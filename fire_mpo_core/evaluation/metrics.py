"""Answer-level metrics for medical VQA (SLAKE / VQA-RAD conventions).

Closed questions use the paper's regex shortcut: the first standalone yes/no in the prediction
is its answer. Open questions are scored by exact match after normalisation and by token recall
(share of reference tokens present in the prediction, the usual SLAKE/VQA-RAD open metric) and
token F1.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {
    "zero": "0",
    "none": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_YES_NO = re.compile(r"\b(yes|no)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation if c not in "-"})


def normalize(text: str) -> str:
    """Lowercase, drop punctuation (keeping hyphens) and articles, collapse spaces."""
    words = str(text).lower().translate(_PUNCT).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def tokens(text: str) -> list[str]:
    """Normalised tokens with number words as digits ("two" -> "2")."""
    return [_NUMBERS.get(w, w) for w in normalize(text).split()]


def yes_no(text: str) -> str | None:
    """The first standalone yes/no of a text, or None."""
    m = _YES_NO.search(str(text).lower())
    return m.group(1) if m else None


def closed_correct(prediction: str, reference: str) -> bool:
    """Closed-question correctness: yes/no by regex, otherwise normalised exact match."""
    # A yes/no reference, bare or as a sentence ("Yes, based on the image."): the regex shortcut.
    words = normalize(reference).split()
    ref = yes_no(reference) if words and words[0] in ("yes", "no") else None
    if ref is not None:
        return yes_no(prediction) == ref
    return exact_match(prediction, reference)


def exact_match(prediction: str, reference: str) -> bool:
    """Order-sensitive match of normalised tokens."""
    return tokens(prediction) == tokens(reference)


def token_recall(prediction: str, reference: str) -> float:
    """Share of reference tokens (with multiplicity) found in the prediction."""
    ref = Counter(tokens(reference))
    if not ref:
        return 0.0
    pred = Counter(tokens(prediction))
    return sum(min(c, pred[t]) for t, c in ref.items()) / sum(ref.values())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (SQuAD-style)."""
    ref, pred = Counter(tokens(reference)), Counter(tokens(prediction))
    common = sum((ref & pred).values())
    if common == 0:
        return 0.0
    p, r = common / sum(pred.values()), common / sum(ref.values())
    return 2 * p * r / (p + r)
