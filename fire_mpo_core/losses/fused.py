"""Fused path: every preference loss from hidden states and the lm_head weight, chunk by chunk.

The naive path (:mod:`fire_mpo_core.losses.naive`) needs [B, T, V] logits per branch, for policy
and reference: at a 150k vocabulary that is over a gigabyte per tensor. This path never builds
them. It takes, per branch, the policy's final hidden states at the response positions only,
packed into rows, and the lm_head weight W [V, H] (+ optional bias b [V]); it walks the rows in
chunks of ``chunk_size``, computing for each chunk the logits z = h W^T + b [chunk, V], their
logsumexp and the target's log-prob, and then drops them. The KL terms need the reference's
distribution only at the KL positions of (clean image, y+) (its span tokens for FiRe-MPO, every
response token for RRPO), so the reference's hidden states are passed for those rows only; the
reference's token log-prob *sums* for the reward terms come precomputed as [B] tensors (the
per-round reference artifact; :func:`reference_logp_sums` computes them the same chunked way).
All branches' rows are concatenated and go through a single chunked pass.

Gradients come from a custom :class:`torch.autograd.Function` so that autograd never keeps a
[chunk, V] tensor alive:

* lm_head weight (or bias) trainable: the function saves only its inputs plus one logsumexp per
  row and, in backward, recomputes each chunk's logits to form dL/dz = g (onehot - softmax) + KL
  parts, then dh = dL/dz W and dW += dL/dz^T h. Peak extra memory O(chunk * V).
* lm_head frozen (the LoRA setting: adapters on the decoder, lm_head untouched): dL/dh for row n
  is g_n * J_n with J_n = d l(n) / d h_n = W[y_n] - softmax(z_n) W (and likewise for the two KL
  values), independent of the upstream gradient g. Forward computes these [N, H] Jacobian rows
  while the chunk's softmax is at hand, so backward is a scaling with no second pass over the
  vocabulary. Same O(chunk * V) peak, about 2/3 of the compute of recomputation.

The reference side (its hidden states, weight and bias) is treated as a constant: no gradient
flows into it, exactly as the naive path detaches the reference logits.

Usage (packing [B, T, H] hidden states whose position t scores ``labels[:, t]``)::

    from fire_mpo_core.losses import LossConfig, preference_loss_from_hidden, pack_branch
    branches = {
        key: pack_branch(hidden[key], labels[key], span_masks[key], ref_sum[key], ref_span[key])
        for key in ("clean_chosen", "clean_rejected", "corrupt_chosen", "corrupt_rejected")
    }
    cc_labels, cc_spans = labels["clean_chosen"], span_masks["clean_chosen"]
    ref_kl_hidden = ref_hidden_clean_chosen[(cc_labels != -100) & cc_spans]   # [N_kl, H]
    loss = preference_loss_from_hidden(cfg, branches, lm_head.weight, has_corrupted,
                                 reference_kl_hidden=ref_kl_hidden)          # Tensor[B]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fire_mpo_core.losses.base import (
    BRANCHES,
    BranchLogps,
    KLPositions,
    LossOutput,
    PreferenceLogps,
    PreferenceLoss,
)
from fire_mpo_core.losses.config import LossConfig
from fire_mpo_core.losses.naive import IGNORE_INDEX
from fire_mpo_core.losses.objectives import build_loss


@dataclass(frozen=True)
class FusedBranch:
    """One branch (image x response) for the fused path, packed by response token.

    Attributes:
        hidden: [N, H] policy final hidden states at the response positions; row n is the state
            that scores ``targets[n]`` (already shifted for a causal LM).
        targets: [N] long token ids.
        pair_index: [N] long in [0, B): the pair each row belongs to.
        span_mask: [N] bool, whether row n is a marked span token of M(y).
        reference_logp: [B] sum over the response tokens of the reference's log-probs.
        reference_span_logp: [B] the same sum over the span tokens only.
    """

    hidden: Tensor
    targets: Tensor
    pair_index: Tensor
    span_mask: Tensor
    reference_logp: Tensor
    reference_span_logp: Tensor


def pack_rows(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the response rows of padded hidden states.

    Args:
        hidden: [B, T, H], position t scores ``labels[:, t]``.
        labels: [B, T] long, -100 at non-response positions.

    Returns:
        (hidden rows [N, H], targets [N], pair_index [N]) in row-major (b, t) order.
    """
    mask = labels != IGNORE_INDEX
    pair = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    return hidden[mask], labels[mask], pair[mask]


def pack_branch(
    hidden: Tensor,
    labels: Tensor,
    span_mask: Tensor,
    reference_logp: Tensor,
    reference_span_logp: Tensor,
) -> FusedBranch:
    """A :class:`FusedBranch` from [B, T, H] hidden states, [B, T] labels and span mask."""
    rows, targets, pair = pack_rows(hidden, labels)
    return FusedBranch(
        hidden=rows,
        targets=targets,
        pair_index=pair,
        span_mask=span_mask[labels != IGNORE_INDEX].to(torch.bool),
        reference_logp=reference_logp,
        reference_span_logp=reference_span_logp,
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax statistics over ~150k entries need at least float32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """z = h W^T + b for one chunk, [c, V], in the accumulation dtype."""
    z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    return z.to(_acc_dtype(z.dtype))


def _softmax_(z: Tensor, normalize: bool) -> Tensor:
    """Row logsumexp of z [c, V], turning z into exp(z - max) in place (softmax if normalize).

    Four passes over the chunk and no [c, V] temporary, where logsumexp + exp would allocate two.
    """
    m = z.amax(dim=-1, keepdim=True)
    total = z.sub_(m).exp_().sum(dim=-1, keepdim=True)
    if normalize:
        z.div_(total)
    return (m + total.log()).squeeze(1)


def _kl_rows(lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
    """Forward KL(q||p) and reverse KL(p||q) per row from log-probs [k, V] -> ([k], [k])."""
    diff = lq - lp
    return (lq.exp() * diff).sum(-1), -(lp.exp() * diff).sum(-1)


def _kl_chunk_rows(kl_rows: Tensor | None, n: int, chunk_size: int) -> list[Tensor | None]:
    """Per chunk, the chunk-local indices of its KL rows (None when it has none).

    Computed once on the host so the chunk loops do not sync with the device on every chunk.
    """
    if kl_rows is None:
        return [None] * len(range(0, n, chunk_size))
    flags = kl_rows.detach().cpu()
    out = []
    for s in range(0, n, chunk_size):
        rows = flags[s : s + chunk_size].nonzero().squeeze(1)
        out.append(rows.to(kl_rows.device) if rows.numel() else None)
    return out


class _FusedLMHeadLogps(torch.autograd.Function):
    """Token log-probs l(n) and, at KL rows, KL(ref||theta), KL(theta||ref) from hidden states.

    Inputs: hidden [N, H], weight [V, H], bias [V] | None, targets [N], kl_rows [N] bool | None,
    ref_hidden [N_kl, H] | None (rows of ``kl_rows`` in order), ref_weight [V, H],
    ref_bias [V] | None, chunk_size int.
    Outputs: logp [N], kl_forward [N], kl_reverse [N] (0 off the KL rows).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, kl_rows, ref_hidden, ref_weight, ref_bias,
                chunk_size):  # fmt: skip
        n, h_dim = hidden.shape
        acc = _acc_dtype(hidden.dtype)
        need_h = ctx.needs_input_grad[0]
        recompute = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        jacobian = need_h and not recompute

        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse_all = torch.empty(n, dtype=acc, device=hidden.device)
        kl_f = torch.zeros(n, dtype=acc, device=hidden.device)
        kl_r = torch.zeros(n, dtype=acc, device=hidden.device)
        chunk_rows = _kl_chunk_rows(kl_rows, n, chunk_size)
        n_kl = sum(r.numel() for r in chunk_rows if r is not None)
        if jacobian:
            jac = torch.empty(n, h_dim, dtype=acc, device=hidden.device)
            jac_f = torch.empty(n_kl, h_dim, dtype=acc, device=hidden.device)
            jac_r = torch.empty(n_kl, h_dim, dtype=acc, device=hidden.device)

        k0 = 0  # running offset into ref_hidden / the packed KL Jacobians
        for s, rows in zip(range(0, n, chunk_size), chunk_rows):
            e = min(s + chunk_size, n)
            z = _logits(hidden[s:e], weight, bias)
            t = targets[s:e]
            z_target = z.gather(1, t.unsqueeze(1)).squeeze(1)
            z_kl = z[rows] if rows is not None else None  # [k, V] copy, before z is overwritten
            lse = _softmax_(z, normalize=jacobian)  # z now holds (unnormalised) probabilities
            logp[s:e] = z_target - lse
            lse_all[s:e] = lse
            if rows is not None:
                k = rows.numel()
                lq = torch.log_softmax(_logits(ref_hidden[k0 : k0 + k], ref_weight, ref_bias), -1)
                lp = z_kl - lse[rows].unsqueeze(1)
                f, r = _kl_rows(lp, lq)
                kl_f[s + rows] = f
                kl_r[s + rows] = r
                if jacobian:
                    # dKL(q||p)/dz = p - q;  dKL(p||q)/dz = p * (log p - log q - KL(p||q)).
                    p = lp.exp()
                    gz = torch.cat([p - lq.exp(), p * (lp - lq - r.unsqueeze(1))])
                    gh = gz.to(weight.dtype) @ weight
                    jac_f[k0 : k0 + k] = gh[:k]
                    jac_r[k0 : k0 + k] = gh[k:]
                k0 += k
            if jacobian:
                # dl/dh = W[y] - softmax(z) W, with z already turned into softmax(z) in place.
                jac[s:e] = weight[t].to(acc) - (z.to(weight.dtype) @ weight).to(acc)
            del z, z_kl

        ctx.jacobian = jacobian
        ctx.hidden_dtype = hidden.dtype
        ctx.recompute = recompute
        ctx.chunk_size = chunk_size
        ctx.chunk_rows = chunk_rows  # index tensors only: no autograd state is kept alive
        if jacobian:
            kl_index = kl_rows.nonzero().squeeze(1) if n_kl else None
            ctx.save_for_backward(jac, jac_f, jac_r, kl_index)
        elif recompute:
            ctx.save_for_backward(
                hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse_all, kl_r
            )
        return logp, kl_f, kl_r

    @staticmethod
    @once_differentiable
    def backward(ctx, g, g_f, g_r):
        none_rest = (None,) * 6  # targets, kl_rows, ref_hidden, ref_weight, ref_bias, chunk_size
        if ctx.jacobian:
            jac, jac_f, jac_r, kl_index = ctx.saved_tensors
            dh = g.unsqueeze(1) * jac
            if kl_index is not None:
                dh.index_add_(
                    0,
                    kl_index,
                    g_f[kl_index].unsqueeze(1) * jac_f + g_r[kl_index].unsqueeze(1) * jac_r,
                )
            return (dh.to(ctx.hidden_dtype), None, None, *none_rest)
        if not ctx.recompute:
            return (None,) * 9

        hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse_all, kl_r = (
            ctx.saved_tensors
        )
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _acc_dtype(hidden.dtype)
        n = hidden.shape[0]
        dh = torch.zeros_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        k0 = 0
        for s, rows in zip(range(0, n, ctx.chunk_size), ctx.chunk_rows):
            e = min(s + ctx.chunk_size, n)
            h = hidden[s:e]
            z = _logits(h, weight, bias)
            lse = lse_all[s:e].unsqueeze(1)
            kl_part = None
            if rows is not None:
                k = rows.numel()
                lq = torch.log_softmax(_logits(ref_hidden[k0 : k0 + k], ref_weight, ref_bias), -1)
                lp = z[rows] - lse[rows]
                p = lp.exp()
                gf, gr, r = (x[s + rows].unsqueeze(1) for x in (g_f, g_r, kl_r))
                kl_part = gf * (p - lq.exp()) + gr * p * (lp - lq - r)
                k0 += k
            # dL/dz = g (onehot(y) - softmax(z)) [+ KL parts], built in place in z's buffer.
            gc = g[s:e].unsqueeze(1)
            gz = z.sub_(lse).exp_().mul_(-gc)
            gz.scatter_add_(1, targets[s:e].unsqueeze(1), gc)
            if kl_part is not None:
                gz.index_add_(0, rows, kl_part)
            gzw = gz.to(weight.dtype)
            if need_h:
                dh[s:e] = (gzw @ weight).to(hidden.dtype)
            if need_w:
                dw.addmm_(gz.t(), h.to(acc))
            if need_b:
                db += gz.sum(0)
            del z, gz, gzw
        return (
            dh,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None,
            *none_rest,
        )


def fused_token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    kl_rows: Tensor | None = None,
    reference_hidden: Tensor | None = None,
    reference_weight: Tensor | None = None,
    reference_bias: Tensor | None = None,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable token log-probs and KL values from hidden states, never building [N, V].

    Args:
        hidden: [N, H] policy hidden states; row n scores ``targets[n]``.
        weight: [V, H] lm_head weight (gradient flows if it requires grad).
        targets: [N] long token ids.
        bias: optional [V] lm_head bias.
        kl_rows: optional [N] bool, rows where the KL against the reference is wanted.
        reference_hidden: [N_kl, H] reference hidden states at the ``kl_rows`` rows in order, or
            [N, H] for all rows (then the ``kl_rows`` rows are taken). Treated as constant.
        reference_weight: [V, H] reference lm_head (default: ``weight``, detached).
        reference_bias: [V] reference bias (default: ``bias`` when ``reference_weight`` is not
            given, else none).
        chunk_size: rows per chunk; peak extra memory ~2-3 * chunk_size * V elements.

    Returns:
        (l(n) = log softmax(z_n)[y_n] [N], KL(ref||theta) [N], KL(theta||ref) [N]); the KL values
        are 0 off ``kl_rows``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] must share H; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N={hidden.shape[0]}]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if reference_weight is None:
        reference_weight = weight
        if reference_bias is None and bias is not None:
            reference_bias = bias
    reference_weight = reference_weight.detach()
    reference_bias = reference_bias.detach() if reference_bias is not None else None
    if kl_rows is not None:
        kl_rows = kl_rows.to(torch.bool)
        n_kl = int(kl_rows.sum())
        if n_kl:
            if reference_hidden is None:
                raise ValueError("kl_rows is set but reference_hidden is missing")
            if reference_hidden.shape[0] == hidden.shape[0] and n_kl != hidden.shape[0]:
                reference_hidden = reference_hidden[kl_rows]
            if reference_hidden.shape != (n_kl, hidden.shape[1]):
                raise ValueError(
                    f"reference_hidden must be [N_kl={n_kl}, H] or [N={hidden.shape[0]}, H]; got "
                    f"{tuple(reference_hidden.shape)}"
                )
            reference_hidden = reference_hidden.detach()
    return _FusedLMHeadLogps.apply(
        hidden, weight, bias, targets, kl_rows, reference_hidden, reference_weight,
        reference_bias, chunk_size,
    )  # fmt: skip


@torch.no_grad()
def reference_logp_sums(
    hidden: Tensor,
    targets: Tensor,
    pair_index: Tensor,
    span_mask: Tensor,
    num_pairs: int,
    weight: Tensor,
    bias: Tensor | None = None,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Per-pair reference log-prob sums (the per-round artifact), chunked, without gradients.

    Args:
        hidden: [N, H] reference hidden states at the response rows (see :class:`FusedBranch`).
        targets, pair_index, span_mask: [N] as in :class:`FusedBranch`.
        num_pairs: B.
        weight, bias: the reference lm_head.

    Returns:
        (sum over response tokens [B], sum over span tokens [B]).
    """
    logp, _, _ = fused_token_stats(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
    return _pair_sums(logp, pair_index, span_mask.to(torch.bool), num_pairs)


def _pair_sums(values: Tensor, pair_index: Tensor, span: Tensor, num_pairs: int):
    zeros = values.new_zeros(num_pairs)
    full = zeros.index_add(0, pair_index, values)
    spans = zeros.index_add(0, pair_index, torch.where(span, values, torch.zeros_like(values)))
    return full, spans


def preference_logps_from_hidden(
    loss_fn: PreferenceLoss,
    branches: Mapping[str, FusedBranch],
    lm_head_weight: Tensor,
    has_corrupted: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    reference_kl_hidden: Tensor | None = None,
    reference_lm_head_weight: Tensor | None = None,
    reference_lm_head_bias: Tensor | None = None,
    chunk_size: int = 256,
) -> PreferenceLogps:
    """:class:`PreferenceLogps` for ``loss_fn`` from packed hidden states (see the module doc).

    Scores the two clean branches, the corrupt ones in ``loss_fn.corrupt_branches`` when some
    pair has v', and the KL of ``loss_fn.kl_on`` on ``clean_chosen``: its span rows ("spans") or
    all its rows ("all"); ``reference_kl_hidden`` holds the reference's hidden states at those
    rows ([N_kl, H]) or at all rows of ``clean_chosen`` ([N, H]).
    """
    num_pairs = has_corrupted.shape[0]
    wanted = _wanted_branches(loss_fn, branches, has_corrupted, reference_kl_hidden)
    kl_on: KLPositions | None = loss_fn.kl_on
    # All branches go through ONE chunked pass (their rows concatenated, clean_chosen first): one
    # autograd node, hence a single [V, H] lm_head gradient buffer when the lm_head is trained.
    spans = [branches[key].span_mask.to(torch.bool) for key in wanted]
    kl_rows, ref_kl = _kl_selection(kl_on, spans, reference_kl_hidden)
    logp_all, kl_f, kl_r = fused_token_stats(
        torch.cat([branches[key].hidden for key in wanted]),
        lm_head_weight,
        torch.cat([branches[key].targets for key in wanted]),
        bias=lm_head_bias,
        kl_rows=kl_rows,
        reference_hidden=ref_kl,
        reference_weight=reference_lm_head_weight,
        reference_bias=reference_lm_head_bias,
        chunk_size=chunk_size,
    )
    sizes = [sp.numel() for sp in spans]
    out = {
        key: _branch_logps(branches[key], span, logp, num_pairs)
        for key, span, logp in zip(wanted, spans, logp_all.split(sizes))
    }
    kl_forward = kl_reverse = None
    if kl_on is not None:
        cc_pairs = branches["clean_chosen"].pair_index
        zeros = logp_all.new_zeros(num_pairs)
        kl_forward = zeros.index_add(0, cc_pairs, kl_f[: sizes[0]])
        kl_reverse = zeros.index_add(0, cc_pairs, kl_r[: sizes[0]])
    return PreferenceLogps(
        clean_chosen=out["clean_chosen"],
        clean_rejected=out["clean_rejected"],
        corrupt_chosen=out.get("corrupt_chosen"),
        corrupt_rejected=out.get("corrupt_rejected"),
        has_corrupted=has_corrupted.to(torch.bool),
        kl_forward=kl_forward,
        kl_reverse=kl_reverse,
    )


def _wanted_branches(
    loss_fn: PreferenceLoss,
    branches: Mapping[str, FusedBranch],
    has_corrupted: Tensor,
    reference_kl_hidden: Tensor | None,
) -> list[str]:
    """The branches ``loss_fn`` reads (the clean two, its corrupt ones when some pair has v'),
    clean_chosen first; raises when one is missing or unknown, or the KL's reference is."""
    unknown = set(branches) - set(BRANCHES)
    if unknown:
        raise ValueError(f"unknown branches {sorted(unknown)}; expected some of {BRANCHES}")
    wanted = ["clean_chosen", "clean_rejected"]
    if bool(has_corrupted.any()):
        wanted += list(loss_fn.corrupt_branches)
    missing = [key for key in wanted if key not in branches]
    if missing:
        raise ValueError(f"{type(loss_fn).__name__} needs branches {missing}")
    if loss_fn.kl_on is not None and reference_kl_hidden is None:
        raise ValueError(
            f"{type(loss_fn).__name__} has a KL term on {loss_fn.kl_on!r} tokens of y+: pass "
            "reference_kl_hidden (the reference's hidden states at those rows)"
        )
    return wanted


def _kl_selection(
    kl_on: KLPositions | None, spans: list[Tensor], reference_kl_hidden: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """The rows of the concatenated branches that get a KL (clean_chosen's span rows, or all
    its rows; none of the other branches), and the reference's hidden states at those rows
    (``reference_kl_hidden`` may hold every row of clean_chosen: then they are selected)."""
    if kl_on is None:
        return None, None
    cc_kl = spans[0] if kl_on == "spans" else torch.ones_like(spans[0])
    ref_kl = reference_kl_hidden
    n_cc, n_kl = cc_kl.numel(), int(cc_kl.sum())
    if ref_kl.shape[0] == n_cc and n_kl != n_cc:  # given for every row of clean_chosen
        ref_kl = ref_kl[cc_kl]
    return torch.cat([cc_kl, *(torch.zeros_like(sp) for sp in spans[1:])]), ref_kl


def _branch_logps(br: FusedBranch, span: Tensor, logp: Tensor, num_pairs: int) -> BranchLogps:
    """One branch's per-pair policy sums (all tokens, span tokens) beside its reference sums."""
    policy, policy_span = _pair_sums(logp, br.pair_index, span, num_pairs)
    return BranchLogps(
        policy=policy,
        reference=br.reference_logp.to(logp.dtype),
        policy_span=policy_span,
        reference_span=br.reference_span_logp.to(logp.dtype),
        num_tokens=torch.bincount(br.pair_index, minlength=num_pairs),
    )


def preference_outputs_from_hidden(
    cfg: LossConfig,
    branches: Mapping[str, FusedBranch],
    lm_head_weight: Tensor,
    has_corrupted: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    reference_kl_hidden: Tensor | None = None,
    reference_lm_head_weight: Tensor | None = None,
    reference_lm_head_bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """The loss named by ``cfg`` with its logging parts, from hidden states (fields [B])."""
    loss_fn = build_loss(cfg)
    logps = preference_logps_from_hidden(
        loss_fn,
        branches,
        lm_head_weight,
        has_corrupted,
        lm_head_bias=lm_head_bias,
        reference_kl_hidden=reference_kl_hidden,
        reference_lm_head_weight=reference_lm_head_weight,
        reference_lm_head_bias=reference_lm_head_bias,
        chunk_size=chunk_size or cfg.chunk_size,
    )
    return loss_fn(logps)


def preference_loss_from_hidden(
    cfg: LossConfig,
    branches: Mapping[str, FusedBranch],
    lm_head_weight: Tensor,
    has_corrupted: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    reference_kl_hidden: Tensor | None = None,
    reference_lm_head_weight: Tensor | None = None,
    reference_lm_head_bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-pair loss [B], equal to :func:`~fire_mpo_core.losses.naive.preference_loss_from_logits`
    on the logits h W^T + b, at O(chunk_size * V) memory.

    Args:
        cfg: the loss and its coefficients (``cfg.chunk_size`` unless ``chunk_size`` is given).
        branches: branch name -> :class:`FusedBranch`; corrupt ones may be missing when no pair
            has v' or the loss has no visual term.
        lm_head_weight: [V, H] policy lm_head weight.
        has_corrupted: [B] bool.
        lm_head_bias: optional [V].
        reference_kl_hidden: reference hidden states at the KL rows of ``clean_chosen``
            ([N_kl, H]) or at all its rows ([N, H]); needed by rrpo and fire_mpo.
        reference_lm_head_weight, reference_lm_head_bias: the reference's lm_head when it differs
            (default: the policy's, detached).
    """
    return preference_outputs_from_hidden(
        cfg,
        branches,
        lm_head_weight,
        has_corrupted,
        lm_head_bias=lm_head_bias,
        reference_kl_hidden=reference_kl_hidden,
        reference_lm_head_weight=reference_lm_head_weight,
        reference_lm_head_bias=reference_lm_head_bias,
        chunk_size=chunk_size,
    ).loss
