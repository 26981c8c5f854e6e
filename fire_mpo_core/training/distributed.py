"""Data-parallel helpers of the preference trainer: rank sharding, gradient sums, metric gathers.

Used by :func:`fire_mpo_core.training.preference.train_preference` when it runs in N > 1
processes (started by ``accelerate launch``, see :mod:`fire_mpo_core.training.launch`). The
trainer does not wrap the model in ``DistributedDataParallel``: it calls submodules (the vision
tower, the inner language model, the lm_head) directly and switches the adapter off for the
reference, and DDP only synchronises gradients of a forward that went through its own
``forward``. Instead each optimizer step is made data-parallel explicitly:

1. every rank draws the same global micro-batch (same seeded order) and keeps its share,
   :func:`rank_share` (contiguous, sizes differ by at most one);
2. each rank back-propagates ``sum of its pairs' losses / global pairs of the step``;
3. :func:`sum_gradients` all-reduces (SUM) the trainable gradients once per step, so every rank
   holds the gradient of the global mean loss, exactly what one process computes on the whole
   batch (up to float summation order); clipping and AdamW then run identically everywhere;
4. :func:`gather_sums` adds up the metric sums and weights of all ranks for rank 0's log.

Works with gloo (CPU) and NCCL (GPU) process groups; in a single process every helper is a no-op::

    world = DistInfo.current()
    mine = rank_share(global_indices, world.rank, world.size)
    ...backward...
    sum_gradients(params, world)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistInfo", "barrier", "gather_sums", "rank_share", "step_seed", "sum_gradients"]


@dataclass(frozen=True)
class DistInfo:
    """Rank and world size of this process (0 and 1 without a process group)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @classmethod
    def current(cls) -> DistInfo:
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), size=dist.get_world_size())
        return cls()


def rank_share(indices: Sequence[int], rank: int, size: int) -> list[int]:
    """This rank's contiguous share of a global micro-batch.

    The first ``len % size`` ranks get one item more (``numpy.array_split`` sizes); a rank may
    get nothing when the batch is smaller than the world.
    """
    n = len(indices)
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    end = start + base + (1 if rank < extra else 0)
    return list(indices[start:end])


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of optimizer step ``step`` on ``rank`` (dropout masks): a function of the three only,
    so a resumed multi-process run draws what the uninterrupted one drew without saving every
    rank's generator state."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def sum_gradients(params: Sequence[Tensor], world: DistInfo) -> None:
    """All-reduce (SUM) the ``.grad`` of ``params`` in one flat buffer; None grads count as 0.

    A rank that had no pairs this step still joins with zeros, so the collective never hangs.
    """
    if not world.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def gather_sums(values: dict[str, float], world: DistInfo) -> dict[str, float]:
    """Key-wise sum of a float dict over all ranks (ranks may miss keys: a missing key is 0)."""
    if not world.active:
        return dict(values)
    parts: list[dict[str, float] | None] = [None] * world.size
    dist.all_gather_object(parts, values)
    out: dict[str, float] = {}
    for part in parts:  # rank order: the same float sums on every rank
        for k, v in (part or {}).items():
            out[k] = out.get(k, 0.0) + v
    return out


def barrier(world: DistInfo) -> None:
    """Wait for every rank (no-op in one process)."""
    if world.active:
        dist.barrier()
