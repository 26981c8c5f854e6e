"""The per-round reference pass: frozen-reference log-prob sums per pair and branch, on disk.

Every preference loss compares the policy with a frozen reference: r(v, y) = beta * sum_{t in y}
(l_theta(t) - l_ref(t)) and r_M(v, y) = beta * sum_{t in M(y)} (l_theta(t) - l_ref(t))
(docs/design.md section 1). The reference terms sum_{t in y} l_ref(t) and sum_{t in M(y)}
l_ref(t) do not change during a round, so they are computed once, here, for all four branches of
every pair, and the trainer reads them instead of running the reference on every branch in every
step. Only the KL terms need the reference's full next-token distribution, and only on (clean
image, y+); the trainer computes those in-step with the adapter switched off.

The reference is the base policy (``policy.base``) with no adapter (``loop.reference: base``,
the paper's), or the base with round k-1's adapter on (``reference_adapter``,
``loop.reference: previous_round``, iterative DPO). Either way it is what the trainer's
``with reference_weights(model):`` computes in-step (:mod:`fire_mpo_core.training.lora`: the
adapter off, or the same adapter loaded frozen beside the trainable one, unmerged as here), so
artifact and in-step KL agree.

Artifact ``<out_dir>/reference.safetensors`` (safetensors; no pickle), N pairs, branch order
``clean_chosen, clean_rejected, corrupt_chosen, corrupt_rejected``:

    logp             [N, 4] float32   sum_{t in y} l_ref(t)      (0 where the branch is absent)
    span_logp        [N, 4] float32   sum_{t in M(y)} l_ref(t)
    num_tokens       [N, 4] int32     |y| scored (after truncation to max_length)
    num_span_tokens  [N, 4] int32     |M(y)| scored
    has_corrupted    [N]    bool      whether pair n has a corrupted image v'

with safetensors metadata ``format`` (``fire-mpo-reference/1``), ``pair_ids`` (JSON list, row
order) and ``info`` (JSON: ``branches``, ``max_length``, ``dtype``, ``base``, and ``adapter``
when the reference carries one). Usage::

    from fire_mpo_core.training.reference import compute_reference_logprobs, ReferenceTable
    info = compute_reference_logprobs(policy, pairs_path, image_root, corrupt_root,
                                      ReferenceConfig(), out_dir)
    table = ReferenceTable.load(out_dir / "reference.safetensors")
    sums = table.lookup(["pair-1", "pair-2"])      # branch -> BranchReference of [2] tensors
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fire_mpo_core.data.records import PreferencePair
from fire_mpo_core.losses.fused import reference_logp_sums
from fire_mpo_core.models import load_model, load_processor
from fire_mpo_core.models.families import ImageFeatures
from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.training.batching import (
    BRANCHES,
    BranchBatch,
    ImageCache,
    build_branch_batch,
    encode_images,
    forward_hidden,
    hf_model,
    load_pairs,
    shifted_targets,
    supports_shared_images,
)
from fire_mpo_core.training.config import ReferenceConfig
from fire_mpo_core.training.sharding import head_weight

__all__ = [
    "FORMAT",
    "REFERENCE_FILE",
    "BranchReference",
    "ReferenceTable",
    "branch_reference_sums",
    "compute_reference_logprobs",
    "load_reference_model",
]

REFERENCE_FILE = "reference.safetensors"
FORMAT = "fire-mpo-reference/1"


@dataclass(frozen=True)
class BranchReference:
    """Reference sums of one branch for B pairs, all [B] (zeros where the branch is absent).

    Attributes:
        logp: sum_{t in y} l_ref(t).
        span_logp: sum_{t in M(y)} l_ref(t).
        num_tokens: |y| scored.
        num_span_tokens: |M(y)| scored.
    """

    logp: Tensor
    span_logp: Tensor
    num_tokens: Tensor
    num_span_tokens: Tensor

    def to(self, device: torch.device | str) -> BranchReference:
        return BranchReference(
            self.logp.to(device),
            self.span_logp.to(device),
            self.num_tokens.to(device),
            self.num_span_tokens.to(device),
        )


@dataclass(frozen=True)
class ReferenceTable:
    """The reference artifact in memory (see the module docstring for the fields)."""

    pair_ids: list[str]
    logp: Tensor
    span_logp: Tensor
    num_tokens: Tensor
    num_span_tokens: Tensor
    has_corrupted: Tensor
    metadata: dict[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {pid: i for i, pid in enumerate(self.pair_ids)})

    @property
    def max_length(self) -> int:
        return int(self.metadata["max_length"])

    def lookup(self, pair_ids: Sequence[str]) -> dict[str, BranchReference]:
        """Branch -> :class:`BranchReference` ([B] tensors) for ``pair_ids`` in that order."""
        missing = [p for p in pair_ids if p not in self._index]
        if missing:
            raise ValueError(
                f"{len(missing)} pair(s) are not in the reference artifact, e.g. {missing[:3]}; "
                "recompute the reference for these pairs"
            )
        idx = torch.tensor([self._index[p] for p in pair_ids], dtype=torch.long)
        return {
            branch: BranchReference(
                logp=self.logp[idx, j],
                span_logp=self.span_logp[idx, j],
                num_tokens=self.num_tokens[idx, j].long(),
                num_span_tokens=self.num_span_tokens[idx, j].long(),
            )
            for j, branch in enumerate(BRANCHES)
        }

    def save(self, path: Path) -> None:
        """Write atomically (temporary name, then rename) as safetensors."""
        path = Path(path)
        meta = {
            "format": FORMAT,
            "info": json.dumps(self.metadata, sort_keys=True),
            "pair_ids": json.dumps(self.pair_ids),
        }
        tensors = {
            "logp": self.logp.float().contiguous(),
            "span_logp": self.span_logp.float().contiguous(),
            "num_tokens": self.num_tokens.to(torch.int32).contiguous(),
            "num_span_tokens": self.num_span_tokens.to(torch.int32).contiguous(),
            "has_corrupted": self.has_corrupted.to(torch.bool).contiguous(),
        }
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceTable:
        """Read an artifact file (or a folder holding ``reference.safetensors``)."""
        path = Path(path)
        if path.is_dir():
            path = path / REFERENCE_FILE
        with safe_open(str(path), framework="pt") as f:
            raw_meta = dict(f.metadata() or {})
        if raw_meta.get("format") != FORMAT:
            got = raw_meta.get("format")
            raise ValueError(f"{path} is not a reference artifact (format {got!r})")
        tensors = load_file(str(path))
        return cls(
            pair_ids=json.loads(raw_meta["pair_ids"]),
            logp=tensors["logp"],
            span_logp=tensors["span_logp"],
            num_tokens=tensors["num_tokens"],
            num_span_tokens=tensors["num_span_tokens"],
            has_corrupted=tensors["has_corrupted"],
            metadata=json.loads(raw_meta["info"]),
        )


@torch.no_grad()
def branch_reference_sums(
    model: torch.nn.Module,
    batch: BranchBatch,
    chunk_size: int,
    image_features: list[ImageFeatures | None] | None = None,
    hidden: tuple[Tensor, int] | None = None,
) -> dict[str, BranchReference]:
    """Reference log-prob sums of every branch of ``batch`` from one forward pass.

    ``model`` must already BE the reference (:func:`load_reference_model`, or the trainer's
    peft model inside ``reference_weights(model)``). Log-probs come chunk by chunk from the
    final hidden states and the lm_head weight
    (:func:`~fire_mpo_core.losses.fused.reference_logp_sums`), so no [R, T, V] logits are built.

    Args:
        model: the reference model, in eval mode.
        batch: the branch batch.
        chunk_size: response tokens per lm_head chunk.
        image_features: per distinct image (from :func:`encode_images`), or None.
        hidden: a precomputed ``forward_hidden(model, batch)`` over all rows, or None.

    Returns:
        branch -> :class:`BranchReference` of [B] tensors (zeros for absent branches).
    """
    h, width = hidden if hidden is not None else forward_hidden(model, batch, None, image_features)
    head = hf_model(model).get_output_embeddings()
    weight, bias = head_weight(head)  # once, before the loop: a collective when sharded
    b = batch.num_pairs
    out: dict[str, BranchReference] = {}
    for branch in BRANCHES:
        rows, pairs = batch.present(branch)
        zeros = torch.zeros(b, dtype=torch.float32, device=h.device)
        counts = torch.zeros(b, dtype=torch.long, device=h.device)
        if rows.numel() == 0:
            out[branch] = BranchReference(zeros, zeros.clone(), counts, counts.clone())
            continue
        labels, span = shifted_targets(batch, rows, width)
        mask = labels != -100
        pair_index = pairs.unsqueeze(1).expand_as(labels)[mask]
        span_rows = span[mask]
        full, spans = reference_logp_sums(
            h[rows, : width - 1][mask],
            labels[mask],
            pair_index,
            span_rows,
            b,
            weight,
            bias,
            chunk_size=chunk_size,
        )
        out[branch] = BranchReference(
            logp=full.float(),
            span_logp=spans.float(),
            num_tokens=torch.bincount(pair_index, minlength=b),
            num_span_tokens=torch.bincount(pair_index[span_rows], minlength=b),
        )
    return out


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def compute_reference_logprobs(
    policy: PolicyRef,
    pairs: Sequence[PreferencePair] | str | Path,
    image_root: str | Path,
    corrupt_root: str | Path | None,
    cfg: ReferenceConfig,
    out_dir: str | Path,
    on_batch: Callable[[int, int], None] | None = None,
    reference_adapter: str | Path | None = None,
) -> dict[str, Any]:
    """Compute the reference artifact ``out_dir/reference.safetensors`` for ``pairs``.

    Args:
        policy: the round's policy; its ``base`` is the reference model (its adapter is not used).
        pairs: validated pairs, or the path of their ``data.jsonl`` (or its folder).
        image_root: folder the pairs' ``image`` paths are relative to.
        corrupt_root: folder the ``corrupted_image`` paths are relative to; None: the folder of
            ``pairs`` when it is a path.
        cfg: batch size, max_length (must equal the trainer's), dtype, chunk size, device.
        out_dir: output folder (created).
        on_batch: optional progress callback ``(batches_done, batches_total)``.
        reference_adapter: a PEFT adapter of ``policy.base`` that is part of the reference
            (round k-1's, ``loop.reference: previous_round``); None: the base alone.

    Returns:
        ``path``, ``pairs``, ``pairs_with_corrupted``, ``image_encodes`` (vision-tower passes),
        ``sequences`` (rows scored), ``seconds``.
    """
    t0 = time.perf_counter()
    pairs, image_root, corrupt_root = _resolve_pairs(pairs, image_root, corrupt_root, cfg)
    device = _device(cfg.device)
    processor = load_processor(policy.base, trust_remote_code=policy.trust_remote_code)
    model = load_reference_model(policy, reference_adapter, cfg.dtype, device)
    images = ImageCache(image_root, corrupt_root)
    sums, stats = _score_pairs(model, processor, pairs, images, cfg, device, on_batch)
    metadata = {
        "branches": list(BRANCHES),
        "max_length": cfg.max_length,
        "dtype": cfg.dtype,
        "base": str(policy.base),
    }
    if reference_adapter is not None:  # only then: a base-only artifact's bytes stay as they were
        metadata["adapter"] = str(reference_adapter)
    table = ReferenceTable(pair_ids=[p.id for p in pairs], metadata=metadata, **sums)
    path = Path(out_dir) / REFERENCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    return {
        "path": str(path),
        "pairs": len(pairs),
        "pairs_with_corrupted": int(sums["has_corrupted"].sum()),
        **stats,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _resolve_pairs(
    pairs: Sequence[PreferencePair] | str | Path,
    image_root: str | Path,
    corrupt_root: str | Path | None,
    cfg: ReferenceConfig,
) -> tuple[list[PreferencePair], Path, Path | None]:
    """The pairs (loaded and checked when given as a path) and the image folders."""
    if isinstance(pairs, str | Path):
        pairs_path = Path(pairs)
        if corrupt_root is None:
            corrupt_root = pairs_path if pairs_path.is_dir() else pairs_path.parent
        # The trainer rejects the same pairs (invalid spans, missing images) the same way.
        pairs = load_pairs(
            pairs_path,
            on_reject=lambda i, r: None,
            image_root=Path(image_root),
            corrupt_root=Path(corrupt_root),
            visual_gate=cfg.visual_gate,
        )
    pairs = list(pairs)
    if not pairs:
        raise ValueError("compute_reference_logprobs got no pairs")
    return pairs, Path(image_root), Path(corrupt_root) if corrupt_root else None


def load_reference_model(
    policy: PolicyRef, adapter: str | Path | None, dtype: str, device: torch.device
) -> torch.nn.Module:
    """The frozen reference in eval mode: ``policy.base``, with ``adapter`` applied (unmerged,
    the way the trainer's frozen second adapter computes it) when given."""
    model = load_model(
        policy.base, dtype=dtype, device=str(device), trust_remote_code=policy.trust_remote_code
    )
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).to(device)
    return model.eval()


def _score_pairs(
    model: torch.nn.Module,
    processor: Any,
    pairs: list[PreferencePair],
    images: ImageCache,
    cfg: ReferenceConfig,
    device: torch.device,
    on_batch: Callable[[int, int], None] | None,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """The artifact's tensors for every pair (in ``pairs`` order), batch by batch, and the
    counters ``image_encodes`` and ``sequences``."""
    shared = supports_shared_images(model)
    # Sorting by length packs similar lengths together: less padding, same per-pair results.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].chosen) + len(pairs[i].rejected))
    n, k = len(pairs), len(BRANCHES)
    out = {
        "logp": torch.zeros(n, k),
        "span_logp": torch.zeros(n, k),
        "num_tokens": torch.zeros(n, k, dtype=torch.int32),
        "num_span_tokens": torch.zeros(n, k, dtype=torch.int32),
        "has_corrupted": torch.zeros(n, dtype=torch.bool),
    }
    stats = {"image_encodes": 0, "sequences": 0}
    n_batches = (n + cfg.batch_size - 1) // cfg.batch_size
    for j, start in enumerate(range(0, n, cfg.batch_size)):
        idx = order[start : start + cfg.batch_size]
        batch = build_branch_batch(processor, [pairs[i] for i in idx], images, cfg.max_length)
        batch = batch.to(device)
        with torch.no_grad():
            feats = encode_images(model, batch) if shared else None
            sums = branch_reference_sums(model, batch, cfg.chunk_size, feats)
        stats["image_encodes"] += len(batch.image_keys) if shared else batch.num_rows
        stats["sequences"] += batch.num_rows
        _scatter(out, torch.tensor(idx, dtype=torch.long), sums, batch.has_corrupted)
        if on_batch is not None:
            on_batch(j + 1, n_batches)
    return out, stats


def _scatter(
    out: dict[str, Tensor],
    rows: Tensor,
    sums: dict[str, BranchReference],
    has_corrupted: Tensor,
) -> None:
    """Write one batch's per-branch sums into the artifact's rows ``rows``."""
    for c, branch in enumerate(BRANCHES):
        s = sums[branch]
        out["logp"][rows, c] = s.logp.cpu()
        out["span_logp"][rows, c] = s.span_logp.cpu()
        out["num_tokens"][rows, c] = s.num_tokens.cpu().to(torch.int32)
        out["num_span_tokens"][rows, c] = s.num_span_tokens.cpu().to(torch.int32)
    out["has_corrupted"][rows] = has_corrupted.cpu()
