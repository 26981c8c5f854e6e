"""The five preference losses of docs/design.md section 1, as pure modules over token log-prob sums.

Each loss maps a :class:`~fire_mpo_core.losses.base.PreferenceLogps` (tensors [B]) to an unreduced
:class:`~fire_mpo_core.losses.base.LossOutput` ([B] per field). Build one from a config with
:func:`build_loss`::

    loss_fn = build_loss(LossConfig(name="fire_mpo"))
    out = loss_fn(logps)          # out.loss: [B]; the batch loss is out.loss.mean()

A new loss is one subclass of :class:`PreferenceLoss` plus one line in :data:`LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from fire_mpo_core.losses.base import KLPositions, LossOutput, PreferenceLogps, PreferenceLoss
from fire_mpo_core.losses.config import LossConfig, VisualDirection


def _ranking_only(loss: PreferenceLoss, x: PreferenceLogps, chosen, rejected) -> LossOutput:
    """-log sig(chosen - rejected) with no visual or KL term (DPO and MASK-DPO)."""
    margins = chosen - rejected
    zeros = torch.zeros_like(margins)
    return LossOutput(
        loss=-F.logsigmoid(margins),
        chosen_rewards=chosen,
        rejected_rewards=rejected,
        margins=margins,
        visual_margin=zeros,
        visual_active=torch.zeros_like(x.has_corrupted, dtype=torch.bool),
        kl_forward=zeros,
        kl_reverse=zeros,
        nll=loss._nll(x),
    )


class DPOLoss(PreferenceLoss):
    """DPO: loss = -log sig( r(v,y+) - r(v,y-) ), rewards over every response token."""

    def terms(self, x: PreferenceLogps) -> LossOutput:
        return _ranking_only(
            self, x, x.clean_chosen.reward(self.beta), x.clean_rejected.reward(self.beta)
        )


class MaskDPOLoss(PreferenceLoss):
    """MASK-DPO: loss = -log sig( r_M(v,y+) - r_M(v,y-) ), rewards over the marked spans only."""

    def terms(self, x: PreferenceLogps) -> LossOutput:
        return _ranking_only(
            self, x, x.clean_chosen.span_reward(self.beta), x.clean_rejected.span_reward(self.beta)
        )


class RRPOLoss(PreferenceLoss):
    """RRPO: loss = -log sig( r_M(v,y+) - r_M(v,y-) ) + alpha * sum_{t in K} KL(ref_t || theta_t).

    The KL is on y+ under the clean image v; K is every response token of y+ (``kl_on="all"``,
    the original RRPO) or the marked spans M(y+) (``kl_on="spans"``).
    """

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 0.01,
        kl_on: KLPositions = "all",
        nll_weight: float = 0.0,
    ) -> None:
        super().__init__(beta=beta, nll_weight=nll_weight)
        self.alpha = alpha
        self._kl_on: KLPositions = kl_on

    @property
    def kl_on(self) -> KLPositions:
        return self._kl_on

    def logged_terms(self, out: LossOutput) -> dict[str, Tensor]:
        return {**super().logged_terms(out), "loss/kl": out.kl_forward}

    def terms(self, x: PreferenceLogps) -> LossOutput:
        chosen = x.clean_chosen.span_reward(self.beta)
        rejected = x.clean_rejected.span_reward(self.beta)
        margins = chosen - rejected
        kl_fwd, kl_rev = self._kl(x)
        zeros = torch.zeros_like(margins)
        return LossOutput(
            loss=-F.logsigmoid(margins) + self.alpha * kl_fwd,
            chosen_rewards=chosen,
            rejected_rewards=rejected,
            margins=margins,
            visual_margin=zeros,
            visual_active=torch.zeros_like(x.has_corrupted, dtype=torch.bool),
            kl_forward=kl_fwd,
            kl_reverse=kl_rev,
            nll=self._nll(x),
        )


class MDPOLoss(PreferenceLoss):
    """mDPO: loss = -log sig( r(v,y+) - r(v,y-) )
                    - 1[v' exists] * log sig( r(v,y+) - r(v',y+) )
                    - log sig( r(v,y+) ).

    The second term is mDPO's image-conditional preference (the same answer must be preferred with
    the real image over the corrupted one), the third its reward anchor (delta = 0).
    """

    @property
    def corrupt_branches(self) -> tuple[str, ...]:
        return ("corrupt_chosen",)

    def logged_terms(self, out: LossOutput) -> dict[str, Tensor]:
        return {**super().logged_terms(out), "loss/anchor": -F.logsigmoid(out.chosen_rewards)}

    def terms(self, x: PreferenceLogps) -> LossOutput:
        chosen = x.clean_chosen.reward(self.beta)
        rejected = x.clean_rejected.reward(self.beta)
        margins = chosen - rejected
        visual, visual_margin, active = self._visual(
            x, lambda x: chosen - x.corrupt_chosen.reward(self.beta)
        )
        zeros = torch.zeros_like(margins)
        return LossOutput(
            loss=-F.logsigmoid(margins) + visual - F.logsigmoid(chosen),
            chosen_rewards=chosen,
            rejected_rewards=rejected,
            margins=margins,
            visual_margin=visual_margin,
            visual_active=active,
            kl_forward=zeros,
            kl_reverse=zeros,
            nll=self._nll(x),
        )


class FiReMPOLoss(PreferenceLoss):
    """FiRe-MPO: loss = -log sig( r_M(v,y+) - r_M(v,y-) )
                        - gamma * 1[v' exists] * log sig( visual margin )
                        + alpha * sum_{t in M(y+)} [ lambda * KL(ref_t || theta_t)
                                                     + (1 - lambda) * KL(theta_t || ref_t) ].

    Visual margin by ``visual_direction``: "reverse" (paper) r_M(v',y-) - r_M(v',y+);
    "v1" r_M(v,y+) - r_M(v',y+); "v2" r_M(v,y+) - r_M(v',y-). The KL is on the span tokens of y+
    under the clean image, full vocabulary per position, summed over positions.
    """

    _NEEDS: dict[str, tuple[str, ...]] = {  # noqa: RUF012 - constant lookup table
        "reverse": ("corrupt_chosen", "corrupt_rejected"),
        "v1": ("corrupt_chosen",),
        "v2": ("corrupt_rejected",),
    }

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 0.01,
        gamma: float = 0.1,
        lambda_: float = 0.5,
        visual_direction: VisualDirection = "reverse",
        nll_weight: float = 0.0,
    ) -> None:
        super().__init__(beta=beta, nll_weight=nll_weight)
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError(f"lambda_ must be in [0, 1], got {lambda_}")
        if visual_direction not in self._NEEDS:
            raise ValueError(f"unknown visual_direction {visual_direction!r}")
        self.alpha = alpha
        self.gamma = gamma
        self.lambda_ = lambda_
        self.visual_direction = visual_direction

    @property
    def corrupt_branches(self) -> tuple[str, ...]:
        # gamma = 0 removes the visual term, so the corrupted image need not be scored at all.
        return self._NEEDS[self.visual_direction] if self.gamma else ()

    @property
    def kl_on(self) -> KLPositions:
        return "spans"

    def logged_terms(self, out: LossOutput) -> dict[str, Tensor]:
        kl = self.lambda_ * out.kl_forward + (1 - self.lambda_) * out.kl_reverse
        return {**super().logged_terms(out), "loss/kl": kl}

    def _visual_margin(self, x: PreferenceLogps) -> Tensor:
        b = self.beta
        if self.visual_direction == "reverse":
            return x.corrupt_rejected.span_reward(b) - x.corrupt_chosen.span_reward(b)
        if self.visual_direction == "v1":
            return x.clean_chosen.span_reward(b) - x.corrupt_chosen.span_reward(b)
        return x.clean_chosen.span_reward(b) - x.corrupt_rejected.span_reward(b)

    def terms(self, x: PreferenceLogps) -> LossOutput:
        chosen = x.clean_chosen.span_reward(self.beta)
        rejected = x.clean_rejected.span_reward(self.beta)
        margins = chosen - rejected
        kl_fwd, kl_rev = self._kl(x)
        zeros = torch.zeros_like(margins)
        if self.gamma:
            visual, visual_margin, active = self._visual(x, self._visual_margin)
        else:
            visual, visual_margin = zeros, zeros
            active = torch.zeros_like(x.has_corrupted, dtype=torch.bool)
        kl = self.lambda_ * kl_fwd + (1.0 - self.lambda_) * kl_rev
        return LossOutput(
            loss=-F.logsigmoid(margins) + self.gamma * visual + self.alpha * kl,
            chosen_rewards=chosen,
            rejected_rewards=rejected,
            margins=margins,
            visual_margin=visual_margin,
            visual_active=active,
            kl_forward=kl_fwd,
            kl_reverse=kl_rev,
            nll=self._nll(x),
        )


#: Registry: config name -> builder from a :class:`LossConfig`.
LOSSES: dict[str, Callable[[LossConfig], PreferenceLoss]] = {
    "dpo": lambda c: DPOLoss(beta=c.beta, nll_weight=c.nll_weight),
    "mask_dpo": lambda c: MaskDPOLoss(beta=c.beta, nll_weight=c.nll_weight),
    "rrpo": lambda c: RRPOLoss(
        beta=c.beta, alpha=c.alpha, kl_on=c.rrpo_kl_on, nll_weight=c.nll_weight
    ),
    "mdpo": lambda c: MDPOLoss(beta=c.beta, nll_weight=c.nll_weight),
    "fire_mpo": lambda c: FiReMPOLoss(
        beta=c.beta,
        alpha=c.alpha,
        gamma=c.gamma,
        lambda_=c.lambda_,
        visual_direction=c.visual_direction,
        nll_weight=c.nll_weight,
    ),
}


def build_loss(cfg: LossConfig) -> PreferenceLoss:
    """The loss module named by ``cfg.name``, with the config's coefficients."""
    if cfg.name not in LOSSES:
        raise ValueError(f"train.loss.name {cfg.name!r} is unknown; known: {sorted(LOSSES)}")
    return LOSSES[cfg.name](cfg)
