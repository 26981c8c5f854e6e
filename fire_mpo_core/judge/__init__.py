"""Judges: turn on-policy rollouts into minimal-edit preference pairs with span masks.

FiRe-MPO step 1 (DESIGN.md section 1): a judge compares the model's answer with the reference;
wrong answers get only the wrong clinical span corrected (chosen), right ones get a plausible wrong
counterfactual (rejected); the changed spans are marked on both sides.

    from fire_mpo_core.judge import JudgeConfig, build_judge, judge_rollouts, validate_pair
    judge = build_judge(JudgeConfig(), records)
    pairs, rejects = judge_rollouts(judge, records, rollouts)

Registry: :data:`JUDGES` maps ``JudgeConfig.name`` to a class built as ``cls(config, records)``;
a new judge is one class and one line here.
"""

from __future__ import annotations

from collections.abc import Sequence

from fire_mpo_core.data.records import VQARecord
from fire_mpo_core.judge.base import (
    Judge,
    JudgeConfig,
    JudgeResult,
    PairStyle,
    Rejection,
    judge_rollouts,
    stable_seed,
)
from fire_mpo_core.judge.llm import LLMJudge
from fire_mpo_core.judge.rules import RulesJudge
from fire_mpo_core.judge.validate import validate_pair

#: Judge name -> class; each is constructed as ``cls(config, records)``.
JUDGES: dict[str, type] = {
    "rules": RulesJudge,
    "llm": LLMJudge,
}


def build_judge(config: JudgeConfig, records: Sequence[VQARecord] = ()) -> Judge:
    """The configured judge, given the dataset's records (its answer vocabulary)."""
    return JUDGES[config.name](config, records)


__all__ = [
    "JUDGES",
    "Judge",
    "JudgeConfig",
    "JudgeResult",
    "PairStyle",
    "Rejection",
    "RulesJudge",
    "build_judge",
    "judge_rollouts",
    "stable_seed",
    "validate_pair",
]
