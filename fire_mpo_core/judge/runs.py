"""Clinical runs and the word-level tools of the rules judge (:mod:`.rules`).

A response's *clinical runs* are its maximal runs of words of the question's category, joined by
spaces, hyphens or slashes, with connectors ("head of the pancreas") and soft words inside. The
term analyser (:mod:`.terms`) picks the answer runs among them and pairs them with the answer's
parts; the helpers here find runs, sentences, list items and counts, and write the word-level
replacements (a count in the style of the word it replaces, a word's antonym)::

    runs = clinical_runs(text, tokenize(text), is_core)   # [Run(idx=[...], core=[...]), ...]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fire_mpo_core.clinical.edits import Edit, joined, sentence_spans
from fire_mpo_core.clinical.lexicon import (
    ARTICLES,
    DIGIT_WORDS,
    SOFT_WORDS,
    Token,
    antonym,
    is_number,
    stem,
)

#: Words allowed inside a clinical run between two clinical words ("head of the pancreas").
CONNECTORS = frozenset({"of", "the"})


@dataclass
class Run:
    """A clinical run: token indices (with soft words and connectors inside) and its core
    (the words of the question's category)."""

    idx: list[int]
    core: list[int]


#: Comparison key of a token or key in the question's context (counts: "no" -> "0").
KeyFn = Callable[[Token | str], str]
#: (answer part text, its content keys, the response run it is matched with).
Pairing = tuple[str, list[str], Run]


def neutral(answer: str) -> str:
    """An answer as one clean phrase: whitespace collapsed, trailing full stop dropped."""
    return " ".join(answer.split()).rstrip(".!?") or answer.strip()


def sentence_ranges(text: str, toks: list[Token]) -> list[tuple[int, int]]:
    """Token index range ``[lo, hi)`` of each sentence."""
    ranges = []
    for s, e in sentence_spans(text):
        idx = [i for i, t in enumerate(toks) if s <= t.start < e]
        if idx:
            ranges.append((idx[0], idx[-1] + 1))
    return ranges


def clause_after(text: str, toks: list[Token], cue: int) -> tuple[int, int]:
    """Token range of the clause after a yes/no word: the rest of its sentence, or the next
    sentence when the word stands alone ("No. There is no lesion.")."""
    ranges = sentence_ranges(text, toks)
    for n, (lo, hi) in enumerate(ranges):
        if lo <= cue < hi:
            if cue + 1 < hi:
                return cue + 1, hi
            return ranges[n + 1] if n + 1 < len(ranges) else (hi, hi)
    return cue + 1, cue + 1


def clinical_runs(text: str, toks: list[Token], core: Callable[[Token], bool]) -> list[Run]:
    """Maximal runs of clinical words joined by spaces, hyphens or slashes (commas and "and"
    split runs); connectors inside, soft words inside or at the end."""
    runs: list[Run] = []
    cur: list[tuple[int, str]] = []

    def flush() -> None:
        while cur and cur[0][1] in {"conn", "soft"}:
            cur.pop(0)
        while cur and cur[-1][1] == "conn":
            cur.pop()
        if any(kind == "core" for _, kind in cur):
            runs.append(Run([i for i, _ in cur], [i for i, kind in cur if kind == "core"]))
        cur.clear()

    for i, t in enumerate(toks):
        if t.key in SOFT_WORDS or t.lower in SOFT_WORDS:
            kind = "soft"
        elif core(t):
            kind = "core"
        elif t.lower in CONNECTORS:
            kind = "conn"
        else:
            kind = ""
        if cur and (not kind or not _joinable(text, toks[cur[-1][0]], t)):
            flush()
        if kind:
            cur.append((i, kind))
    flush()
    return runs


def find_phrase(toks: list[Token], phrase: list[Token], ckey: KeyFn) -> tuple[int, int] | None:
    """First ``(i, j)`` such that tokens ``i..j`` spell the phrase, articles ignored."""
    want = [ckey(t) for t in phrase if t.lower not in ARTICLES]
    have = [i for i, t in enumerate(toks) if t.lower not in ARTICLES]
    keys = [ckey(toks[i]) for i in have]
    n = len(want)
    for a in range(len(keys) - n + 1):
        if n and keys[a : a + n] == want:
            return have[a], have[a + n - 1]
    return None


def run_text(text: str, toks: list[Token], r: Run) -> str:
    """The run's clinical words as written (from its first to its last core word)."""
    return text[toks[r.core[0]].start : toks[r.core[-1]].end]


_LIST_GAP = frozenset({",", "and", ", and", "or", ", or", "/", "&"})


def list_mates(text: str, toks: list[Token], runs: list[Run], selected: list[Run]) -> list[Run]:
    """Runs listed together with the selected ones (separated only by ",", "and", "or") that
    are not selected themselves."""
    order = sorted(runs, key=lambda r: r.idx[0])
    chosen = {id(r) for r in selected}
    lists: list[list[Run]] = []
    for r in order:
        if lists:
            prev = lists[-1][-1]
            gap = " ".join(text[toks[prev.idx[-1]].end : toks[r.idx[0]].start].split())
            if gap in _LIST_GAP:
                lists[-1].append(r)
                continue
        lists.append([r])
    mates = []
    for lst in lists:
        if any(id(r) in chosen for r in lst):
            mates += [r for r in lst if id(r) not in chosen]
    return mates


def delete_item(text: str, toks: list[Token], r: Run, selected: list[Run]) -> Edit:
    """Delete a listed item with its separator, carrying a neighbouring word into the span so
    that both sides stay non-empty: "upper left and lower left" -> "lower left"."""
    first, last = r.idx[0], r.idx[-1]
    after = [s for s in selected if s.idx[0] > last]
    if after:
        nxt = toks[after[0].idx[0]]
        word = nxt.surface
        lead = toks[first]
        before = text[: lead.start].rstrip()
        if lead.surface[:1].isupper() and (not before or before[-1] in ".!?:\n"):
            word = word[:1].upper() + word[1:]
        return Edit(lead.start, nxt.end, word)
    prev = toks[max(s.idx[-1] for s in selected if s.idx[-1] < first)]
    return Edit(prev.start, toks[last].end, prev.surface)


def _joinable(text: str, a: Token, b: Token) -> bool:
    gap = text[a.end : b.start]
    return gap.strip(" \t") in {"", "-", "/"}


def match_parts(
    parts: list[tuple[str, list[str]]], runs: list[Run], toks: list[Token], ckey: KeyFn
) -> list[Pairing]:
    """Pair each answer part with a run: best key overlap first, then text order."""
    if len(parts) == 1:
        return [(parts[0][0], parts[0][1], runs[0])]
    scored = []
    for a, (_, keys) in enumerate(parts):
        for b, r in enumerate(runs):
            overlap = len(set(keys) & {ckey(toks[i]) for i in r.core})
            scored.append((-overlap, abs(a - b), a, b))
    used_p: set[int] = set()
    used_r: set[int] = set()
    out = {}
    for _, _, a, b in sorted(scored):
        if a in used_p or b in used_r:
            continue
        used_p.add(a)
        used_r.add(b)
        out[a] = (parts[a][0], parts[a][1], runs[b])
    return [out[a] for a in sorted(out)]


def _next_is_plural(text: str, toks: list[Token], i: int) -> bool:
    if i + 1 >= len(toks) or not joined(text, toks[i], toks[i + 1]):
        return False
    low = toks[i + 1].lower
    return stem(low) != low


def count_surface(value: int, text: str, toks: list[Token], i: int) -> str:
    """A count written like the word it replaces: digits for digits; zero as "no" before a noun
    ("no lesions") and "none" alone; else a number word."""
    tok = toks[i]
    if tok.surface.isdigit():
        return str(value)
    if value == 0:
        before_noun = i + 1 < len(toks) and joined(text, tok, toks[i + 1])
        return "no" if before_noun else "none"
    return DIGIT_WORDS.get(value, str(value))


def flip_word(text: str, toks: list[Token], i: int, ckey: KeyFn) -> str | None:
    """Antonym of word ``i``; counts: 0 -> 1 (2 before a plural), 1 -> 2, 2 -> 1, n -> n - 1."""
    k = ckey(toks[i])
    if is_number(k) and "." not in k:
        n = int(k)
        m = {0: 2 if _next_is_plural(text, toks, i) else 1, 1: 2, 2: 1}.get(n, n - 1)
        return count_surface(m, text, toks, i)
    return antonym(toks[i].surface)
