"""What makes an epoch's data depend on (seed, epoch) alone: samples seeded by their own key
(`SeededSamples`), and the sampler of each epoch's order, shard and repeats (`EpochSampler`)."""
from __future__ import annotations

import math

import torch

from ..util.seeding import seed_sample


class SeededSamples(torch.utils.data.Dataset):
    """Wraps a dataset so that each sample's augmentation depends only on (seed, epoch, index).

    Re-seeding python, numpy and torch before each sample makes augmentation independent of the
    number of workers and of which worker loads which batch. That is what lets a run resumed in
    the middle of an epoch see exactly the images the uninterrupted run saw.
    """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        # A key is a sample code, or (epoch, code) from `EpochTagged` (loader workers that
        # persist across epochs keep the epoch they started with). Codes beyond the dataset are
        # repeats of `code % len` (--aug-repeats): the same image under its own augmentation.
        epoch, code = key if isinstance(key, tuple) else (self.epoch, key)
        seed_sample(self.seed, epoch, code)
        return self.dataset[code % len(self.dataset)]


class EpochTagged(torch.utils.data.Sampler):
    """An `EpochSampler`'s codes, each with the epoch it belongs to: ``(epoch, code)``."""

    def __init__(self, sampler: "EpochSampler"):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, code) for code in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class EpochSampler(torch.utils.data.Sampler):
    """A permutation fixed by (seed, epoch), optionally starting part-way (for resume).

    With `num_replicas` > 1 each rank takes every num_replicas-th index of the same permutation,
    which also serves as the distributed sampler (with `set_epoch`, like torch's).

    With `repeats` R > 1 (repeated augmentation, --aug-repeats) each index of the permutation is
    followed by R - 1 repeats, yielded as codes ``index + r * size`` that `SeededSamples` maps
    back to the index with an augmentation of their own. Consecutive copies go to different
    ranks, as in timm's RepeatAugSampler, and the epoch keeps its length (about size / R
    distinct images, each R times), without timm's rounding down to multiples of 256 images.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0,
                 num_replicas: int = 1, pad: bool = False, block: int = 1, repeats: int = 1):
        self.size, self.seed, self.shuffle, self.repeats = size, seed, shuffle, repeats
        self.rank, self.num_replicas = rank, num_replicas
        # Training pads by wrapping around so every rank runs the same number of steps (DDP
        # needs that); evaluation does not, so every image counts exactly once.
        self.pad = pad
        # Evaluation shards whole batches (block = batch size): each rank then sees exactly the
        # batches a single process would, so the numbers match a single-process run.
        self.block = block
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation; skip its first `start` indices of this rank."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.size))
        else:
            g = torch.Generator()
            g.manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        if self.repeats > 1:
            # Only the head of the repeated sequence is used (the epoch keeps its length), so
            # only that much is built: ranks x ceil(size / ranks) codes, never size x repeats.
            used = min(self.size * self.repeats,
                       math.ceil(self.size / self.num_replicas) * self.num_replicas)
            order = [order[p // self.repeats] + (p % self.repeats) * self.size for p in range(used)]
        if self.pad and self.num_replicas > 1 and len(order) % self.num_replicas:
            extra = self.num_replicas - len(order) % self.num_replicas
            order += (order * (extra // len(order) + 1))[:extra]
        if self.block > 1:
            blocks = [order[i:i + self.block] for i in range(0, len(order), self.block)]
            return [i for b in blocks[self.rank::self.num_replicas] for i in b]
        mine = order[self.rank::self.num_replicas]
        if self.repeats > 1:
            mine = mine[:math.ceil(self.size / self.num_replicas)]
        return mine

    def __iter__(self):
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)
