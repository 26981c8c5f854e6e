"""Internal result types of the rules judge's analysers (not part of the stage contract)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fire_mpo_core.clinical.edits import Edit, Span
from fire_mpo_core.judge.config import RejectCode

Verdict = Literal["correct", "incorrect"]


class Unjudgeable(Exception):
    """The analyser cannot build a pair; becomes a :class:`~fire_mpo_core.judge.base.Rejection`."""

    def __init__(
        self,
        code: RejectCode,
        reason: str,
        verdict: Verdict | None = None,
    ) -> None:
        super().__init__(reason)
        self.code: RejectCode = code
        self.reason = reason
        self.verdict = verdict


@dataclass
class Analysis:
    """A judged text: the verdict and the word edits that flip it.

    ``edits`` correct the text when the verdict is incorrect, and write a plausible wrong
    alternative (the counterfactual) when it is correct. ``answer_spans`` mark where the answer
    stands in a correct text; ``wrong_text`` is the text's wrong answer when incorrect (the
    rejected side of a style-agnostic pair)."""

    verdict: Verdict
    edits: list[Edit]
    answer_spans: list[Span] = field(default_factory=list)
    wrong_text: str | None = None
