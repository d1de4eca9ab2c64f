"""The training data order: reshuffled per epoch from the run's seed, resumable at any batch.

A mid-epoch resume must see the same batches as the uninterrupted run: the order comes from
generators reseeded each epoch (independent of the global RNG, which the model and the
augmentation consume), and :class:`SkipSampler` drops the batches a checkpoint already trained on.
"""

from __future__ import annotations

import math

import torch

from lesionkit.engine.distributed import DistributedContext
from lesionkit.engine.runtime import init_worker


class SkipSampler(torch.utils.data.Sampler):
    """A sampler's order without its first ``skip`` indices: a resumed epoch starts at the batch it stopped at."""

    def __init__(self, sampler: torch.utils.data.Sampler) -> None:
        self.sampler = sampler
        self.skip = 0

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class EpochOrder:
    """The shuffled order of ``data`` (per rank when distributed) and the DataLoader that follows it."""

    def __init__(self, data: torch.utils.data.Dataset, seed: int, dist: DistributedContext) -> None:
        self.seed = seed
        self.order_generator = torch.Generator()
        self.loader_generator = torch.Generator()  # the DataLoader's worker seeds
        if dist.enabled:
            sampler = torch.utils.data.DistributedSampler(data, num_replicas=dist.world_size, rank=dist.rank,
                                                          shuffle=True, seed=seed)
        else:
            sampler = torch.utils.data.RandomSampler(data, generator=self.order_generator)
        self.sampler = SkipSampler(sampler)
        self.per_rank = math.ceil(len(data) / dist.world_size)

    def loader(self, data: torch.utils.data.Dataset, batch_size: int, num_workers: int,
               pin_memory: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            data, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers, pin_memory=pin_memory,
            drop_last=self.per_rank >= 2 * batch_size, generator=self.loader_generator, worker_init_fn=init_worker)

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        """Reseed for 0-based ``epoch`` and leave out its first ``skip`` samples (a mid-epoch resume)."""
        epoch_seed = self.seed * 100_003 + epoch
        self.order_generator.manual_seed(epoch_seed)
        self.loader_generator.manual_seed(epoch_seed + 1)
        if isinstance(self.sampler.sampler, torch.utils.data.DistributedSampler):
            self.sampler.sampler.set_epoch(epoch)
        self.sampler.skip = skip

    def end_epoch(self) -> None:
        self.sampler.skip = 0


__all__ = ["EpochOrder", "SkipSampler"]
