"""The batch order training uses, as a ``torch.utils.data.Sampler`` of index lists (imports torch).

Epoch e visits the samples in ``randperm(N)`` drawn from a generator seeded with
``seed * 100_003 + e`` (the order ``cl_tool.training.train`` has always used, so results stay
bit-identical); global batch b is ``order[b*B:(b+1)*B]``; under DDP it is split into world
contiguous shares whose sizes differ by at most one (:func:`share_bounds`) and rank r takes
share r. A short last batch of fewer than world samples leaves some ranks an empty share; the
training loop weights each rank's loss by the global batch's size, so an empty share adds
nothing. ``set_epoch(e, start_batch=k)`` starts epoch e at global batch k (a resumed run).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def share_bounds(length: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank ``rank``'s share of ``length`` samples: the first ``length mod world`` ranks take
    ``⌊length/world⌋ + 1``, the others ``⌊length/world⌋`` (possibly 0)."""
    q, r = divmod(length, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


class GlobalBatchSampler(Sampler):
    """Per epoch: this rank's share of each shuffled global batch of ``batch_size`` samples."""

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True):
        if n < 0 or batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"bad sampler arguments n={n} batch_size={batch_size} rank={rank} world={world}")
        self.n, self.batch_size, self.seed, self.rank, self.world, self.shuffle = (
            n,
            batch_size,
            seed,
            rank,
            world,
            shuffle,
        )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=gen)

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.batch_size) - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        B = self.batch_size
        for b in range(self.start_batch, math.ceil(self.n / B)):
            idx = order[b * B : (b + 1) * B]
            if self.world > 1:
                lo, hi = share_bounds(len(idx), self.rank, self.world)
                idx = idx[lo:hi]
            yield idx.tolist()
