"""Which pairs each micro-batch of the trainer holds: seeded epoch permutations, optionally
grouped by length, each epoch starting with its longest batch. Stateless, so a resumed run
draws the same batches as one that never stopped::

    order = DataOrder(n_pairs, batch_size, seed, longest_first=lengths)
    order.micro_batch(k)          # pair indices of micro-batch k
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fire_mpo_core.training.batching import (
    length_grouped_permutation,
)
from fire_mpo_core.training.config import TrainConfig


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


class DataOrder:
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


def total_steps(cfg: TrainConfig, order: DataOrder) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    micro = math.ceil(cfg.epochs * order.per_epoch)
    return max(1, math.ceil(micro / cfg.grad_accum))
