"""Character-level minimal edits: sentences, word replacement and deletion, span bookkeeping.

An :class:`Edit` replaces ``text[start:end]`` by a non-empty string. :func:`apply_edits` applies
sorted, non-overlapping edits and returns the new text with the changed spans in *both* texts,
the ``[start, end)`` character offsets a :class:`~fire_mpo_core.data.records.PreferencePair`
carries::

    new, old_spans, new_spans = apply_edits("The lesion is on the left.", [Edit(21, 25, "right")])
    # new == "The lesion is on the right.", old_spans == [(21, 25)], new_spans == [(21, 26)]

Both sides of every span are non-empty: a deleted word takes its neighbour into the span
("no evidence" -> "evidence"), an inserted word rides on its neighbour ("is" -> "is not"), so
the span masks of the loss always have tokens on both sides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import SequenceMatcher

from fire_mpo_core.clinical.lexicon import Token, article_for, match_case, tokenize

Span = tuple[int, int]

_BOUNDARY_RE = re.compile(r"[.!?]+(?=\s|$)|\n+")
_JOIN_GAP_RE = re.compile(r"[ \t]*")


def sentence_spans(text: str) -> list[Span]:
    """``[start, end)`` of each sentence that holds at least one word (ends at ``.!?`` followed by
    whitespace or the end, or at a newline; "3.4 cm" does not end a sentence)."""
    spans: list[Span] = []
    pos = 0
    ends = [m.end() for m in _BOUNDARY_RE.finditer(text)]
    if not ends or ends[-1] < len(text):
        ends.append(len(text))
    for end in ends:
        chunk = text[pos:end]
        stripped = chunk.strip()
        if stripped and re.search(r"[A-Za-z0-9]", stripped):
            s = pos + (len(chunk) - len(chunk.lstrip()))
            spans.append((s, s + len(stripped)))
        pos = end
    return spans


def sentence_index(spans: list[Span], offset: int) -> int:
    """Index of the sentence that contains character ``offset`` (-1 if between sentences)."""
    for i, (s, e) in enumerate(spans):
        if s <= offset < e:
            return i
    return -1


@dataclass(frozen=True, order=True)
class Edit:
    """Replace ``text[start:end]`` (non-empty) by ``text`` (non-empty)."""

    start: int
    end: int
    text: str


def apply_edits(text: str, edits: list[Edit]) -> tuple[str, list[Span], list[Span]]:
    """Apply edits; touching edits are merged into one span.

    Returns:
        (new text, spans in the old text, spans in the new text), sorted, one per merged edit.

    Raises:
        ValueError: an edit is empty, out of bounds, or overlaps another.
    """
    merged: list[Edit] = []
    for ed in sorted(edits):
        if not (0 <= ed.start < ed.end <= len(text)) or not ed.text:
            raise ValueError(f"invalid edit {ed!r} on a text of {len(text)} chars")
        if merged and ed.start < merged[-1].end:
            raise ValueError(f"overlapping edits {merged[-1]!r} and {ed!r}")
        if merged and ed.start == merged[-1].end:
            last = merged.pop()
            ed = Edit(last.start, ed.end, last.text + ed.text)
        merged.append(ed)
    out: list[str] = []
    old_spans: list[Span] = []
    new_spans: list[Span] = []
    pos = 0
    length = 0
    for ed in merged:
        out.append(text[pos : ed.start])
        length += ed.start - pos
        old_spans.append((ed.start, ed.end))
        new_spans.append((length, length + len(ed.text)))
        out.append(ed.text)
        length += len(ed.text)
        pos = ed.end
    out.append(text[pos:])
    return "".join(out), old_spans, new_spans


def joined(text: str, a: Token, b: Token) -> bool:
    """True when only spaces separate two tokens (no punctuation, no line break)."""
    return _JOIN_GAP_RE.fullmatch(text[a.end : b.start]) is not None


def _sentence_initial(text: str, tok: Token) -> bool:
    before = text[: tok.start].rstrip()
    return not before or before[-1] in ".!?\n"


def replace_tokens(
    text: str, toks: list[Token], i: int, j: int, replacement: str, *, keep_case: bool = False
) -> Edit:
    """Replace tokens ``i..j`` (inclusive) by ``replacement`` written in their case style; a
    preceding "a"/"an" is corrected to agree with the new first word ("a CT" -> "an MRI")."""
    new = replacement if keep_case else match_case(toks[i].surface, replacement)
    start, end = toks[i].start, toks[j].end
    if i > 0 and toks[i - 1].lower in {"a", "an"} and joined(text, toks[i - 1], toks[i]):
        art = toks[i - 1]
        want = article_for(new)
        if art.lower != want:
            gap = text[art.end : toks[i].start]
            return Edit(art.start, end, match_case(art.surface, want) + gap + new)
    return Edit(start, end, new)


def delete_token(text: str, toks: list[Token], i: int) -> Edit | None:
    """Delete word ``i`` with its space, carrying the next word (or the previous one) into the
    span so that both sides stay non-empty; a deleted capitalised sentence-initial word passes its
    capital on ("No lesions are seen." -> "Lesions are seen.")."""
    tok = toks[i]
    if i + 1 < len(toks) and joined(text, tok, toks[i + 1]):
        nxt = toks[i + 1]
        word = nxt.surface
        if tok.surface[:1].isupper() and _sentence_initial(text, tok):
            word = word[:1].upper() + word[1:]
        return Edit(tok.start, nxt.end, word)
    if i > 0 and joined(text, toks[i - 1], tok):
        prev = toks[i - 1]
        return Edit(prev.start, tok.end, prev.surface)
    return None


def insert_after(text: str, toks: list[Token], i: int, words: str) -> Edit:
    """Insert ``words`` after word ``i`` ("is" -> "is not"), as an edit of word ``i``."""
    tok = toks[i]
    return Edit(tok.start, tok.end, f"{tok.surface} {words}")


def words(text: str) -> list[str]:
    """Word tokens of a text as the validator counts them (a multi-word alias such as "X-ray"
    or "computed tomography" is one word)."""
    return [t.surface for t in tokenize(text)]


def changed_words(a: str, b: str) -> int:
    """Word-level edit size between two strings: max(len) - words in the longest matching
    blocks ("no evidence" vs "evidence": 1; "an upper" vs "a lower": 2)."""
    wa, wb = words(a), words(b)
    sm = SequenceMatcher(None, wa, wb, autojunk=False)
    matched = sum(m.size for m in sm.get_matching_blocks())
    return max(len(wa), len(wb)) - matched


def outside_spans(text: str, spans: list[Span]) -> list[str]:
    """The pieces of ``text`` between sorted, non-overlapping spans (before the first, between
    each two, after the last): what a minimal edit must leave byte-identical."""
    out, pos = [], 0
    for s, e in spans:
        out.append(text[pos:s])
        pos = e
    out.append(text[pos:])
    return out
