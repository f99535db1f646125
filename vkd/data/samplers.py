"""Samplers: a resumable single-process shuffle, DeiT's repeated augmentation, and an exact eval shard.

Every training sampler here has ``set_epoch(epoch)`` and draws epoch ``e``'s order from ``seed + e``
alone, so a resumed run sees the same order as an uninterrupted one.
"""
import math
from typing import Iterator, Sized

import torch
from torch.utils.data import RandomSampler, Sampler


class SeededRandomSampler(RandomSampler):
    """RandomSampler whose permutation for epoch ``e`` depends only on ``seed + e``.

    A plain RandomSampler with a seeded generator advances that generator across epochs, so the
    order after ``--resume`` would differ from an uninterrupted run's.
    """

    def __init__(self, data_source: Sized, seed: int):
        self.seed = seed
        super().__init__(data_source, generator=torch.Generator())
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


class RASampler(Sampler):
    """Repeated augmentation (Hoffer et al., CVPR 2020), as in DeiT's ``samplers.RASampler``.

    Each image is repeated ``num_repeats`` times and the copies are dealt to different ranks, so
    every rank sees a different augmentation of the same image in the same step. Per epoch each
    rank keeps ``len(dataset) // num_replicas`` indices, so an epoch is as long as without
    repetition. (DeiT keeps ``len // 256 * 256 / num_replicas``: the rounding to 256 gives zero
    samples on data sets under 256 images, so it is dropped here.) The original VkD code ignored
    ``--repeated-aug``; we honour it.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int, shuffle: bool = True,
                 num_repeats: int = 3, seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.num_repeats = num_repeats
        self.seed = seed
        self.epoch = 0
        self.num_samples = math.ceil(len(dataset) * num_repeats / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.num_selected_samples = len(dataset) // num_replicas

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(len(self.dataset), generator=generator)
        else:
            indices = torch.arange(len(self.dataset))
        indices = torch.repeat_interleave(indices, repeats=self.num_repeats).tolist()
        # Pad by wrapping around so every rank gets num_samples; the surplus is cut below anyway.
        indices += indices[:self.total_size - len(indices)]
        return iter(indices[self.rank:self.total_size:self.num_replicas][:self.num_selected_samples])

    def __len__(self) -> int:
        return self.num_selected_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class DistributedEvalSampler(Sampler):
    """A disjoint contiguous shard of the indices per rank, without padding.

    torch's DistributedSampler pads the last shard with duplicates so that every rank has the same
    count; the original evaluated with it, which counts some images twice. Here every index is in
    exactly one shard and shard sizes differ by at most one (a rank may get none when there are
    fewer images than ranks). The evaluation loop must therefore sum counts (not average
    per-rank accuracies) and must not run a collective per batch, since ranks run different
    numbers of batches.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        total = len(dataset)
        self.start = rank * total // num_replicas
        self.end = (rank + 1) * total // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start
