"""FiRe-MPO preference training: a LoRA adapter on the policy, trained on minimal-edit pairs.

One optimizer step (docs/design.md section 1):

1. B pairs become one padded batch of up to 4B rows, the branches (v, y+), (v, y-), (v', y+),
   (v', y-) (:mod:`fire_mpo_core.training.batching`); each distinct image is encoded once.
2. One policy forward over all rows gives the final hidden states; token log-probs l_theta(t)
   come from full logits (naive path) or chunk by chunk from the hidden states and the lm_head
   weight (``use_fused``, :mod:`fire_mpo_core.losses.fused`).
3. Reference terms: sum_{t in y} l_ref(t) and sum_{t in M(y)} l_ref(t) per branch come from the
   per-round artifact (:mod:`fire_mpo_core.training.reference`); the frozen reference (this very
   model inside ``with model.disable_adapter():``, no second copy) runs in-step only on the
   (v, y+) rows, for the KL positions. Without the artifact it runs on every row.
4. The loss of ``cfg.loss`` (per pair, then the mean), backward, gradient accumulation over
   ``grad_accum`` forwards, clipping, AdamW, cosine schedule with warmup.

Usage::

    from fire_mpo_core.training.preference import train_preference
    result = train_preference(policy, pairs_path, image_root, corrupt_root, reference_path,
                              TrainConfig(), out_dir, on_step=lambda s, n, m: print(s, n))
    write_policy(stage_dir, PolicyRef(**result["policy"]))   # the caller writes policy.json

Outputs under ``out_dir``: ``adapter/`` (peft ``save_pretrained``, safetensors),
``metrics.jsonl`` and ``tensorboard/`` every ``logging_every`` steps, ``checkpoints/step-N/``
every ``save_every`` steps while training (removed after a successful finish), ``merged/`` when
``merge_adapter``. A run stopped at any point and started again with the same arguments resumes
from its newest checkpoint and ends with the same adapter, bit for bit, as one that never stopped.

Data parallel: started by ``accelerate launch`` in N processes (``TrainConfig.num_processes``;
:mod:`fire_mpo_core.training.launch` does the launching), every rank draws the same global
micro-batch of ``batch_size`` pairs, scores its contiguous share, and the LoRA gradients are
summed across ranks once per optimizer step (:mod:`fire_mpo_core.training.distributed`), so the
update is the one a single process makes on the whole batch, up to float summation order. Rank
0 alone writes metrics, checkpoints, the adapter and the merged model; dropout is seeded per
(step, rank), so a resumed N-process run also matches its uninterrupted self bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import get_cosine_schedule_with_warmup

from fire_mpo_core.data.records import PreferencePair
from fire_mpo_core.losses.base import BranchLogps, LossOutput, PreferenceLogps, PreferenceLoss
from fire_mpo_core.losses.config import LossConfig
from fire_mpo_core.losses.fused import FusedBranch, preference_outputs_from_hidden
from fire_mpo_core.losses.naive import (
    kl_per_position,
    preference_outputs_from_logits,
    token_logps,
)
from fire_mpo_core.losses.objectives import build_loss
from fire_mpo_core.models import IGNORE_INDEX, load_model, load_processor
from fire_mpo_core.models.families import ImageFeatures, family_of
from fire_mpo_core.policy import PolicyRef, make_adapter_relocatable
from fire_mpo_core.training.batching import (
    BranchBatch,
    ImageCache,
    build_branch_batch,
    encode_images,
    forward_hidden,
    hf_model,
    length_grouped_permutation,
    load_pairs,
    pair_length,
    shifted_targets,
    supports_shared_images,
)
from fire_mpo_core.training.checkpoint import (
    CHECKPOINTS,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fire_mpo_core.training.config import LoRAConfig, ReferenceConfig, TrainConfig
from fire_mpo_core.training.distributed import (
    DistInfo,
    barrier,
    gather_sums,
    rank_share,
    step_seed,
    sum_gradients,
)
from fire_mpo_core.training.reference import (
    BranchReference,
    ReferenceTable,
    branch_reference_sums,
    compute_reference_logprobs,
)
from fire_mpo_core.training.sharding import head_weight

__all__ = [
    "attach_lora",
    "language_model_prefix",
    "lora_target_modules",
    "score_batch",
    "train_preference",
]

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
METRICS_FILE = "metrics.jsonl"
StepCallback = Callable[[int, int, dict[str, float]], None]


# --------------------------------------------------------------------------- LoRA


def language_model_prefix(model: nn.Module) -> str | None:
    """Module name of the language model inside an image-text-to-text model: its family's
    :attr:`~fire_mpo_core.models.families.Family.language_model` (``model.language_model``,
    Idefics3's ``model.text_model``), or None for a model of no known family."""
    hf = hf_model(model)
    try:
        prefix = family_of(hf).language_model
    except ValueError:
        return None
    try:
        hf.get_submodule(prefix)
    except AttributeError:
        return None
    return prefix


def lora_target_modules(model: nn.Module, lora: LoRAConfig) -> str | list[str]:
    """peft ``target_modules`` for ``lora``: the config's value for scope 'all'; for scope
    'language_model' a regex (peft full-matches it against module names) that admits only the
    chosen linear layers inside the language model, so the vision tower and projector get none.
    """
    if lora.scope == "all":
        return lora.target_modules
    prefix = language_model_prefix(model)
    if prefix is None:
        raise ValueError(
            f"lora.scope='language_model' but {type(model).__name__} has no recognisable "
            "language_model submodule; set lora.scope='all' and list target_modules"
        )
    if lora.target_modules == "all-linear":
        lm = hf_model(model).get_submodule(prefix)
        linear = (n for n, m in lm.named_modules() if isinstance(m, nn.Linear))
        names = sorted({n.rsplit(".", 1)[-1] for n in linear})
    else:
        names = list(lora.target_modules)
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"{re.escape(prefix)}\.(?:.*\.)?(?:{alternatives})"


def attach_lora(model: nn.Module, policy: PolicyRef, lora: LoRAConfig) -> PeftModel:
    """Wrap ``model`` (the loaded ``policy.base``) with a trainable LoRA adapter: a new one from
    ``lora``, or ``policy.adapter`` loaded trainable when set (round k > 1; ``lora`` is then
    ignored in favour of the adapter's own config)."""
    if policy.adapter:
        return PeftModel.from_pretrained(model, policy.adapter, is_trainable=True)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_modules(model, lora),
        bias="none",
    )
    return get_peft_model(model, config)


def adapted_modules(model: nn.Module) -> list[str]:
    """Names (relative to the transformers model) of the modules that carry a LoRA adapter."""
    hf = hf_model(model)
    return sorted(n for n, m in hf.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))


def _vision_adapted(model: nn.Module) -> bool:
    """Whether any adapter lies outside the language model (then image features differ between
    policy and reference and must be recomputed with the adapter off)."""
    prefix = language_model_prefix(model)
    names = adapted_modules(model)
    if prefix is None:
        return bool(names)
    return any(not n.startswith(prefix + ".") for n in names)


# --------------------------------------------------------------------------- scoring


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
    """Hidden states of the frozen reference (adapter off, eval mode, no grad) on ``rows``.

    Returns (hidden [r, W, H], W, image encodes spent)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter(), autocast():
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
        model: the peft policy (its adapter off = the reference).
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
    hf = hf_model(model)
    head = hf.get_output_embeddings()
    weight, bias = head_weight(head)  # gathered when sharded (every rank, once per batch)
    n_pairs, device = batch.num_pairs, batch.row_pair.device
    all_rows = torch.arange(batch.num_rows, device=device)
    cc_rows = batch.rows["clean_chosen"]
    stats = {"image_encodes": 0, "rows": batch.num_rows}

    # --- policy: one forward over every row
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

    # --- reference: all rows (no artifact) or the (v, y+) rows for the KL (artifact)
    ref_hidden = None
    ref_rows: Tensor | None = None
    reference_on_cc = reference is not None  # in-step reference only on the (v, y+) rows
    if reference is None:
        ref_rows = all_rows
    elif loss_fn.kl_on is not None:
        ref_rows = cc_rows
    if ref_rows is not None:
        ref_hidden, ref_width, enc = _reference_forward(
            model, batch, ref_rows, feats, shared_images, vision_adapted, autocast
        )
        stats["image_encodes"] += enc if shared_images else int(ref_rows.numel())
    if reference is None and use_fused:
        reference = branch_reference_sums(model, batch, chunk_size, hidden=(ref_hidden, ref_width))

    if use_fused:
        if hasattr(head, "base_layer"):
            raise ValueError("use_fused needs a frozen lm_head, but it carries a LoRA adapter")
        h = hidden[:, :-1].to(weight.dtype)
        branches = {}
        for branch in wanted:
            rows, pairs = batch.present(branch)
            lab, sp = labels_all[rows], span_all[rows]
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
            lab_cc = labels_all[cc_rows, : ref_width - 1]
            ref_h = ref_hidden if reference_on_cc else ref_hidden[cc_rows]
            ref_kl = ref_h[:, : ref_width - 1][lab_cc != IGNORE_INDEX].to(weight.dtype)
        out = preference_outputs_from_hidden(
            loss_cfg,
            branches,
            weight,
            batch.has_corrupted,
            lm_head_bias=bias,
            reference_kl_hidden=ref_kl,
            chunk_size=chunk_size,
        )
        return out, stats

    # --- naive path: full logits [R, W-1, V]
    with autocast():
        logits = head(hidden)[:, :-1]

    def gather(branch: str) -> tuple[Tensor, Tensor, Tensor]:
        # [B]-shaped view of a branch; pairs without it read their (v, y+) row with no labels.
        r = batch.rows[branch]
        present = r >= 0
        idx = torch.where(present, r, cc_rows)
        lab = labels_all[idx].masked_fill(~present.unsqueeze(1), IGNORE_INDEX)
        return idx, lab, span_all[idx] & present.unsqueeze(1)

    if reference is None:  # the public naive contract, reference logits on every branch
        with torch.no_grad(), model.disable_adapter(), autocast():  # an adapted head, too
            ref_logits = head(ref_hidden)[:, :-1]
        pol, ref, labs, spans = {}, {}, {}, {}
        for branch in wanted:
            idx, labs[branch], spans[branch] = gather(branch)
            pol[branch], ref[branch] = logits[idx], ref_logits[idx]
        out = preference_outputs_from_logits(loss_cfg, pol, ref, labs, spans, batch.has_corrupted)
        return out, stats

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
        lab_cc, sp_cc = labels_all[cc_rows, : ref_width - 1], span_all[cc_rows, : ref_width - 1]
        pos = lab_cc != IGNORE_INDEX
        if loss_fn.kl_on == "spans":
            pos = pos & sp_cc
        pol_lp = torch.log_softmax(_upcast(logits[cc_rows, : ref_width - 1][pos]), -1)
        with torch.no_grad(), model.disable_adapter(), autocast():
            ref_logits = head(ref_hidden[:, : ref_width - 1][pos])
        fwd, rev = kl_per_position(pol_lp, torch.log_softmax(_upcast(ref_logits), -1))
        pair_index = torch.arange(n_pairs, device=device).unsqueeze(1).expand_as(pos)[pos]
        zeros = fwd.new_zeros(n_pairs)
        kl_forward = zeros.index_add(0, pair_index, fwd)
        kl_reverse = zeros.index_add(0, pair_index, rev)
    out = loss_fn(
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
    return out, stats


# --------------------------------------------------------------------------- metrics


class _Meter:
    """Pair-weighted means over the micro-batches of a step (visual terms over active pairs)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, key: str, values: Tensor, weight_mask: Tensor | None = None) -> None:
        values = values.detach().float()
        if weight_mask is not None:
            values = values[weight_mask]
        self.sums[key] = self.sums.get(key, 0.0) + float(values.sum())
        self.weights[key] = self.weights.get(key, 0.0) + values.numel()

    def add_output(self, loss_fn: PreferenceLoss, out: LossOutput) -> None:
        self.add("loss", out.loss)
        self.add("rewards/chosen", out.chosen_rewards)
        self.add("rewards/rejected", out.rejected_rewards)
        self.add("rewards/margin", out.margins)
        self.add("rewards/accuracy", (out.margins > 0).float())
        self.add("kl/forward", out.kl_forward)
        self.add("kl/reverse", out.kl_reverse)
        self.add("nll", out.nll)
        self.add("visual/active_fraction", out.visual_active.float())
        self.add("visual/margin", out.visual_margin, out.visual_active)
        self.add("loss/visual", -F.logsigmoid(out.visual_margin), out.visual_active)
        for key, values in loss_fn.logged_terms(out).items():
            self.add(key, values)

    def merge(self, world: DistInfo) -> None:
        """Replace this rank's sums and weights by those of all ranks (every rank calls it)."""
        merged = gather_sums(
            {
                **{f"s:{k}": v for k, v in self.sums.items()},
                **{f"w:{k}": v for k, v in self.weights.items()},
            },
            world,
        )
        self.sums = {k[2:]: v for k, v in merged.items() if k.startswith("s:")}
        self.weights = {k[2:]: v for k, v in merged.items() if k.startswith("w:")}

    def means(self) -> dict[str, float]:
        return {k: (self.sums[k] / w if w else 0.0) for k, w in self.weights.items()}


# --------------------------------------------------------------------------- training


def _accelerator(dtype: str) -> Accelerator:
    mixed = "bf16" if dtype == "bfloat16" else "no"
    try:
        return Accelerator(mixed_precision=mixed)
    except ValueError:
        # AcceleratorState is a process-wide singleton fixed by the first Accelerator; a worker
        # that trains float32 then bf16 (ablations) must reset it to change precision.
        AcceleratorState._reset_state()
        return Accelerator(mixed_precision=mixed)


def _digest(cfg: TrainConfig, policy: PolicyRef, pairs: Sequence[PreferencePair]) -> str:
    """What a checkpoint's continuation depends on; bookkeeping fields are left out."""
    bookkeeping = {"save_every", "keep_checkpoints", "resume", "logging_every", "merge_adapter"}
    payload = {
        "cfg": cfg.model_dump(mode="json", exclude=bookkeeping),
        "policy": policy.model_dump(mode="json"),
        "pairs": [p.id for p in pairs],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _longest_batch_first(perm: list[int], lengths: Sequence[int], batch_size: int) -> list[int]:
    """``perm`` with its longest ``batch_size`` slice (by its longest item) swapped to the front.

    Each micro-batch pads to its own longest row, so the step memory follows the batch's
    length: with the longest batch first, step 1 reaches the epoch's peak, an out-of-memory
    shows at once, and no later step needs more memory than step 1 left resident (measured:
    a random first batch made the step memory grow above step 1 whenever a longer batch came
    later). The other batches keep their random order."""
    batches = [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return [i for b in batches for i in b]


class _DataOrder:
    """Micro-batch k of an endless stream of seeded epoch permutations (no state to save)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        longest_first: Sequence[int] | None = None,
    ) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self.lengths = lengths  # set: length-grouped epochs (less padding per micro-batch)
        self.longest_first = longest_first  # set: a random epoch starts with its longest batch
        self._perms: dict[int, list[int]] = {}

    def micro_batch(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if self.lengths is not None:
                perm = length_grouped_permutation(self.lengths, self.batch_size, g)
            else:
                perm = torch.randperm(self.n, generator=g).tolist()
                if self.longest_first is not None:
                    perm = _longest_batch_first(perm, self.longest_first, self.batch_size)
            self._perms = {epoch: perm}
        return self._perms[epoch][j * self.batch_size : (j + 1) * self.batch_size]


def _total_steps(cfg: TrainConfig, order: _DataOrder) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    micro = math.ceil(cfg.epochs * order.per_epoch)
    return max(1, math.ceil(micro / cfg.grad_accum))


def _load_reference(
    reference_path: str | Path | None,
    policy: PolicyRef,
    pairs: list[PreferencePair],
    image_root: Path,
    corrupt_root: Path,
    cfg: TrainConfig,
    out_dir: Path,
) -> ReferenceTable:
    if reference_path is None:
        world = DistInfo.current()
        if world.is_main:  # one rank computes the artifact, the others wait and read it
            compute_reference_logprobs(
                policy,
                pairs,
                image_root,
                corrupt_root,
                ReferenceConfig.for_training(cfg),
                out_dir / "reference",
            )
        barrier(world)
        reference_path = out_dir / "reference"
    table = ReferenceTable.load(reference_path)
    if table.max_length != cfg.max_length:
        raise ValueError(
            f"reference artifact max_length={table.max_length} differs from the trainer's "
            f"max_length={cfg.max_length}; recompute it with ReferenceConfig.for_training(cfg)"
        )
    return table


def train_preference(
    policy: PolicyRef,
    pairs_path: str | Path,
    image_root: str | Path,
    corrupt_root: str | Path | None,
    reference_path: str | Path | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter on the pairs with ``cfg.loss``; see the module docstring.

    Args:
        policy: base model (and, round k > 1, the adapter to continue training).
        pairs_path: the pairs' ``data.jsonl`` (or its folder). Invalid pairs (empty or
            out-of-range spans, missing images) are skipped and listed in ``rejects``.
        image_root: folder the pairs' ``image`` paths are relative to.
        corrupt_root: folder the ``corrupted_image`` paths are relative to; None: the folder of
            ``pairs_path``.
        reference_path: the reference artifact (``reference.safetensors`` or its folder); None
            with ``cfg.use_reference_artifact`` computes it into ``out_dir/reference``. Unused
            when ``cfg.use_reference_artifact`` is False.
        cfg: the training config.
        out_dir: output folder (created); a resumable run's checkpoints live here.
        on_step: optional progress callback ``on_step(step, total_steps, step_metrics)``.

    Returns:
        ``policy`` (a :class:`~fire_mpo_core.policy.PolicyRef` dict: base + absolute adapter
        path), ``merged`` (path or None), ``steps``, ``pairs``, ``pairs_with_corrupted``,
        ``rejects`` (list of {id, reason}), ``resumed_from_step``, ``final_metrics`` (the last
        logged line), ``seconds``, ``steps_per_s``, ``pairs_per_s``,
        ``image_encodes_per_pair_step``, ``trainable_parameters``, ``adapted_modules``.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs_path, image_root = Path(pairs_path), Path(image_root)
    if corrupt_root is None:
        corrupt_root = pairs_path if pairs_path.is_dir() else pairs_path.parent
    corrupt_root = Path(corrupt_root)
    rejects: list[dict[str, str]] = []
    pairs = load_pairs(
        pairs_path,
        on_reject=lambda i, r: rejects.append({"id": i, "reason": r}),
        image_root=image_root,
        corrupt_root=corrupt_root,
        visual_gate=cfg.loss.visual_gate,
    )
    if not pairs:
        raise ValueError(f"no trainable pairs in {pairs_path} ({len(rejects)} rejected)")

    accelerator = _accelerator(cfg.dtype)
    world = DistInfo.current()
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise NotImplementedError(
            f"accelerate distributed_type {accelerator.distributed_type.name} is not supported: "
            "the trainer calls the vision tower, the decoder and the lm_head itself; launch with "
            "a MULTI_GPU config (configs/accelerate/ddp_gpu.yaml) and set train.strategy: fsdp "
            "to shard the model (configs/accelerate/fsdp_gpu.yaml)"
        )
    if world.size != accelerator.num_processes:
        raise RuntimeError(
            f"accelerate sees {accelerator.num_processes} processes but the torch process group "
            f"has {world.size}"
        )
    processor = load_processor(policy.base, trust_remote_code=policy.trust_remote_code)
    base = load_model(
        policy.base,
        dtype=cfg.dtype,
        device=str(accelerator.device),
        trust_remote_code=policy.trust_remote_code,
    )
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.seed)  # the LoRA init is the first random draw
    model = attach_lora(base, policy, cfg.lora)
    model.train()
    vision_adapted = _vision_adapted(model)
    sharded = cfg.strategy == "fsdp" and world.active
    if sharded:  # FSDP2 units over the frozen base and the adapter (training/sharding.py)
        from fire_mpo_core.training import sharding

        sharding.shard_model(model)
    shared_images = supports_shared_images(model)
    loss_fn = build_loss(cfg.loss)
    use_corrupted = bool(loss_fn.corrupt_branches)
    table = None
    if cfg.use_reference_artifact:
        table = _load_reference(
            reference_path, policy, pairs, image_root, corrupt_root, cfg, out_dir
        )

    params = [p for p in model.parameters() if p.requires_grad]
    lengths = [pair_length(p) for p in pairs]
    order = _DataOrder(
        len(pairs),
        cfg.batch_size,
        cfg.seed,
        lengths if cfg.group_by_length else None,
        longest_first=lengths,
    )
    total = _total_steps(cfg, order)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total), total)
    if not world.active:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # Several processes: no prepare(). DDP would only sync gradients of forwards through its
    # own forward (we call submodules), and accelerate's scheduler wrapper steps N times a step.
    device = accelerator.device
    digest = _digest(cfg, policy, pairs)

    start = 0
    resumed_from = None
    ckpt = latest_checkpoint(out_dir) if cfg.resume else None
    if not cfg.resume:
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    if ckpt is not None:
        state = load_checkpoint(
            ckpt,
            accelerator.unwrap_model(model),
            optimizer,
            scheduler,
            load_model_and_optimizer=not sharded,
        )
        if sharded:  # each rank its own shard of the adapter and the optimizer state
            sharding.load_rank_state(ckpt, world.rank, model, optimizer)
        if state["digest"] != digest:
            raise ValueError(
                f"checkpoint {ckpt} belongs to another config, policy or pair set; remove "
                f"{out_dir / CHECKPOINTS} or set resume=False"
            )
        start = resumed_from = int(state["step"])

    metrics_path = out_dir / METRICS_FILE
    writer: Any = _NullWriter()
    if world.is_main:  # rank 0 alone writes metrics, TensorBoard, checkpoints and the adapter
        kept = []
        if resumed_from is not None and metrics_path.is_file():
            lines = metrics_path.read_text().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= start]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))

        from torch.utils.tensorboard import SummaryWriter  # tensorboard: optional at import

        writer = SummaryWriter(
            str(out_dir / "tensorboard"),
            purge_step=start + 1 if resumed_from is not None else None,
        )
    images = ImageCache(image_root, corrupt_root)
    window: list[dict[str, float]] = []
    final_metrics: dict[str, float] = {}
    train_seconds = 0.0
    pairs_done = encodes_done = 0
    try:
        loss_fn = build_loss(cfg.loss)  # what the meter logs comes from the loss itself
        for step in range(start, total):
            t0 = time.perf_counter()
            ks = range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum)
            global_micro = [order.micro_batch(k) for k in ks]
            n_step = sum(len(m) for m in global_micro)  # global pairs of the step, all ranks
            micro = global_micro
            if world.active:
                micro = [rank_share(m, world.rank, world.size) for m in global_micro]
                torch.manual_seed(step_seed(cfg.seed, step, world.rank))
            optimizer.zero_grad(set_to_none=True)
            meter = _Meter()
            encodes = 0
            for j, idx in enumerate(micro):
                weight = 1.0
                if not idx:  # a global micro-batch smaller than the world leaves a rank idle
                    if not sharded:
                        continue
                    # Sharded: every rank runs every forward (the units gather together).
                    idx, weight = global_micro[j][:1], 0.0
                chunk = [pairs[i] for i in idx]
                batch = build_branch_batch(
                    processor, chunk, images, cfg.max_length, use_corrupted=use_corrupted
                ).to(device)
                ref = None
                if table is not None:
                    ref = {k: v.to(device) for k, v in table.lookup(batch.pair_ids).items()}
                out, stats = score_batch(
                    model,
                    batch,
                    cfg.loss,
                    use_fused=cfg.use_fused,
                    chunk_size=cfg.effective_chunk_size,
                    reference=ref,
                    shared_images=shared_images,
                    vision_adapted=vision_adapted,
                    autocast=accelerator.autocast,
                )
                # Sum over the step's pairs / their count: every pair weighs the same.
                if sharded:
                    weight *= sharding.loss_scale(world.size)
                accelerator.backward(out.loss.sum() * weight / n_step)
                if weight:
                    meter.add_output(loss_fn, out)
                    encodes += stats["image_encodes"]
            if world.active:
                if not sharded:  # FSDP2 reduce-scattered the gradients in the backward
                    sum_gradients(params, world)  # every rank holds the global-batch gradient
                meter.merge(world)
                encodes = int(gather_sums({"e": float(encodes)}, world)["e"])
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under sharding
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            scheduler.step()
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            pairs_done += n_step
            encodes_done += encodes
            metrics = meter.means()
            metrics.update(
                {
                    "grad_norm": float(grad_norm),
                    "lr": scheduler.get_last_lr()[0],
                    "pairs_per_s": n_step / seconds,
                    "steps_per_s": 1.0 / seconds,
                    "images/encodes_per_pair": encodes / n_step,
                    "epoch": (step + 1) * cfg.grad_accum / order.per_epoch,
                }
            )
            window.append(metrics)
            done = step + 1
            if done % cfg.logging_every == 0 or done == total:
                final_metrics = _log(metrics_path, writer, done, window, write=world.is_main)
                window = []
            if cfg.save_every and done % cfg.save_every == 0 and done < total:
                shards = full = None
                if sharded:  # every rank: its shard to a side folder, the full adapter gathered
                    shards = out_dir / CHECKPOINTS / f".shards-step-{done}"
                    sharding.save_rank_state(shards, world.rank, model, optimizer)
                    full = sharding.full_adapter_state(model)
                    barrier(world)
                if world.is_main:  # adapter and optimizer are identical on every rank (DDP)
                    save_checkpoint(
                        out_dir,
                        done,
                        accelerator.unwrap_model(model),
                        optimizer,
                        scheduler,
                        {
                            "step": done,
                            "micro_batches_done": done * cfg.grad_accum,
                            "digest": digest,
                            "num_processes": world.size,
                            "strategy": cfg.strategy,
                        },
                        keep=cfg.keep_checkpoints,
                        adapter_state=None if full is None else _peft_state(model, full),
                        optimizer_state=None if not sharded else {"sharded": True},
                        extra_dir=shards,
                    )
                barrier(world)  # no rank runs ahead of a checkpoint that may not exist yet
            if on_step is not None:
                on_step(done, total, metrics)
    finally:
        writer.close()

    peft_model = accelerator.unwrap_model(model)
    adapter_dir = out_dir / ADAPTER_DIR
    merged_dir = out_dir / MERGED_DIR if cfg.merge_adapter else None
    adapters = len(adapted_modules(peft_model))
    full = sharding.full_adapter_state(peft_model) if sharded else None  # every rank
    if world.is_main:
        if full is None:
            peft_model.save_pretrained(str(adapter_dir))
        else:
            peft_model.save_pretrained(str(adapter_dir), state_dict=full)
        make_adapter_relocatable(adapter_dir)  # no absolute store path inside the store
        if merged_dir is not None:
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(str(merged_dir))
            processor.save_pretrained(str(merged_dir))
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    barrier(world)  # the adapter exists before any rank reports success
    steps_run = total - start
    return {
        "policy": PolicyRef(
            base=policy.base,
            adapter=str(adapter_dir.resolve()),
            trust_remote_code=policy.trust_remote_code,
        ).model_dump(),
        "merged": str(merged_dir.resolve()) if merged_dir else None,
        "steps": total,
        "pairs": len(pairs),
        "pairs_with_corrupted": sum(p.corrupted_image is not None for p in pairs),
        "rejects": rejects,
        "resumed_from_step": resumed_from,
        "final_metrics": final_metrics,
        "seconds": round(time.perf_counter() - t_start, 3),
        "steps_per_s": steps_run / train_seconds if train_seconds else 0.0,
        "pairs_per_s": pairs_done / train_seconds if train_seconds else 0.0,
        "image_encodes_per_pair_step": encodes_done / pairs_done if pairs_done else 0.0,
        "trainable_parameters": sum(p.numel() for p in params),
        "adapted_modules": adapters,
        "num_processes": world.size,
        "strategy": cfg.strategy if world.active else "single",
    }


def _peft_state(model: nn.Module, full: dict[str, Tensor]) -> dict[str, Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=full)


class _NullWriter:
    """The TensorBoard writer of ranks > 0: they log nothing."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _log(
    path: Path, writer, step: int, window: list[dict[str, float]], write: bool = True
) -> dict[str, float]:
    """Mean of the window's per-step metrics, written to metrics.jsonl and TensorBoard when
    ``write`` (rank 0); returned either way."""
    keys = sorted({k for m in window for k in m})
    line = {"step": step}
    for k in keys:
        vals = [m[k] for m in window if k in m]
        line[k] = sum(vals) / len(vals)
    line["epoch"] = window[-1]["epoch"]
    line["lr"] = window[-1]["lr"]
    if not write:
        return line
    with path.open("a") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")
    for k, v in line.items():
        if k != "step":
            writer.add_scalar(k, v, step)
    writer.flush()
    return line
