"""Balanced sampling of training slices (FreqMedCLIP: "class imbalance is addressed through Dice loss and balanced
sampling during training").

Every epoch draws as many samples as the training set holds (or a set number), half of them from slices where the
target is present and half from slices where it is absent, each half drawn uniformly without replacement from its
group (a group smaller than its half is cycled through in fresh permutations), shuffled together and shared out
between processes like :class:`torch.utils.data.distributed.DistributedSampler` (same epoch seeding, same number
of samples per process). With one group empty every sample comes from the other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["BalancedSampler"]


class BalancedSampler(Sampler[int]):
    """Indices of a dataset whose items are flagged ``positive`` (target present) or not, balanced per epoch.

    Args:
        positive: one flag per dataset item.
        num_replicas, rank: the processes sharing the epoch and this process's number.
        seed: with the epoch (:meth:`set_epoch`), seeds the draw; every process draws the same epoch.
        samples: how many items an epoch draws in all processes together (default: as many as the dataset holds).
            A large dataset can be sampled in short epochs, each drawing without replacement within its group.
    """

    def __init__(self, positive: Sequence[bool], num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 samples: int | None = None) -> None:
        if not positive:
            raise ValueError("balanced sampling needs at least one training slice")
        flags = [bool(flag) for flag in positive]
        self.groups = [[i for i, flag in enumerate(flags) if flag], [i for i, flag in enumerate(flags) if not flag]]
        if samples is not None and samples < 1:
            raise ValueError(f"an epoch must draw at least one sample, got {samples}")
        self.total = samples or len(positive)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.num_samples = -(-self.total // num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    @staticmethod
    def _draw(group: list[int], count: int, generator: torch.Generator) -> list[int]:
        drawn: list[int] = []
        while len(drawn) < count:
            drawn += [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        return drawn[:count]

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        size = self.num_samples * self.num_replicas
        filled = [group for group in self.groups if group]
        halves = [size // len(filled) + (i < size % len(filled)) for i in range(len(filled))]
        indices = [index for group, count in zip(filled, halves, strict=True)
                   for index in self._draw(group, count, generator)]
        order = torch.randperm(len(indices), generator=generator).tolist()
        return iter([indices[i] for i in order][self.rank :: self.num_replicas])
