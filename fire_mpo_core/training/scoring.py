"""Scoring one branch batch: the policy forward over every row, the reference where it is
needed, and the loss of ``cfg.loss`` per pair (:func:`score_batch`).

One policy forward over all rows gives the final hidden states; token log-probs come from full
logits (the naive path) or chunk by chunk from the hidden states and the lm_head weight (the
fused path, :mod:`fire_mpo_core.losses.fused`). The frozen reference is this very model inside
``with reference_weights(model):`` (the adapter off, or round k-1's frozen adapter:
:mod:`fire_mpo_core.training.lora`); with the per-round reference artifact it runs only on the
(v, y+) rows, for the KL positions, else on every row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fire_mpo_core.losses.base import BranchLogps, LossOutput, PreferenceLogps
from fire_mpo_core.losses.config import LossConfig
from fire_mpo_core.losses.fused import FusedBranch, preference_outputs_from_hidden
from fire_mpo_core.losses.naive import (
    kl_per_position,
    preference_outputs_from_logits,
    token_logps,
)
from fire_mpo_core.losses.objectives import build_loss
from fire_mpo_core.models import IGNORE_INDEX
from fire_mpo_core.models.families import ImageFeatures
from fire_mpo_core.training.batching import (
    BranchBatch,
    encode_images,
    forward_hidden,
    hf_model,
    shifted_targets,
)
from fire_mpo_core.training.lora import reference_weights
from fire_mpo_core.training.reference import (
    BranchReference,
    branch_reference_sums,
)
from fire_mpo_core.training.sharding import head_weight


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_reference_counts(batch: BranchBatch, reference: dict[str, BranchReference]) -> None:
    """The artifact must have scored exactly the tokens this batch scores (same tokenizer and
    max_length, same corrupted images)."""
    labels = batch.encoded["labels"]
    for branch, ref in reference.items():
        rows, pairs = batch.present(branch)
        if rows.numel() == 0:
            continue
        ours = (labels[rows] != IGNORE_INDEX).sum(-1)
        theirs = ref.num_tokens.to(ours.device)[pairs]
        if not torch.equal(ours, theirs):
            bad = (ours != theirs).nonzero()[0].item()
            raise ValueError(
                f"reference artifact scored {int(theirs[bad])} tokens of {branch} for pair "
                f"{batch.pair_ids[int(pairs[bad])]!r} but this batch scores {int(ours[bad])}: "
                "it was computed with another max_length, tokenizer or corrupted image"
            )


def _reference_forward(
    model: nn.Module,
    batch: BranchBatch,
    rows: Tensor | None,
    policy_features: list[ImageFeatures | None] | None,
    shared_images: bool,
    vision_adapted: bool,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[Tensor, int, int]:
    """Hidden states of the frozen reference (eval mode, no grad) on ``rows``.

    Returns (hidden [r, W, H], W, image encodes spent)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), reference_weights(model), autocast():
            encodes = 0
            feats = None
            if shared_images:
                if policy_features is not None and not vision_adapted:
                    feats = policy_features  # frozen vision side: identical features
                else:
                    feats = encode_images(model, batch, rows)
                    encodes = sum(f is not None for f in feats)
            hidden, width = forward_hidden(model, batch, rows, feats)
    finally:
        model.train(was_training)
    return hidden, width, encodes


def score_batch(
    model: nn.Module,
    batch: BranchBatch,
    loss_cfg: LossConfig,
    *,
    use_fused: bool,
    chunk_size: int,
    reference: dict[str, BranchReference] | None,
    shared_images: bool = True,
    vision_adapted: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[LossOutput, dict[str, int]]:
    """Per-pair loss and its parts for one branch batch (differentiable w.r.t. the adapter).

    Args:
        model: the peft policy (inside ``reference_weights``: the reference).
        batch: B pairs on the model's device.
        loss_cfg: which loss.
        use_fused: hidden states + chunked lm_head (True) or full logits (False).
        chunk_size: rows per lm_head chunk on the fused path.
        reference: per-branch reference sums for the B pairs (the artifact); None runs the
            reference on every row in-step.
        shared_images: encode each distinct image once (``mm_encoder_outputs``).
        vision_adapted: the vision side carries an adapter (reference image features differ).
        autocast: mixed-precision context factory (``accelerator.autocast``).

    Returns:
        (:class:`~fire_mpo_core.losses.base.LossOutput` with [B] fields, counters
        ``image_encodes`` and ``rows``).
    """
    loss_fn = build_loss(loss_cfg)
    wanted = ["clean_chosen", "clean_rejected"]
    if bool(batch.has_corrupted.any()):
        wanted += [b for b in loss_fn.corrupt_branches if b in batch.branches()]
    if reference is not None:
        _check_reference_counts(batch, {b: reference[b] for b in wanted})
    fw, stats = _forwards(model, batch, loss_fn, reference, shared_images, vision_adapted, autocast)
    if use_fused:
        if reference is None:
            reference = branch_reference_sums(
                model, batch, chunk_size, hidden=(fw.ref_hidden, fw.ref_width)
            )
        out = _fused_outputs(model, batch, loss_cfg, loss_fn, wanted, fw, reference, chunk_size)
    else:
        out = _naive_outputs(model, batch, loss_cfg, loss_fn, wanted, fw, reference, autocast)
    return out, stats


@dataclass
class _Forwards:
    """The policy's last hidden states over every row, the reference's where it ran, and the
    shifted targets every path reads."""

    hidden: Tensor  # [R, W, H]
    labels: Tensor  # [R, W-1], IGNORE_INDEX outside the responses
    spans: Tensor  # [R, W-1] bool, the clinical spans
    cc_rows: Tensor  # rows of (v, y+)
    ref_hidden: Tensor | None  # all rows (no artifact) or the (v, y+) rows (artifact + KL)
    ref_width: int
    reference_on_cc: bool  # ref_hidden holds only the (v, y+) rows


def _forwards(model, batch, loss_fn, reference, shared_images, vision_adapted, autocast):
    """One policy forward over every row; the reference on every row (no artifact) or on the
    (v, y+) rows for the KL (artifact). Returns (:class:`_Forwards`, counters)."""
    all_rows = torch.arange(batch.num_rows, device=batch.row_pair.device)
    stats = {"image_encodes": 0, "rows": batch.num_rows}
    with autocast():
        feats = None
        if shared_images:
            with torch.set_grad_enabled(torch.is_grad_enabled() and vision_adapted):
                feats = encode_images(model, batch)
            stats["image_encodes"] += len(feats)
        hidden, width = forward_hidden(model, batch, None, feats)
    if not shared_images:
        stats["image_encodes"] += batch.num_rows
    labels_all, span_all = shifted_targets(batch, all_rows, width)  # [R, W-1]
    cc_rows = batch.rows["clean_chosen"]
    ref_rows: Tensor | None = None
    if reference is None:
        ref_rows = all_rows
    elif loss_fn.kl_on is not None:
        ref_rows = cc_rows
    ref_hidden, ref_width = None, 0
    if ref_rows is not None:
        ref_hidden, ref_width, enc = _reference_forward(
            model, batch, ref_rows, feats, shared_images, vision_adapted, autocast
        )
        stats["image_encodes"] += enc if shared_images else int(ref_rows.numel())
    fw = _Forwards(
        hidden, labels_all, span_all, cc_rows, ref_hidden, ref_width, reference is not None
    )
    return fw, stats


def _fused_outputs(model, batch, loss_cfg, loss_fn, wanted, fw, reference, chunk_size):
    """Fused path: token log-probs chunk by chunk from the hidden states and the lm_head."""
    head = hf_model(model).get_output_embeddings()
    weight, bias = head_weight(head)  # gathered when sharded (every rank, once per batch)
    if hasattr(head, "base_layer"):
        raise ValueError("use_fused needs a frozen lm_head, but it carries a LoRA adapter")
    h = fw.hidden[:, :-1].to(weight.dtype)
    branches = {}
    for branch in wanted:
        rows, pairs = batch.present(branch)
        lab, sp = fw.labels[rows], fw.spans[rows]
        mask = lab != IGNORE_INDEX
        branches[branch] = FusedBranch(
            hidden=h[rows][mask],
            targets=lab[mask],
            pair_index=pairs.unsqueeze(1).expand_as(lab)[mask],
            span_mask=sp[mask],
            reference_logp=reference[branch].logp,
            reference_span_logp=reference[branch].span_logp,
        )
    ref_kl = None
    if loss_fn.kl_on is not None:
        # Reference states of every response token of (v, y+), in the packing order above.
        lab_cc = fw.labels[fw.cc_rows, : fw.ref_width - 1]
        ref_h = fw.ref_hidden if fw.reference_on_cc else fw.ref_hidden[fw.cc_rows]
        ref_kl = ref_h[:, : fw.ref_width - 1][lab_cc != IGNORE_INDEX].to(weight.dtype)
    return preference_outputs_from_hidden(
        loss_cfg,
        branches,
        weight,
        batch.has_corrupted,
        lm_head_bias=bias,
        reference_kl_hidden=ref_kl,
        chunk_size=chunk_size,
    )


def _naive_outputs(model, batch, loss_cfg, loss_fn, wanted, fw, reference, autocast):
    """Naive path: full logits [R, W-1, V]; the reference from logits too (no artifact) or
    from the artifact's sums with the in-step reference only for the KL."""
    head = hf_model(model).get_output_embeddings()
    with autocast():
        logits = head(fw.hidden)[:, :-1]

    def gather(branch: str) -> tuple[Tensor, Tensor, Tensor]:
        # [B]-shaped view of a branch; pairs without it read their (v, y+) row with no labels.
        r = batch.rows[branch]
        present = r >= 0
        idx = torch.where(present, r, fw.cc_rows)
        lab = fw.labels[idx].masked_fill(~present.unsqueeze(1), IGNORE_INDEX)
        return idx, lab, fw.spans[idx] & present.unsqueeze(1)

    if reference is None:  # the public naive contract, reference logits on every branch
        with torch.no_grad(), reference_weights(model), autocast():  # an adapted head, too
            ref_logits = head(fw.ref_hidden)[:, :-1]
        pol, ref, labs, spans = {}, {}, {}, {}
        for branch in wanted:
            idx, labs[branch], spans[branch] = gather(branch)
            pol[branch], ref[branch] = logits[idx], ref_logits[idx]
        return preference_outputs_from_logits(loss_cfg, pol, ref, labs, spans, batch.has_corrupted)

    logps: dict[str, BranchLogps] = {}
    for branch in wanted:
        idx, lab, sp = gather(branch)
        tok, mask = token_logps(torch.log_softmax(_upcast(logits[idx]), -1), lab)
        logps[branch] = BranchLogps(
            policy=tok.sum(-1),
            reference=reference[branch].logp.to(tok.dtype),
            policy_span=torch.where(sp & mask, tok, torch.zeros_like(tok)).sum(-1),
            reference_span=reference[branch].span_logp.to(tok.dtype),
            num_tokens=mask.sum(-1),
        )
    kl_forward = kl_reverse = None
    if loss_fn.kl_on is not None:
        kl_forward, kl_reverse = _naive_kl(model, head, batch, loss_fn, fw, logits, autocast)
    return loss_fn(
        PreferenceLogps(
            clean_chosen=logps["clean_chosen"],
            clean_rejected=logps["clean_rejected"],
            corrupt_chosen=logps.get("corrupt_chosen"),
            corrupt_rejected=logps.get("corrupt_rejected"),
            has_corrupted=batch.has_corrupted,
            kl_forward=kl_forward,
            kl_reverse=kl_reverse,
        )
    )


def _naive_kl(model, head, batch, loss_fn, fw, logits, autocast) -> tuple[Tensor, Tensor]:
    """Per-pair forward / reverse KL sums over the KL positions of (v, y+), from full logits."""
    n_pairs, device = batch.num_pairs, batch.row_pair.device
    lab_cc = fw.labels[fw.cc_rows, : fw.ref_width - 1]
    sp_cc = fw.spans[fw.cc_rows, : fw.ref_width - 1]
    pos = lab_cc != IGNORE_INDEX
    if loss_fn.kl_on == "spans":
        pos = pos & sp_cc
    pol_lp = torch.log_softmax(_upcast(logits[fw.cc_rows, : fw.ref_width - 1][pos]), -1)
    with torch.no_grad(), reference_weights(model), autocast():
        ref_logits = head(fw.ref_hidden[:, : fw.ref_width - 1][pos])
    fwd, rev = kl_per_position(pol_lp, torch.log_softmax(_upcast(ref_logits), -1))
    pair_index = torch.arange(n_pairs, device=device).unsqueeze(1).expand_as(pos)[pos]
    zeros = fwd.new_zeros(n_pairs)
    return zeros.index_add(0, pair_index, fwd), zeros.index_add(0, pair_index, rev)
