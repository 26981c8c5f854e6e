"""Configuration of the closed loop (the cycle config's `loop:` section): the reference policy
of each round and the continue / stop rule over the rounds' validation metric.

    from fire_mpo_core.loop.config import LoopConfig
    cfg = LoopConfig(reference="previous_round", metric="grounded_accuracy", patience=2)

The rule (:func:`fire_mpo_core.loop.decide.decide`): a round *improved* when its validation
value exceeds the best value of every earlier round (round 0 = the SFT base) by more than
`min_improvement`; the loop stops after `patience` rounds in a row without improvement, or at
round `max_rounds`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fire_mpo_core.evaluation.config import SELECTION_METRICS
from fire_mpo_core.schema import StrictConfig


class LoopConfig(StrictConfig):
    """Reference policy per round and the continue / stop rule of the on-policy loop."""

    reference: Literal["base", "previous_round"] = Field(
        default="base",
        description="Frozen reference of round k: 'base' = the SFT policy (the adapter off) in "
        "every round, as the paper; 'previous_round' = round k-1's policy, adapter on "
        "(iterative DPO). Round 1's previous round is the SFT policy, so both agree there.",
    )
    metric: str = Field(
        default="grounded_accuracy",
        description="Headline validation metric that ranks rounds and decides (higher is "
        "better); a metrics.json name of evaluate (fire_mpo_core.evaluation.config."
        "SELECTION_METRICS).",
    )
    min_improvement: float = Field(
        default=0.0,
        ge=0.0,
        description="Margin: a round improved when its value > the best earlier value + this.",
    )
    patience: int = Field(
        default=1, ge=1, description="Stop after this many rounds in a row without improvement."
    )
    max_rounds: int = Field(
        default=5, ge=1, description="Stop at this round; next-round refuses to go past it."
    )

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in SELECTION_METRICS:
            raise ValueError(f"metric {v!r} is not a ranking metric of evaluate; known: "
                             f"{sorted(SELECTION_METRICS)}")  # fmt: skip
        return v
