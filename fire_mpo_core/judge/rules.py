"""The deterministic rules judge: find the answer, decide right or wrong, write a minimal edit.

The paper's two judge steps (FiRe-MPO step 1, docs/design.md section 1), by rules:

**(a) Verdict.** Yes/no answers: the first "yes"/"no" word of the response (the paper's regex
shortcut), a "no" quantifier counting as "no" ("There is no lesion."); without one, a negation
("not", "without", "absent", ...) means no and an explicit presence statement ("there is",
"present", "seen", ...) means yes. Other answers: the response's *clinical runs* are the maximal
runs of words of the question's category (side, location, organ, count, modality, ...; see
:class:`~fire_mpo_core.clinical.lexicon.Lexicon`); the answer run is the first one that does
not only echo the question's words. It is correct when it holds every content word of the reference
answer, compared by key (lowercase, no punctuation or articles, "two" == "2", "x-ray" == "xr",
order-free: "left upper" == "upper left"; a superset is fine: "left upper lobe" answers "left").
List answers ("upper left and lower right") match part by part against that many runs.

**(b) Minimal edit.** Incorrect: rejected = response, chosen = response with only the wrong words
replaced, word for word in their class where possible ("lower right" -> "upper left": two
one-word edits), else the whole run replaced by the reference answer. Correct: chosen =
response, rejected = one answer word turned into its antonym (yes <-> no, left <-> right, upper
<-> lower, small <-> large, ct <-> mri, one <-> two, ...), or, for open-vocabulary answers, the
run's answer words replaced by another answer of the same category from the dataset's own
vocabulary, drawn with a seeded RNG. Replacements keep the case style of the word they replace
and fix a preceding "a"/"an"; everything else stays byte-identical. Reports: see
:mod:`fire_mpo_core.judge.reports`.

**No answer found** (empty, gibberish, a refusal, a list with too few items): the rollout is
*rejected* with its reason, never turned into (canonical answer, response). Such a pair would be
a whole rewrite, not a minimal edit: its spans would cover the whole text, so the span-level loss
would degenerate into sequence-level DPO on off-policy text, which is the failure the method
removes (and the validator would refuse it). The rejection rate is reported by the stage.

**Pair styles** (the paper's ablation, ``JudgeConfig.style``):

* ``on_policy`` (default): as above; the sampled response is one side, byte for byte.
* ``gt_style``: chosen = the record's ``reference`` text (the dataset's own style; the canonical
  ``answer`` when there is none). Wrong response: rejected = the response itself, spans = the
  answer words in the reference and the wrong words in the response (the two texts differ in
  style by design). Right response: rejected = the reference with its answer flipped by the same
  counterfactual rules, so the pair is a minimal edit of the reference.
* ``style_agnostic``: both sides in one neutral template, "The answer is X." vs "The answer is
  Y.", X the canonical answer and Y the response's wrong answer, or a counterfactual of X when
  the response is right. Reports use the canonical report (``record.answer``) as the neutral
  text and its counterfactual as rejected.

In every style ``verdict`` is the verdict on the sampled response, and every pair passes
:func:`~fire_mpo_core.judge.validate.validate_pair` (a pair that does not is turned into an
``invalid_pair`` rejection rather than emitted).

Usage::

    judge = RulesJudge(JudgeConfig(style="on_policy", seed=0), records)
    result = judge.judge(record, rollout)     # PreferencePair | Rejection
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fire_mpo_core.clinical.edits import (
    Edit,
    Span,
    apply_edits,
    joined,
    replace_tokens,
    sentence_spans,
)
from fire_mpo_core.clinical.lexicon import (
    ARTICLES,
    BUILTIN,
    DIGIT_WORDS,
    DISPLAY,
    FUNCTION_WORDS,
    SOFT_WORDS,
    ZERO_WORDS,
    Lexicon,
    Phrase,
    Token,
    antonym,
    category_of,
    content_keys,
    is_number,
    split_parts,
    stem,
    tokenize,
    word_key,
)
from fire_mpo_core.clinical.polarity import affirm, is_negation, is_no_determiner, negate
from fire_mpo_core.data.records import PreferencePair, Rollout, VQARecord
from fire_mpo_core.judge.base import JudgeResult, Rejection, stable_seed
from fire_mpo_core.judge.config import JudgeConfig, RejectCode
from fire_mpo_core.judge.reports import analyse_report
from fire_mpo_core.judge.types import Analysis, Unjudgeable, Verdict
from fire_mpo_core.judge.validate import validate_pair

#: Words allowed inside a clinical run between two clinical words ("head of the pancreas").
CONNECTORS = frozenset({"of", "the"})
#: Attribute classes: a wrong attribute word is replaced by the right one even when the run has
#: no other word in common with the answer.
ATTRIBUTE_WORD_CLASSES = frozenset(BUILTIN) - {"organ", "abnormality"} | {"count"}
#: Presence statements that answer "yes" when a response has no yes/no word.
POSITIVE_CUES = frozenset(
    {"there", "there's", "present", "seen", "visible", "noted", "identified", "shows", "show",
     "demonstrates", "evident", "positive"}
)  # fmt: skip
NEUTRAL_TEMPLATE = "The answer is {}."
#: Classes whose words may be swapped for another of the class in a counterfactual.
SWAP_CLASSES = frozenset({"organ", "abnormality", "modality", "plane", "color", "shape", "size"})
#: Generic words that make no plausible swap target.
SWAP_EXCLUDE = frozenset({"lobe", "hemisphere", "disease", "collapse", "thickening", "medium"})
#: Words that state a "none" answer ("No abnormality is seen.", "none", "nothing").
NONE_WORDS = frozenset({"no", "none", "nothing"})


def is_yes_no(answer: str) -> bool:
    """True for a yes/no reference answer ("Yes", "no", "YES.")."""
    return content_keys(answer) in {("yes",), ("no",)}


@dataclass
class _Run:
    """A clinical run: token indices (with soft words and connectors inside) and its core
    (the words of the question's category)."""

    idx: list[int]
    core: list[int]


#: Comparison key of a token or key in the question's context (counts: "no" -> "0").
KeyFn = Callable[[Token | str], str]
#: (answer part text, its content keys, the response run it is matched with).
_Pairing = tuple[str, list[str], _Run]


class RulesJudge:
    """Deterministic judge over a clinical lexicon built from the dataset's records."""

    def __init__(self, config: JudgeConfig, records: Sequence[VQARecord] = ()) -> None:
        self.config = config
        self.lexicon = Lexicon.from_records(records)

    # ------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------

    def judge(self, record: VQARecord, rollout: Rollout) -> JudgeResult:
        """A minimal-edit pair for the rollout, or a rejection with its reason."""
        if rollout.record_id != record.id:
            raise ValueError(
                f"rollout {rollout.id!r} answers {rollout.record_id!r}, not {record.id!r}"
            )
        rng = random.Random(stable_seed(self.config.seed, rollout.id))
        try:
            pair = self._pair(record, rollout, rng)
        except Unjudgeable as e:
            return Rejection(
                id=rollout.id, record_id=record.id, code=e.code, reason=e.reason, verdict=e.verdict
            )
        except ValueError as e:  # colliding edits (apply_edits) or an invalid pair model
            return Rejection(
                id=rollout.id, record_id=record.id, code="invalid_pair", reason=f"bad edit: {e}"
            )
        ref = (record.reference or record.answer) if pair.style == "gt_style" else None
        why = validate_pair(pair, rollout.response, self.config, reference=ref)
        if why:
            return Rejection(
                id=rollout.id,
                record_id=record.id,
                code="not_minimal" if why.startswith("not minimal") else "invalid_pair",
                reason=why,
                verdict=pair.verdict,
            )
        return pair

    def analyse(self, record: VQARecord, text: str, rng: random.Random) -> Analysis:
        """Verdict of ``text`` as an answer to ``record`` and the edits that flip it.

        Raises:
            Unjudgeable: no answer found, no counterfactual, or no minimal correction.
        """
        toks = tokenize(text)
        if not toks:
            raise Unjudgeable("empty_response", "the response holds no word")
        if record.answer_type == "report":
            return analyse_report(
                text, record.answer, self.lexicon, rng, self.config.max_changed_words
            )
        if is_yes_no(record.answer):
            yes = content_keys(record.answer) == ("yes",)
            return self._analyse_yes_no(text, toks, yes, record.question)
        return self._analyse_terms(record, text, toks, rng)

    # ------------------------------------------------------------------------------------------
    # Pair styles
    # ------------------------------------------------------------------------------------------

    def _pair(self, record: VQARecord, rollout: Rollout, rng: random.Random) -> PreferencePair:
        style = self.config.style
        resp = rollout.response
        a = self.analyse(record, resp, rng)
        verdict = a.verdict
        if style == "on_policy":
            new, old_spans, new_spans = apply_edits(resp, a.edits)
            if verdict == "incorrect":
                chosen, rejected, cs, rs = new, resp, new_spans, old_spans
            else:
                chosen, rejected, cs, rs = resp, new, old_spans, new_spans
        elif style == "gt_style":
            gt = record.reference or record.answer
            g = self._analyse_own(record, gt, rng, "the reference text", "no_reference", verdict)
            if verdict == "incorrect":
                _, wrong_spans, _ = apply_edits(resp, a.edits)
                chosen, rejected, cs, rs = gt, resp, g.answer_spans, wrong_spans
            else:
                new, old_spans, new_spans = apply_edits(gt, g.edits)
                chosen, rejected, cs, rs = gt, new, old_spans, new_spans
        else:
            chosen, rejected, cs, rs = self._style_agnostic(record, a, rng)
        return PreferencePair.for_record(
            record, rollout.id, (chosen, cs), (rejected, rs), verdict, style
        )

    def _analyse_own(
        self,
        record: VQARecord,
        text: str,
        rng: random.Random,
        what: str,
        code: RejectCode,
        verdict: Verdict | None,
    ) -> Analysis:
        """Analyse a text that must state the right answer (the reference, the template)."""
        try:
            g = self.analyse(record, text, rng)
        except Unjudgeable as e:
            raise Unjudgeable(e.code, f"{what}: {e.reason}", verdict) from None
        if g.verdict != "correct":
            raise Unjudgeable(code, f"{what} does not state the answer {record.answer!r}", verdict)
        return g

    def _style_agnostic(
        self, record: VQARecord, a: Analysis, rng: random.Random
    ) -> tuple[str, str, list[Span], list[Span]]:
        if record.answer_type == "report":
            base = record.answer
            g = self._analyse_own(
                record, base, rng, "the canonical report", "no_reference", a.verdict
            )
            new, old_spans, new_spans = apply_edits(base, g.edits)
            return base, new, old_spans, new_spans
        x = _neutral(record.answer)
        chosen = NEUTRAL_TEMPLATE.format(x)
        if a.verdict == "incorrect":
            y = a.wrong_text or ""
            rejected = NEUTRAL_TEMPLATE.format(y)
            at = NEUTRAL_TEMPLATE.index("{}")
            return chosen, rejected, [(at, at + len(x))], [(at, at + len(y))]
        g = self._analyse_own(
            record, chosen, rng, "the neutral template", "no_reference", "correct"
        )
        new, old_spans, new_spans = apply_edits(chosen, g.edits)
        return chosen, new, old_spans, new_spans

    # ------------------------------------------------------------------------------------------
    # Yes/no answers
    # ------------------------------------------------------------------------------------------

    def _analyse_yes_no(
        self, text: str, toks: list[Token], answer_yes: bool, question: str
    ) -> Analysis:
        noun = self.lexicon.is_noun
        cue = next((i for i, t in enumerate(toks) if t.lower in {"yes", "no"}), None)
        if cue is not None:
            t = toks[cue]
            said_yes = t.lower == "yes"
            if not said_yes and is_no_determiner(text, toks, cue):
                edits = affirm(text, toks, cue, cue + 1, strict=True, is_noun=noun)
            else:
                new = "no" if said_yes else "yes"
                edits = [replace_tokens(text, toks, cue, cue, new)]
                lo, hi = _clause(text, toks, cue)
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
                    for a, b in _sentence_ranges(text, toks)
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
            raise Unjudgeable(
                code, "the yes/no statement cannot be flipped by a word edit", verdict
            )
        return Analysis(
            verdict,
            edits,
            spans if verdict == "correct" else [],
            wrong_text=None if verdict == "correct" else ("yes" if said_yes else "no"),
        )

    # ------------------------------------------------------------------------------------------
    # Term answers (closed choices and open answers)
    # ------------------------------------------------------------------------------------------

    def _analyse_terms(
        self, record: VQARecord, text: str, toks: list[Token], rng: random.Random
    ) -> Analysis:
        cat = category_of(record.question_type)
        count = cat == "count"

        # A "none" answer (no abnormality, no finding) is stated by "none" or a quantifier "no".
        none_answer = not count and content_keys(record.answer) in {("none",), ("nothing",)}

        def ckey(t: Token | str) -> str:
            k = t.key if isinstance(t, Token) else t
            if count and k in ZERO_WORDS | {"none"}:
                return "0"
            if count and k == "single":
                return "1"
            if none_answer and k in NONE_WORDS:
                return "none"
            return k

        parts = []
        for p in split_parts(record.answer):
            keys = [ckey(k) for k in content_keys(p)]
            hard = [k for k in keys if k not in SOFT_WORDS] or keys
            hard = hard or [ckey(t) for t in tokenize(p)]
            if hard:
                parts.append((p, hard))
        if not parts:
            raise Unjudgeable(
                "no_answer_found", f"the reference answer {record.answer!r} has no word"
            )
        all_keys = [k for _, ks in parts for k in ks]
        group = self.lexicon.group(cat, all_keys)

        def core(t: Token) -> bool:
            if count and ckey(t) in {"0", "1"} and t.key in ZERO_WORDS | {"none", "single"}:
                return True
            if none_answer and t.key in NONE_WORDS:
                return True
            return t.lower not in FUNCTION_WORDS and bool(self.lexicon.tags(t.key) & group)

        # Answers with inner function words ("Symmetrical to the bone marrow", "CT with
        # contrast") are not one clinical run: a verbatim occurrence (articles aside) is right.
        if any(
            t.lower in FUNCTION_WORDS - ARTICLES - {"and", "or"} for t in tokenize(record.answer)
        ):
            window = _find_phrase(toks, tokenize(record.answer), ckey)
            if window is not None:
                i0, i1 = window
                idx = list(range(i0, i1 + 1))
                run = _Run(idx, [i for i in idx if toks[i].lower not in FUNCTION_WORDS] or idx)
                pairing = [(record.answer, all_keys, run)]
                edits = self._counterfactual(text, toks, pairing, cat, group, ckey, rng)
                return Analysis("correct", edits, [(toks[i0].start, toks[i1].end)])
        runs = _runs(text, toks, core)
        if not runs:
            raise Unjudgeable("no_answer_found", f"no {cat} term in the response")
        # The answer runs: runs that do not only echo the question first; among them, the most
        # answer words, then the longest, then the first ("Two lesions are seen: a hypodense
        # round lesion ..." -> "hypodense round lesion").
        q_keys = {ckey(k) for k in content_keys(record.question)}
        want = set(all_keys)

        def rank(r: _Run) -> tuple[int, int, int, int]:
            keys = {ckey(toks[i]) for i in r.core}
            return (keys <= q_keys, -len(keys & want), -len(r.core), r.idx[0])

        k = len(parts)
        selected = sorted(sorted(runs, key=rank)[:k], key=lambda r: r.idx[0])
        if len(selected) < k:
            raise Unjudgeable(
                "partial_answer", f"the answer lists {k} items, the response names {len(selected)}"
            )
        pairing = _match_parts(parts, selected, toks, ckey)
        run_keys = {id(r): {ckey(toks[i]) for i in r.core} for r in selected}
        wrong = [(p, ks, r) for p, ks, r in pairing if not set(ks) <= run_keys[id(r)]]
        # Items listed beside the answer ("upper left and lower left" for one lesion) are wrong
        # too: over-listing is a hallucinated finding. They are deleted with their separator.
        extra = [
            r
            for r in _list_mates(text, toks, runs, selected)
            if not {ckey(toks[i]) for i in r.core} <= q_keys
        ]
        if wrong or extra:
            edits: list[Edit] = []
            for p, ks, r in wrong:
                edits += self._fix_run(text, toks, p, ks, r, ckey)
            for r in extra:
                edits.append(_delete_item(text, toks, r, selected))
            edits.sort()
            shown = sorted(selected + extra, key=lambda r: r.idx[0])
            if any(b.start < a.end for a, b in itertools.pairwise(edits)):
                # Item fixes collide: replace the whole list by the answer; the validator
                # decides whether that is still minimal.
                edits = [
                    replace_tokens(
                        text, toks, shown[0].idx[0], shown[-1].idx[-1], _neutral(record.answer)
                    )
                ]
            wrong_text = " and ".join(_run_text(text, toks, r) for r in shown)
            return Analysis("incorrect", edits, wrong_text=wrong_text)
        spans = [(toks[r.core[0]].start, toks[r.core[-1]].end) for r in selected]
        edits = self._counterfactual(text, toks, pairing, cat, group, ckey, rng)
        return Analysis("correct", edits, spans)

    def _fix_run(
        self, text: str, toks: list[Token], part: str, keys: list[str], run: _Run, ckey: KeyFn
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
            cls_m = self._classes(m) if common else self._classes(m) & ATTRIBUTE_WORD_CLASSES
            cand = [i for i in extra if i not in used and self._classes(ckey(toks[i])) & cls_m]
            if not cand and common and len(missing) == 1 and len(extra) == 1:
                shared = self.lexicon.tags(m) & self.lexicon.tags(toks[extra[0]].key)
                cand = extra if shared else []
            if not cand:
                break
            used.add(cand[0])
            subs.append((cand[0], m))
        else:
            edits = []
            for i, m in subs:
                if is_number(m):
                    new = _count_surface(int(float(m)), text, toks, i)
                else:
                    new = surface.get(m, m)
                edits.append(replace_tokens(text, toks, i, i, new))
            return edits
        return [replace_tokens(text, toks, run.core[0], run.core[-1], _neutral(part))]

    @staticmethod
    def _classes(key: str) -> frozenset[str]:
        """Built-in word classes of a key (side, vertical, organ, ...; numbers are counts). Only
        built-in classes: dataset tags are too loose ("left" is tagged organ by "Left Lung")."""
        tags = {c for c, words in BUILTIN.items() if key in words}
        if is_number(key):
            tags.add("count")
        return frozenset(tags)

    def _counterfactual(
        self,
        text: str,
        toks: list[Token],
        pairing: list[_Pairing],
        cat: str,
        group: frozenset[str],
        ckey: KeyFn,
        rng: random.Random,
    ) -> list[Edit]:
        """One answer word flipped to its antonym, else an answer of the same category."""
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
                    eds = affirm(text, toks, i, i + 1, strict=True, is_noun=self.lexicon.is_noun)
                    if eds:
                        return eds
                    continue
                new = _flip_word(text, toks, i, ckey)
                if new is not None and ckey(word_key(new)) not in keys:
                    flips.append((i, new))
            if flips:
                i, new = flips[rng.randrange(len(flips))]
                return [replace_tokens(text, toks, i, i, new)]
        # Open vocabulary: another answer of the category from the dataset's vocabulary, as
        # long as the edit stays within the word cap; else one clinical word swapped for
        # another of its class (organ, finding, ...); else any vocabulary answer.
        cap = self.config.max_changed_words
        for n in order:
            _, keys, run = pairing[n]
            cover = [i for i in run.core if ckey(toks[i]) in keys]
            if not cover or len(cover) > cap:
                continue
            alt = self._alternative(cat, group, keys, len(cover), rng, ckey, max_words=cap)
            if alt is not None:
                return [replace_tokens(text, toks, cover[0], cover[-1], alt.text)]
        for n in order:
            _, keys, run = pairing[n]
            swaps = []
            for i in run.core:
                k = ckey(toks[i])
                if k not in keys:
                    continue
                for c in sorted(self._classes(k) & SWAP_CLASSES):
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
            alt = self._alternative(cat, group, keys, len(cover), rng, ckey)
            if alt is not None:
                return [replace_tokens(text, toks, cover[0], cover[-1], alt.text)]
        raise Unjudgeable(
            "no_counterfactual", f"no wrong alternative for the {cat} answer", "correct"
        )

    def _vocab_for(self, cat: str, group: frozenset[str]) -> list[Phrase]:
        """The dataset's answers of the category; the built-in words only when it has none."""
        for dataset_only in (True, False):
            vocab = self.lexicon.vocabulary(cat, dataset_only=dataset_only)
            if not vocab:
                vocab = [
                    p
                    for c in sorted(group)
                    for p in self.lexicon.vocabulary(c, dataset_only=dataset_only)
                ]
            if vocab:
                return vocab
        return []

    def _alternative(
        self,
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
        for p in self._vocab_for(cat, group):
            pk = {ckey(k) for k in p.keys}
            if not pk or want <= pk or pk <= SOFT_WORDS:
                continue
            if max_words is not None and len(p.text.split()) > max_words:
                continue
            cands.append(p)
        # Mixed categories (SLAKE "Size" holds organs too): keep the answer's own word class.
        classes = set().union(*(self._classes(k) for k in want)) - {"side", "vertical"}
        if classes:
            same = [p for p in cands if classes & set().union(*(self._classes(k) for k in p.keys))]
            cands = same or cands
        if not cands:
            return None
        best = min(abs(len(p.keys) - n_words) for p in cands)
        cands = [p for p in cands if abs(len(p.keys) - n_words) == best]
        return cands[rng.randrange(len(cands))]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _neutral(answer: str) -> str:
    """An answer as one clean phrase: whitespace collapsed, trailing full stop dropped."""
    return " ".join(answer.split()).rstrip(".!?") or answer.strip()


def _sentence_ranges(text: str, toks: list[Token]) -> list[tuple[int, int]]:
    """Token index range ``[lo, hi)`` of each sentence."""
    ranges = []
    for s, e in sentence_spans(text):
        idx = [i for i, t in enumerate(toks) if s <= t.start < e]
        if idx:
            ranges.append((idx[0], idx[-1] + 1))
    return ranges


def _clause(text: str, toks: list[Token], cue: int) -> tuple[int, int]:
    """Token range of the clause after a yes/no word: the rest of its sentence, or the next
    sentence when the word stands alone ("No. There is no lesion.")."""
    ranges = _sentence_ranges(text, toks)
    for n, (lo, hi) in enumerate(ranges):
        if lo <= cue < hi:
            if cue + 1 < hi:
                return cue + 1, hi
            return ranges[n + 1] if n + 1 < len(ranges) else (hi, hi)
    return cue + 1, cue + 1


def _runs(text: str, toks: list[Token], core: Callable[[Token], bool]) -> list[_Run]:
    """Maximal runs of clinical words joined by spaces, hyphens or slashes (commas and "and"
    split runs); connectors inside, soft words inside or at the end."""
    runs: list[_Run] = []
    cur: list[tuple[int, str]] = []

    def flush() -> None:
        while cur and cur[0][1] in {"conn", "soft"}:
            cur.pop(0)
        while cur and cur[-1][1] == "conn":
            cur.pop()
        if any(kind == "core" for _, kind in cur):
            runs.append(_Run([i for i, _ in cur], [i for i, kind in cur if kind == "core"]))
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


def _find_phrase(toks: list[Token], phrase: list[Token], ckey: KeyFn) -> tuple[int, int] | None:
    """First ``(i, j)`` such that tokens ``i..j`` spell the phrase, articles ignored."""
    want = [ckey(t) for t in phrase if t.lower not in ARTICLES]
    have = [i for i, t in enumerate(toks) if t.lower not in ARTICLES]
    keys = [ckey(toks[i]) for i in have]
    n = len(want)
    for a in range(len(keys) - n + 1):
        if n and keys[a : a + n] == want:
            return have[a], have[a + n - 1]
    return None


def _run_text(text: str, toks: list[Token], r: _Run) -> str:
    """The run's clinical words as written (from its first to its last core word)."""
    return text[toks[r.core[0]].start : toks[r.core[-1]].end]


_LIST_GAP = frozenset({",", "and", ", and", "or", ", or", "/", "&"})


def _list_mates(text: str, toks: list[Token], runs: list[_Run], selected: list[_Run]) -> list[_Run]:
    """Runs listed together with the selected ones (separated only by ",", "and", "or") that
    are not selected themselves."""
    order = sorted(runs, key=lambda r: r.idx[0])
    chosen = {id(r) for r in selected}
    lists: list[list[_Run]] = []
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


def _delete_item(text: str, toks: list[Token], r: _Run, selected: list[_Run]) -> Edit:
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


def _match_parts(
    parts: list[tuple[str, list[str]]], runs: list[_Run], toks: list[Token], ckey: KeyFn
) -> list[_Pairing]:
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


def _count_surface(value: int, text: str, toks: list[Token], i: int) -> str:
    """A count written like the word it replaces: digits for digits; zero as "no" before a noun
    ("no lesions") and "none" alone; else a number word."""
    tok = toks[i]
    if tok.surface.isdigit():
        return str(value)
    if value == 0:
        before_noun = i + 1 < len(toks) and joined(text, tok, toks[i + 1])
        return "no" if before_noun else "none"
    return DIGIT_WORDS.get(value, str(value))


def _flip_word(text: str, toks: list[Token], i: int, ckey: KeyFn) -> str | None:
    """Antonym of word ``i``; counts: 0 -> 1 (2 before a plural), 1 -> 2, 2 -> 1, n -> n - 1."""
    k = ckey(toks[i])
    if is_number(k) and "." not in k:
        n = int(k)
        m = {0: 2 if _next_is_plural(text, toks, i) else 1, 1: 2, 2: 1}.get(n, n - 1)
        return _count_surface(m, text, toks, i)
    return antonym(toks[i].surface)
