"""Report frames: each sentence's findings, negation and attributes, parsed from the tokens.

A report sentence becomes a :class:`Frame`: its finding groups (lesion / nodule / mass / tumor /
opacity count as one group), negations (present / absent) and attributes (side, upper/lower,
size, intensity, shape, count, severity, organ state). The report judge aligns and edits frames
(:mod:`fire_mpo_core.judge.reports`); the clinical-F1 metric counts them
(:mod:`fire_mpo_core.evaluation.clinical`)::

    from fire_mpo_core.clinical.frames import parse_frames
    from fire_mpo_core.clinical.lexicon import BUILTIN, Lexicon, tokenize
    frames = parse_frames(text, tokenize(text), Lexicon())
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fire_mpo_core.clinical.edits import sentence_spans
from fire_mpo_core.clinical.lexicon import (
    ATTRIBUTE_CLASSES,
    BUILTIN,
    LESION_LIKE,
    Lexicon,
    Token,
    is_number,
)
from fire_mpo_core.clinical.polarity import is_negation


@dataclass
class Frame:
    """One sentence's findings: token range ``[lo, hi)`` of the text's tokens."""

    index: int
    lo: int
    hi: int
    findings: list[int] = field(default_factory=list)
    groups: set[str] = field(default_factory=set)
    organs: set[str] = field(default_factory=set)
    negations: list[int] = field(default_factory=list)
    attrs: dict[str, list[int]] = field(default_factory=dict)

    @property
    def negated(self) -> bool:
        return bool(self.negations)

    @property
    def clinical(self) -> bool:
        return bool(self.findings) or bool(self.organs and "state" in self.attrs)


def attribute_class(key: str) -> str | None:
    """The report attribute class of a word key, or None."""
    if (is_number(key) and "." not in key) or key == "single":
        return "count"
    for cls in ATTRIBUTE_CLASSES:
        if key in BUILTIN.get(cls, ()):
            return cls
    return None


def parse_frames(text: str, toks: list[Token], lex: Lexicon) -> list[Frame]:
    """Frames of every sentence (filler sentences have no findings and no organ state)."""
    frames = []
    for si, (s, e) in enumerate(sentence_spans(text)):
        idx = [i for i, t in enumerate(toks) if s <= t.start < e]
        if not idx:
            continue
        f = Frame(si, idx[0], idx[-1] + 1)
        for i in idx:
            t = toks[i]
            if is_negation(text, toks, i):
                f.negations.append(i)
            elif lex.is_finding(t.key):
                f.findings.append(i)
                f.groups.add("lesion" if t.key in LESION_LIKE else t.key)
            elif t.key in BUILTIN["organ"]:
                f.organs.add(t.key)
            cls = attribute_class(t.key)
            if cls:
                f.attrs.setdefault(cls, []).append(i)
        frames.append(f)
    return frames
