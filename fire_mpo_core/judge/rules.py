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

Where the parts live: this module holds :class:`RulesJudge` (dispatch and the pair styles);
yes/no answers are in :mod:`.yes_no`, term answers (verdict and correction) in :mod:`.terms`,
counterfactuals of right term answers in :mod:`.counterfactuals`, clinical runs and the
word-level helpers in :mod:`.runs`, reports in :mod:`.reports`.

Usage::

    judge = RulesJudge(JudgeConfig(style="on_policy", seed=0), records)
    result = judge.judge(record, rollout)     # PreferencePair | Rejection
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fire_mpo_core.clinical.edits import Span, apply_edits
from fire_mpo_core.clinical.lexicon import Lexicon, content_keys, tokenize
from fire_mpo_core.data.records import PreferencePair, Rollout, VQARecord
from fire_mpo_core.judge.base import JudgeResult, Rejection, stable_seed
from fire_mpo_core.judge.config import JudgeConfig, RejectCode
from fire_mpo_core.judge.counterfactuals import SWAP_CLASSES, SWAP_EXCLUDE
from fire_mpo_core.judge.reports import analyse_report
from fire_mpo_core.judge.runs import CONNECTORS, neutral
from fire_mpo_core.judge.terms import ATTRIBUTE_WORD_CLASSES, NONE_WORDS, analyse_terms
from fire_mpo_core.judge.types import Analysis, Unjudgeable, Verdict
from fire_mpo_core.judge.validate import validate_pair
from fire_mpo_core.judge.yes_no import POSITIVE_CUES, analyse_yes_no, is_yes_no

# The constants of the parts stay importable from here, where they were defined before the split.
__all__ = [
    "ATTRIBUTE_WORD_CLASSES",
    "CONNECTORS",
    "NEUTRAL_TEMPLATE",
    "NONE_WORDS",
    "POSITIVE_CUES",
    "SWAP_CLASSES",
    "SWAP_EXCLUDE",
    "RulesJudge",
    "is_yes_no",
]

NEUTRAL_TEMPLATE = "The answer is {}."


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
            return analyse_yes_no(self.lexicon, text, toks, yes, record.question)
        return analyse_terms(self.lexicon, self.config.max_changed_words, record, text, toks, rng)

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
        x = neutral(record.answer)
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
