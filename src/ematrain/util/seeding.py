"""Every random stream of a run, seeded from (seed, epoch, position) alone.

Data order depends on (seed, epoch), each sample's augmentation on (seed, epoch, sample), and the
main process's randomness in a step (dropout, drop-path, mixup) on (seed, epoch, step, rank). A
run resumed at any step, or with another number of loader workers, therefore draws exactly the
numbers the uninterrupted run drew.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_host(value: int) -> None:
    random.seed(value)
    np.random.seed(value)
    # The CPU generator only: torch.manual_seed also seeds every accelerator (~100x slower).
    torch.default_generator.manual_seed(value)


def seed_step(seed: int, epoch: int, batch: int, rank: int) -> None:
    """Seed the main process's generators for one training step."""
    step_seed = hash((seed, epoch, batch, rank, 1)) % 2**32
    _seed_host(step_seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed(step_seed)


def seed_sample(seed: int, epoch: int, code: int) -> None:
    """Seed the generators for one sample's augmentation (in whichever worker loads it)."""
    _seed_host(hash((seed, epoch, code)) % 2**32)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy and random follow the seed torch gave the worker."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def loader_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
