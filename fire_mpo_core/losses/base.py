"""Typed inputs and outputs of the preference losses, and their common base class.

A loss never sees logits. Whatever produced the token log-probs (the naive path from full logits,
the fused path from hidden states chunk by chunk) hands it one :class:`PreferenceLogps`: for each
branch (image x response) the per-pair sums of policy and reference token log-probs over all
response tokens and over the marked spans, plus the per-pair KL sums on (clean image, y+). The
loss returns a :class:`LossOutput` of unreduced per-pair tensors ([B]); the trainer takes the mean.

Notation (docs/design.md section 1): l_theta(t), l_ref(t) are token log-probs,
d(t) = l_theta - l_ref, r(v, y) = beta * sum_{t in y} d(t), r_M(v, y) = beta * sum_{t in M(y)} d(t).

Empty spans: a pair whose span mask is empty has r_M = 0 on that branch and a KL sum of 0 over
M(y+); its span-ranking term is then -log sig(0) = log 2, finite, with zero gradient reaching the
token log-probs through r_M. The pipeline drops such pairs upstream; the losses only promise not to
produce NaN for them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

BRANCHES = ("clean_chosen", "clean_rejected", "corrupt_chosen", "corrupt_rejected")
KLPositions = Literal["spans", "all"]


@dataclass(frozen=True)
class BranchLogps:
    """Per-pair token log-prob sums of one branch (one image, one response). All tensors [B].

    Attributes:
        policy: sum_{t in y} l_theta(t) over the response tokens.
        reference: sum_{t in y} l_ref(t).
        policy_span: sum_{t in M(y)} l_theta(t) over the marked span tokens (0 if M(y) is empty).
        reference_span: sum_{t in M(y)} l_ref(t).
        num_tokens: number of response tokens |y| (float or int).
    """

    policy: Tensor
    reference: Tensor
    policy_span: Tensor
    reference_span: Tensor
    num_tokens: Tensor

    def reward(self, beta: float) -> Tensor:
        """r(v, y) = beta * sum_{t in y} (l_theta - l_ref), shape [B]."""
        return beta * (self.policy - self.reference)

    def span_reward(self, beta: float) -> Tensor:
        """r_M(v, y) = beta * sum_{t in M(y)} (l_theta - l_ref), shape [B]."""
        return beta * (self.policy_span - self.reference_span)


@dataclass(frozen=True)
class PreferenceLogps:
    """Everything a preference loss needs for a batch of B pairs.

    Attributes:
        clean_chosen: (v, y+).
        clean_rejected: (v, y-).
        corrupt_chosen: (v', y+); None when the loss does not need it or no pair has v'.
        corrupt_rejected: (v', y-); likewise.
        has_corrupted: [B] bool, whether pair b has a corrupted image v'. Rows of the corrupt
            branches for pairs without v' are ignored (they must be finite).
        kl_forward: [B] sum over the loss's KL positions K of y+ under v of
            KL(ref_t || theta_t) = sum_w p_ref(w) log(p_ref(w) / p_theta(w)); None if the loss has
            no KL term.
        kl_reverse: [B] the same sum of KL(theta_t || ref_t); None if not computed.
    """

    clean_chosen: BranchLogps
    clean_rejected: BranchLogps
    has_corrupted: Tensor
    corrupt_chosen: BranchLogps | None = None
    corrupt_rejected: BranchLogps | None = None
    kl_forward: Tensor | None = None
    kl_reverse: Tensor | None = None


@dataclass(frozen=True)
class LossOutput:
    """Unreduced per-pair loss and its parts for logging. All tensors [B].

    Attributes:
        loss: the per-pair loss (the batch loss is its mean).
        chosen_rewards: the reward of (v, y+) the ranking term uses (r or r_M).
        rejected_rewards: the reward of (v, y-).
        margins: chosen_rewards - rejected_rewards.
        visual_margin: the argument of the visual log-sigmoid where that term is active, else 0.
        visual_active: [B] bool, whether the visual term contributed for the pair.
        kl_forward: sum over K of KL(ref || theta) (0 for losses without KL).
        kl_reverse: sum over K of KL(theta || ref) (0 for losses without KL).
        nll: mean over y+ response tokens of -l_theta under the clean image.
    """

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor
    visual_margin: Tensor
    visual_active: Tensor
    kl_forward: Tensor
    kl_reverse: Tensor
    nll: Tensor

    def metrics(self) -> dict[str, float]:
        """Batch means for a logger: loss, rewards, reward accuracy, visual margin, KL, NLL."""
        active = self.visual_active
        vis = self.visual_margin[active].mean().item() if bool(active.any()) else 0.0
        return {
            "loss": self.loss.mean().item(),
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/margin": self.margins.mean().item(),
            "rewards/accuracy": (self.margins > 0).float().mean().item(),
            "visual/margin": vis,
            "visual/active_fraction": active.float().mean().item(),
            "kl/forward": self.kl_forward.mean().item(),
            "kl/reverse": self.kl_reverse.mean().item(),
            "nll": self.nll.mean().item(),
        }


class PreferenceLoss(nn.Module):
    """Base of the five losses: subclasses implement :meth:`terms`, this adds the NLL.

    Two properties tell a producer of :class:`PreferenceLogps` what to compute:

    * ``corrupt_branches``: which corrupt branches the visual term reads;
    * ``kl_on``: None (no KL term), ``"spans"`` (M(y+)) or ``"all"`` (every response token of y+).
    """

    def __init__(self, beta: float = 0.1, nll_weight: float = 0.0) -> None:
        super().__init__()
        self.beta = beta
        self.nll_weight = nll_weight

    @property
    def corrupt_branches(self) -> tuple[str, ...]:
        """Corrupt branches (``corrupt_chosen`` / ``corrupt_rejected``) the loss reads."""
        return ()

    @property
    def kl_on(self) -> KLPositions | None:
        """Positions of y+ (under v) whose KL the loss needs: None, "spans" or "all"."""
        return None

    def terms(self, x: PreferenceLogps) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def logged_terms(self, out: LossOutput) -> dict[str, Tensor]:
        """Unweighted per-pair terms the trainer logs (``loss/<name>``); a loss with extra
        terms (a KL mix, an anchor) extends this, so the trainer never branches on loss names."""
        return {"loss/ranking": -F.logsigmoid(out.margins)}

    def forward(self, x: PreferenceLogps) -> LossOutput:
        """Per-pair loss [B] plus parts; adds nll_weight * NLL(y+ | v) to every loss."""
        out = self.terms(x)
        if self.nll_weight:
            out = replace(out, loss=out.loss + self.nll_weight * out.nll)
        return out

    # helpers shared by the subclasses --------------------------------------------------------

    def _visual(self, x: PreferenceLogps, margin_fn) -> tuple[Tensor, Tensor, Tensor]:
        """(-log sig(margin) masked to 0 off v', margin masked to 0, active mask), each [B].

        ``margin_fn`` gets the corrupt branches and returns the margin [B]. The margin is zeroed
        *before* the log-sigmoid so pairs without v' get exactly zero gradient.
        """
        zeros = torch.zeros_like(x.clean_chosen.policy)
        needed = [getattr(x, name) for name in self.corrupt_branches]
        if not bool(x.has_corrupted.any()):
            return zeros, zeros, torch.zeros_like(x.has_corrupted, dtype=torch.bool)
        if any(branch is None for branch in needed):
            missing = [n for n, b in zip(self.corrupt_branches, needed) if b is None]
            raise ValueError(
                f"{type(self).__name__} needs the corrupt branches {missing} because "
                "has_corrupted is true for some pairs"
            )
        active = x.has_corrupted.to(torch.bool)
        margin = torch.where(active, margin_fn(x), zeros)
        term = torch.where(active, -F.logsigmoid(margin), zeros)
        return term, margin, active

    def _nll(self, x: PreferenceLogps) -> Tensor:
        cc = x.clean_chosen
        return -cc.policy / cc.num_tokens.clamp(min=1).to(cc.policy.dtype)

    def _kl(self, x: PreferenceLogps) -> tuple[Tensor, Tensor]:
        zeros = torch.zeros_like(x.clean_chosen.policy)
        fwd = x.kl_forward if x.kl_forward is not None else zeros
        rev = x.kl_reverse if x.kl_reverse is not None else zeros
        return fwd, rev
