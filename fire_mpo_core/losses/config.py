"""Typed configuration of the preference losses.

One :class:`LossConfig` selects a loss (``dpo``, ``mask_dpo``, ``rrpo``, ``mdpo``, ``fire_mpo``)
and holds its coefficients; both the naive path (:mod:`fire_mpo_core.losses.naive`) and the fused
path (:mod:`fire_mpo_core.losses.fused`) read it::

    from fire_mpo_core.losses import LossConfig
    cfg = LossConfig(name="fire_mpo", beta=0.1, alpha=0.01, gamma=0.1, lambda_=0.5)

Defaults are the paper's (beta 0.1, alpha 0.01, gamma 0.1, lambda 0.5). Unknown keys are
rejected, and a setting that the chosen loss would silently ignore (a visual direction for a
loss without FiRe-MPO's visual term, an RRPO KL placement for another loss) is an error whose
message names both fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: A key of :data:`fire_mpo_core.losses.objectives.LOSSES`, checked against the registry by the
#: cycle config and by ``build_loss`` (the registry imports this module, so not here): a new
#: loss is its class plus one registry line, nothing to add in this file.
LossName = str
VisualDirection = Literal["reverse", "v1", "v2"]


class LossConfig(BaseModel):
    """Which preference loss to optimise and its coefficients (docs/design.md section 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: LossName = Field(
        default="fire_mpo",
        description=(
            "Preference loss: 'dpo' (sequence rewards), 'mask_dpo' (span rewards), 'rrpo' "
            "(span rewards + forward KL), 'mdpo' (DPO + image-conditional + anchor terms), "
            "'fire_mpo' (span rewards + visual term + bidirectional span KL)."
        ),
    )
    beta: float = Field(
        default=0.1,
        gt=0.0,
        description="Reward scale: r = beta * sum of (policy - reference) log-probs.",
    )
    alpha: float = Field(
        default=0.01,
        ge=0.0,
        description="Weight of the token-wise KL penalty (rrpo, fire_mpo); 0 turns it off.",
    )
    gamma: float = Field(
        default=0.1,
        ge=0.0,
        description=(
            "Weight of FiRe-MPO's visual-contrastive term on the corrupted image; 0 turns it off."
        ),
    )
    lambda_: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description=(
            "FiRe-MPO KL mix: lambda * KL(ref||theta) + (1 - lambda) * KL(theta||ref); "
            "1 = forward KL only, 0 = reverse KL only."
        ),
    )
    visual_direction: VisualDirection = Field(
        default="reverse",
        description=(
            "FiRe-MPO visual term: 'reverse' (paper) r_M(v',y-) > r_M(v',y+); "
            "'v1' r_M(v,y+) > r_M(v',y+); 'v2' r_M(v,y+) > r_M(v',y-)."
        ),
    )
    visual_gate: bool = Field(
        default=False,
        description=(
            "FiRe-MPO: apply the reverse visual term only to pairs where removing the lesion "
            "makes y- right (PreferencePair.reverses_on_removal: presence / quadrant / count "
            "'yes' vs 'no', count / abnormality vs 'none'); no visual term elsewhere. False is "
            "the paper's ungated form (every pair with v')."
        ),
    )
    nll_weight: float = Field(
        default=0.0,
        ge=0.0,
        description=(
            "Weight of an added NLL on y+ under the clean image (mean over y+ response tokens); "
            "keeps small models from collapsing under pure preference losses."
        ),
    )
    rrpo_kl_on: Literal["all", "spans"] = Field(
        default="all",
        description=(
            "Tokens of y+ that carry RRPO's KL: 'all' response tokens (original RRPO) or only "
            "the marked 'spans' M(y+)."
        ),
    )
    chunk_size: int = Field(
        default=256,
        ge=1,
        description=(
            "Fused path only: response tokens per chunk; the loss's peak extra memory is about "
            "2-3 * chunk_size * vocab floats (float32)."
        ),
    )

    @model_validator(mode="after")
    def _check_conflicts(self) -> LossConfig:
        if self.visual_direction != "reverse" and self.name != "fire_mpo":
            raise ValueError(
                f"visual_direction={self.visual_direction!r} only applies to name='fire_mpo', "
                f"but name={self.name!r}; leave visual_direction at 'reverse'"
            )
        if self.visual_gate and (self.name != "fire_mpo" or self.visual_direction != "reverse"):
            raise ValueError(
                f"visual_gate=True only applies to name='fire_mpo' with visual_direction="
                f"'reverse', but name={self.name!r}, visual_direction={self.visual_direction!r}"
            )
        if self.rrpo_kl_on != "all" and self.name != "rrpo":
            raise ValueError(
                f"rrpo_kl_on={self.rrpo_kl_on!r} only applies to name='rrpo', but "
                f"name={self.name!r}; leave rrpo_kl_on at 'all'"
            )
        return self
