"""Counterfactuals of the rules judge (:mod:`.rules`): the minimal edit that makes a right term
answer wrong.

Step (b) of the rules judge for a correct closed-choice or open answer: one answer word turned
into its antonym (left <-> right, upper <-> lower, one <-> two, ...), or, for open-vocabulary
answers, the run's answer words replaced by another answer of the same category from the
dataset's own vocabulary (:class:`~fire_mpo_core.clinical.lexicon.Lexicon`), drawn with the
judge's seeded RNG::

    edits = counterfactual(lexicon, cap, text, toks, pairing, cat, group, ckey, rng)
"""

from __future__ import annotations

import random

from fire_mpo_core.clinical.edits import Edit, replace_tokens
from fire_mpo_core.clinical.lexicon import (
    BUILTIN,
    DISPLAY,
    SOFT_WORDS,
    Lexicon,
    Phrase,
    Token,
    is_number,
    word_key,
)
from fire_mpo_core.clinical.polarity import affirm, is_no_determiner
from fire_mpo_core.judge.runs import KeyFn, Pairing, flip_word
from fire_mpo_core.judge.types import Unjudgeable

#: Classes whose words may be swapped for another of the class in a counterfactual.
SWAP_CLASSES = frozenset({"organ", "abnormality", "modality", "plane", "color", "shape", "size"})
#: Generic words that make no plausible swap target.
SWAP_EXCLUDE = frozenset({"lobe", "hemisphere", "disease", "collapse", "thickening", "medium"})


def word_classes(key: str) -> frozenset[str]:
    """Built-in word classes of a key (side, vertical, organ, ...; numbers are counts). Only
    built-in classes: dataset tags are too loose ("left" is tagged organ by "Left Lung")."""
    tags = {c for c, words in BUILTIN.items() if key in words}
    if is_number(key):
        tags.add("count")
    return frozenset(tags)


def counterfactual(
    lexicon: Lexicon,
    cap: int,
    text: str,
    toks: list[Token],
    pairing: list[Pairing],
    cat: str,
    group: frozenset[str],
    ckey: KeyFn,
    rng: random.Random,
) -> list[Edit]:
    """The edit that makes a right answer wrong: one answer word flipped to its antonym, else
    an answer of the same category (within ``cap`` changed words first), else a word swapped
    within its class, else any vocabulary answer; every choice drawn with ``rng``.

    Raises:
        Unjudgeable: ``no_counterfactual``.
    """
    order = list(range(len(pairing)))
    rng.shuffle(order)
    for n in order:
        _, keys, run = pairing[n]
        flips = []
        for i in run.core:
            if ckey(toks[i]) not in keys:
                continue
            if ckey(toks[i]) == "none" and is_no_determiner(text, toks, i):
                # "No abnormality is seen." -> "An abnormality is seen."
                eds = affirm(text, toks, i, i + 1, strict=True, is_noun=lexicon.is_noun)
                if eds:
                    return eds
                continue
            new = flip_word(text, toks, i, ckey)
            if new is not None and ckey(word_key(new)) not in keys:
                flips.append((i, new))
        if flips:
            i, new = flips[rng.randrange(len(flips))]
            return [replace_tokens(text, toks, i, i, new)]
    # Open vocabulary: another answer of the category from the dataset's vocabulary, as
    # long as the edit stays within the word cap; else one clinical word swapped for
    # another of its class (organ, finding, ...); else any vocabulary answer.
    for n in order:
        _, keys, run = pairing[n]
        cover = [i for i in run.core if ckey(toks[i]) in keys]
        if not cover or len(cover) > cap:
            continue
        alt = alternative(lexicon, cat, group, keys, len(cover), rng, ckey, max_words=cap)
        if alt is not None:
            return [replace_tokens(text, toks, cover[0], cover[-1], alt.text)]
    for n in order:
        _, keys, run = pairing[n]
        swaps = []
        for i in run.core:
            k = ckey(toks[i])
            if k not in keys:
                continue
            for c in sorted(word_classes(k) & SWAP_CLASSES):
                pool = sorted(BUILTIN[c] - SWAP_EXCLUDE - set(keys) - {k})
                swaps += [(i, DISPLAY.get(w, w)) for w in pool]
        if swaps:
            i, new = swaps[rng.randrange(len(swaps))]
            return [replace_tokens(text, toks, i, i, new)]
    for n in order:
        _, keys, run = pairing[n]
        cover = [i for i in run.core if ckey(toks[i]) in keys]
        if not cover:
            continue
        alt = alternative(lexicon, cat, group, keys, len(cover), rng, ckey)
        if alt is not None:
            return [replace_tokens(text, toks, cover[0], cover[-1], alt.text)]
    raise Unjudgeable("no_counterfactual", f"no wrong alternative for the {cat} answer", "correct")


def vocab_for(lexicon: Lexicon, cat: str, group: frozenset[str]) -> list[Phrase]:
    """The dataset's answers of the category; the built-in words only when it has none."""
    for dataset_only in (True, False):
        vocab = lexicon.vocabulary(cat, dataset_only=dataset_only)
        if not vocab:
            vocab = [
                p for c in sorted(group) for p in lexicon.vocabulary(c, dataset_only=dataset_only)
            ]
        if vocab:
            return vocab
    return []


def alternative(
    lexicon: Lexicon,
    cat: str,
    group: frozenset[str],
    keys: list[str],
    n_words: int,
    rng: random.Random,
    ckey: KeyFn,
    max_words: int | None = None,
) -> Phrase | None:
    """A vocabulary answer of the category that would be judged wrong, as close in length to
    the replaced words as possible (and at most ``max_words`` words), drawn with ``rng``."""
    want = set(keys)
    cands = []
    for p in vocab_for(lexicon, cat, group):
        pk = {ckey(k) for k in p.keys}
        if not pk or want <= pk or pk <= SOFT_WORDS:
            continue
        if max_words is not None and len(p.text.split()) > max_words:
            continue
        cands.append(p)
    # Mixed categories (SLAKE "Size" holds organs too): keep the answer's own word class.
    classes = set().union(*(word_classes(k) for k in want)) - {"side", "vertical"}
    if classes:
        same = [p for p in cands if classes & set().union(*(word_classes(k) for k in p.keys))]
        cands = same or cands
    if not cands:
        return None
    best = min(abs(len(p.keys) - n_words) for p in cands)
    cands = [p for p in cands if abs(len(p.keys) - n_words) == best]
    return cands[rng.randrange(len(cands))]
