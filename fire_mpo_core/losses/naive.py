"""Naive reference path: every preference loss from full logits [B, T, V].

The obviously-correct version: a full ``log_softmax`` over the vocabulary, a ``gather`` of the
label ids, masked sums; the full-vocabulary KL at the chosen positions. It materialises several
[B, T, V] tensors, so it is the yardstick for :mod:`fire_mpo_core.losses.fused` (which must agree
with it) and the path for small models. Public contract (docs/design.md section 5)::

    from fire_mpo_core.losses import LossConfig, preference_loss_from_logits
    loss = preference_loss_from_logits(
        LossConfig(name="fire_mpo"), policy_logits, reference_logits, labels, span_masks,
        has_corrupted,
    )                              # Tensor[B], per pair, unreduced; train on loss.mean()

Branch dicts are keyed ``clean_chosen`` (v, y+), ``clean_rejected`` (v, y-), ``corrupt_chosen``
(v', y+), ``corrupt_rejected`` (v', y-); the corrupt keys may be missing when no pair has v'.
``labels[k]`` is [B, T] long with -100 at non-response positions and is already aligned with the
logits (``logits[k][:, t]`` scores ``labels[k][:, t]``); ``span_masks[k]`` is [B, T] bool aligned
with the labels (span positions outside the response are ignored). The reference logits are
treated as constants (detached): the reference model is frozen.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fire_mpo_core.losses.base import (
    BRANCHES,
    BranchLogps,
    KLPositions,
    LossOutput,
    PreferenceLogps,
    PreferenceLoss,
)
from fire_mpo_core.losses.config import LossConfig
from fire_mpo_core.losses.objectives import build_loss

IGNORE_INDEX = -100


def _upcast(logits: Tensor) -> Tensor:
    # log_softmax over ~150k entries in bf16/fp16 loses the small differences the rewards measure.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def token_logps(log_probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Token log-probs l(t) = log_probs[b, t, labels[b, t]], zero where labels == -100.

    Args:
        log_probs: [B, T, V] normalised log-probabilities.
        labels: [B, T] long, -100 at non-response positions.

    Returns:
        (token log-probs [B, T], response mask [B, T] bool).
    """
    mask = labels != IGNORE_INDEX
    index = labels.clamp(min=0).unsqueeze(-1)  # -100 -> 0: any valid id, masked out below
    tok = log_probs.gather(-1, index).squeeze(-1)
    return torch.where(mask, tok, torch.zeros_like(tok)), mask


def kl_per_position(policy_log_probs: Tensor, reference_log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Full-vocabulary KL at every position, both directions.

    With p = pi_theta and q = pi_ref at one position (log_probs [..., V]):
    forward  KL(q || p) = sum_w q(w) (log q(w) - log p(w)),
    reverse  KL(p || q) = sum_w p(w) (log p(w) - log q(w)).

    Returns:
        (forward [...], reverse [...]).
    """
    diff = reference_log_probs - policy_log_probs
    forward = (reference_log_probs.exp() * diff).sum(-1)
    reverse = -(policy_log_probs.exp() * diff).sum(-1)
    return forward, reverse


def _branch(
    policy_log_probs: Tensor, reference_log_probs: Tensor, labels: Tensor, span_mask: Tensor
) -> BranchLogps:
    pol, mask = token_logps(policy_log_probs, labels)
    ref, _ = token_logps(reference_log_probs, labels)
    span = span_mask.to(torch.bool) & mask
    zeros = torch.zeros_like(pol)
    return BranchLogps(
        policy=pol.sum(-1),
        reference=ref.sum(-1),
        policy_span=torch.where(span, pol, zeros).sum(-1),
        reference_span=torch.where(span, ref, zeros).sum(-1),
        num_tokens=mask.sum(-1),
    )


def preference_logps_from_logits(
    loss_fn: PreferenceLoss,
    policy_logits: Mapping[str, Tensor],
    reference_logits: Mapping[str, Tensor],
    labels: Mapping[str, Tensor],
    span_masks: Mapping[str, Tensor],
    has_corrupted: Tensor,
) -> PreferenceLogps:
    """Token log-prob sums and KL sums for ``loss_fn`` from full logits (see module docstring).

    Only the branches the loss reads are scored: the two clean ones always, the corrupt ones in
    ``loss_fn.corrupt_branches`` when some pair has v'. The KL sums cover ``loss_fn.kl_on`` of
    (clean, y+): its span tokens or all its response tokens.
    """
    for key in (*policy_logits, *reference_logits, *labels, *span_masks):
        if key not in BRANCHES:
            raise ValueError(f"unknown branch {key!r}; expected one of {BRANCHES}")
    wanted = ["clean_chosen", "clean_rejected"]
    if bool(has_corrupted.any()):
        wanted += list(loss_fn.corrupt_branches)
    for key in wanted:
        for what, d in (
            ("policy_logits", policy_logits),
            ("reference_logits", reference_logits),
            ("labels", labels),
            ("span_masks", span_masks),
        ):
            if key not in d:
                raise ValueError(
                    f"{what} lacks branch {key!r}, which {type(loss_fn).__name__} needs"
                    + (" because has_corrupted is true for some pairs" if "corrupt" in key else "")
                )
        if policy_logits[key].shape[:2] != labels[key].shape:
            raise ValueError(
                f"{key}: logits {tuple(policy_logits[key].shape)} do not align with labels "
                f"{tuple(labels[key].shape)}"
            )

    branches: dict[str, BranchLogps] = {}
    kl_forward = kl_reverse = None
    for key in wanted:
        pol_lp = torch.log_softmax(_upcast(policy_logits[key]), dim=-1)
        ref_lp = torch.log_softmax(_upcast(reference_logits[key].detach()), dim=-1)
        branches[key] = _branch(pol_lp, ref_lp, labels[key], span_masks[key])
        if key == "clean_chosen" and loss_fn.kl_on is not None:
            kl_forward, kl_reverse = _kl_sums(
                pol_lp, ref_lp, labels[key], span_masks[key], loss_fn.kl_on
            )
        del pol_lp, ref_lp
    return PreferenceLogps(
        clean_chosen=branches["clean_chosen"],
        clean_rejected=branches["clean_rejected"],
        corrupt_chosen=branches.get("corrupt_chosen"),
        corrupt_rejected=branches.get("corrupt_rejected"),
        has_corrupted=has_corrupted.to(torch.bool),
        kl_forward=kl_forward,
        kl_reverse=kl_reverse,
    )


def _kl_sums(
    pol_lp: Tensor, ref_lp: Tensor, labels: Tensor, span_mask: Tensor, on: KLPositions
) -> tuple[Tensor, Tensor]:
    """Per-pair sums [B] of both KLs over the K positions (response, or response & span)."""
    positions = labels != IGNORE_INDEX
    if on == "spans":
        positions = positions & span_mask.to(torch.bool)
    # Only the K positions are compared ([K, V]), not all B * T of them.
    forward, reverse = kl_per_position(pol_lp[positions], ref_lp[positions])
    pair = positions.nonzero()[:, 0]
    zeros = pol_lp.new_zeros(labels.shape[0])
    return zeros.index_add(0, pair, forward), zeros.index_add(0, pair, reverse)


def preference_outputs_from_logits(
    cfg: LossConfig,
    policy_logits: Mapping[str, Tensor],
    reference_logits: Mapping[str, Tensor],
    labels: Mapping[str, Tensor],
    span_masks: Mapping[str, Tensor],
    has_corrupted: Tensor,
) -> LossOutput:
    """The loss named by ``cfg`` with its logging parts (:class:`LossOutput`, fields [B])."""
    loss_fn = build_loss(cfg)
    logps = preference_logps_from_logits(
        loss_fn, policy_logits, reference_logits, labels, span_masks, has_corrupted
    )
    return loss_fn(logps)


def preference_loss_from_logits(
    cfg: LossConfig,
    policy_logits: Mapping[str, Tensor],
    reference_logits: Mapping[str, Tensor],
    labels: Mapping[str, Tensor],
    span_masks: Mapping[str, Tensor],
    has_corrupted: Tensor,
) -> Tensor:
    """Per-pair loss [B] of ``cfg.name`` from full logits (the naive reference path).

    Args:
        cfg: the loss and its coefficients.
        policy_logits: branch -> [B, T, V] policy logits, aligned with the labels.
        reference_logits: branch -> [B, T, V] reference logits (treated as constants).
        labels: branch -> [B, T] long target ids, -100 at non-response positions.
        span_masks: branch -> [B, T] bool marked-span positions M(y), aligned with the labels.
        has_corrupted: [B] bool, whether pair b has a corrupted image v'.

    Returns:
        Tensor [B]: the unreduced per-pair loss (docs/design.md section 1), plus
        ``cfg.nll_weight`` * NLL(y+ | v) when that weight is non-zero.
    """
    return preference_outputs_from_logits(
        cfg, policy_logits, reference_logits, labels, span_masks, has_corrupted
    ).loss
