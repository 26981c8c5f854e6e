"""Yes/no answers in the rules judge (:mod:`.rules`): find the response's answer, flip it.

Verdict: the first "yes"/"no" word of the response (the paper's regex shortcut), a "no"
quantifier counting as "no" ("There is no lesion."); without one, a negation ("not", "without",
"absent", ...) in a sentence about the question's subject means no and an explicit presence
statement ("there is", "present", "seen", ...) means yes. The edit flips the yes/no word and the
polarity of its clause ("Yes, there is a lesion." -> "No, there is no lesion.")::

    a = analyse_yes_no(lexicon, text, tokenize(text), answer_yes=True, question=q)
"""

from __future__ import annotations

from fire_mpo_core.clinical.edits import replace_tokens
from fire_mpo_core.clinical.lexicon import SOFT_WORDS, Lexicon, Token, content_keys
from fire_mpo_core.clinical.polarity import affirm, is_negation, is_no_determiner, negate
from fire_mpo_core.judge.runs import clause_after, sentence_ranges
from fire_mpo_core.judge.types import Analysis, Unjudgeable

#: Presence statements that answer "yes" when a response has no yes/no word.
POSITIVE_CUES = frozenset(
    {"there", "there's", "present", "seen", "visible", "noted", "identified", "shows", "show",
     "demonstrates", "evident", "positive"}
)  # fmt: skip


def is_yes_no(answer: str) -> bool:
    """True for a yes/no reference answer ("Yes", "no", "YES.")."""
    return content_keys(answer) in {("yes",), ("no",)}


def analyse_yes_no(
    lexicon: Lexicon, text: str, toks: list[Token], answer_yes: bool, question: str
) -> Analysis:
    """Verdict of a response to a yes/no question whose answer is yes (``answer_yes``) or no,
    and the edits that flip its statement (see the module docstring).

    Raises:
        Unjudgeable: ``no_answer_found``, or ``no_counterfactual`` / ``not_minimal`` when no
            word edit flips the statement.
    """
    noun = lexicon.is_noun
    cue = next((i for i, t in enumerate(toks) if t.lower in {"yes", "no"}), None)
    if cue is not None:
        t = toks[cue]
        said_yes = t.lower == "yes"
        if not said_yes and is_no_determiner(text, toks, cue):
            edits = affirm(text, toks, cue, cue + 1, strict=True, is_noun=noun)
        else:
            new = "no" if said_yes else "yes"
            edits = [replace_tokens(text, toks, cue, cue, new)]
            lo, hi = clause_after(text, toks, cue)
            flip = negate if said_yes else affirm
            more = flip(text, toks, lo, hi, strict=True, is_noun=noun) or []
            edits += [e for e in more if e.start >= edits[0].end]
        spans = [(t.start, t.end)]
    else:
        # Without a yes/no word, only a sentence about the question's subject answers it
        # ("The lesion is not visible."), not a refusal ("I cannot answer that.").
        q_keys = set(content_keys(question)) - SOFT_WORDS
        lo, hi = next(
            (
                (a, b)
                for a, b in sentence_ranges(text, toks)
                if any(toks[i].key in q_keys for i in range(a, b))
            ),
            (0, 0),
        )
        neg = next((i for i in range(lo, hi) if is_negation(text, toks, i)), None)
        pos = next((i for i in range(lo, hi) if toks[i].lower in POSITIVE_CUES), None)
        if neg is None and pos is None:
            raise Unjudgeable(
                "no_answer_found",
                "no yes/no answer: no yes/no word, and no negation or presence statement "
                "about the question's subject",
            )
        said_yes = neg is None
        flip = negate if said_yes else affirm
        edits = flip(text, toks, lo, hi, strict=False, is_noun=noun)
        cue_tok = toks[pos if said_yes else neg]
        spans = [(cue_tok.start, cue_tok.end)]
    verdict = "correct" if said_yes == answer_yes else "incorrect"
    if not edits:
        code = "no_counterfactual" if verdict == "correct" else "not_minimal"
        raise Unjudgeable(code, "the yes/no statement cannot be flipped by a word edit", verdict)
    return Analysis(
        verdict,
        edits,
        spans if verdict == "correct" else [],
        wrong_text=None if verdict == "correct" else ("yes" if said_yes else "no"),
    )
