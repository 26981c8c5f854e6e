"""Preference losses of the FiRe-MPO pipeline: DPO, MASK-DPO, RRPO, mDPO and FiRe-MPO.

Three layers:

* :class:`LossConfig` picks the loss and its coefficients;
* pure loss modules (:mod:`.objectives`) map per-pair token log-prob sums
  (:class:`PreferenceLogps`) to unreduced per-pair outputs (:class:`LossOutput`);
* two producers of those sums: the naive path from full logits
  (:func:`preference_loss_from_logits`, the public contract of docs/design.md section 5) and the
  fused path from hidden states and the lm_head weight (:func:`preference_loss_from_hidden`),
  which never materialises [B, T, V] and agrees with the naive path to float64 precision.

Typical use in a trainer::

    from fire_mpo_core.losses import LossConfig, preference_loss_from_logits
    cfg = LossConfig(name="fire_mpo")
    loss = preference_loss_from_logits(cfg, policy_logits, reference_logits, labels,
                                       span_masks, has_corrupted).mean()
"""

from fire_mpo_core.losses.base import (
    BRANCHES,
    BranchLogps,
    LossOutput,
    PreferenceLogps,
    PreferenceLoss,
)
from fire_mpo_core.losses.config import LossConfig
from fire_mpo_core.losses.fused import (
    FusedBranch,
    fused_token_stats,
    pack_branch,
    pack_rows,
    preference_logps_from_hidden,
    preference_loss_from_hidden,
    preference_outputs_from_hidden,
    reference_logp_sums,
)
from fire_mpo_core.losses.naive import (
    IGNORE_INDEX,
    preference_logps_from_logits,
    preference_loss_from_logits,
    preference_outputs_from_logits,
)
from fire_mpo_core.losses.objectives import (
    LOSSES,
    DPOLoss,
    FiReMPOLoss,
    MaskDPOLoss,
    MDPOLoss,
    RRPOLoss,
    build_loss,
)

__all__ = [
    "BRANCHES",
    "IGNORE_INDEX",
    "LOSSES",
    "BranchLogps",
    "DPOLoss",
    "FiReMPOLoss",
    "FusedBranch",
    "LossConfig",
    "LossOutput",
    "MDPOLoss",
    "MaskDPOLoss",
    "PreferenceLogps",
    "PreferenceLoss",
    "RRPOLoss",
    "build_loss",
    "fused_token_stats",
    "pack_branch",
    "pack_rows",
    "preference_logps_from_hidden",
    "preference_logps_from_logits",
    "preference_loss_from_hidden",
    "preference_loss_from_logits",
    "preference_outputs_from_hidden",
    "preference_outputs_from_logits",
    "reference_logp_sums",
]
