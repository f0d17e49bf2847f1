"""Variable-size training (--train-img-sizes and its family): timm's scheduled batches, resumable.

timm's `ScheduledBatchSampler` gives each batch one of several choices (an image size and its
batch size), drawn from the seed and the epoch: a constant mix, or a progressive schedule that
moves from the first size to the last over the run; `ScheduledTransformDataset` applies the
chosen size's transform to each sample of the batch. Here they wrap our epoch sampler and
seeded samples (`data.EpochTagged`, `data.SeededSamples`), so a sample's augmentation still
depends only on (seed, epoch, index), and a run resumed in the middle of an epoch skips the
batches already trained (the schedule is the same on every pass) instead of a count of images.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from timm.data.scheduled_sampler import ScheduledBatchSampler, ScheduledTransformDataset
from torch.utils.data import Sampler

from ..util.errors import UserError

LOSS_SCALES = ("none", "sqrt", "linear")


@dataclass(frozen=True)
class SizeChoices:
    """The choices of a variable-size run, as timm's flags give them."""
    img_sizes: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    probs: tuple[float, ...] | None = None
    schedule: str = "constant"           # --train-size-schedule
    spread: float = 0.65                 # --train-size-schedule-spread
    random_mix: float = 0.1              # --train-size-random-mix
    num_batches: int | None = None       # --train-batches-per-epoch

    @classmethod
    def of(cls, img_sizes, batch_sizes, batch_size: int, **kwargs) -> "SizeChoices":
        """timm's defaults: every size at `batch_size` (-b) unless --train-batch-sizes says."""
        sizes = tuple(img_sizes)
        batches = tuple(batch_sizes) if batch_sizes else (batch_size,) * len(sizes)
        probs = kwargs.pop("probs", None)
        return cls(sizes, batches, tuple(probs) if probs else None, **kwargs)

    def __post_init__(self):
        if not self.img_sizes:
            raise UserError("--train-img-sizes needs at least one size")
        if len(self.batch_sizes) != len(self.img_sizes):
            raise UserError(f"--train-batch-sizes gives {len(self.batch_sizes)} batch sizes for "
                            f"{len(self.img_sizes)} --train-img-sizes: one each")
        if self.probs is not None and len(self.probs) != len(self.img_sizes):
            raise UserError(f"--train-size-probs gives {len(self.probs)} weights for "
                            f"{len(self.img_sizes)} --train-img-sizes: one each")
        if self.probs is not None and (min(self.probs) < 0 or not sum(self.probs) > 0):
            raise UserError("--train-size-probs must be >= 0 with a positive sum")
        if min(self.batch_sizes) < 1 or min(self.img_sizes) < 1:
            raise UserError("--train-img-sizes and --train-batch-sizes must be >= 1")
        if self.schedule == "progressive" and len(self.img_sizes) < 2:
            raise UserError("--train-size-schedule progressive moves between sizes: give at "
                            "least two --train-img-sizes")
        if self.spread < 0 or not 0 <= self.random_mix <= 1:
            raise UserError("--train-size-schedule-spread must be >= 0 and "
                            "--train-size-random-mix in [0, 1]")
        if self.num_batches is not None and self.num_batches < 1:
            raise UserError(f"--train-batches-per-epoch must be >= 1, got {self.num_batches}")


class SizedBatches(Sampler):
    """Batches of ``((epoch, code), choice)`` keys, the choice naming the batch's size.

    `sampler` is the run's `data.EpochSampler` (this rank's share); `set_epoch(epoch, start)`
    selects the epoch and skips its first `start` batches (resume).
    """

    def __init__(self, sampler, choices: SizeChoices, seed: int, epochs: int, tagged):
        self.sampler, self.start = sampler, 0
        try:
            self.inner = ScheduledBatchSampler(
                tagged, batch_sizes=choices.batch_sizes, choice_weights=choices.probs, seed=seed,
                drop_last=True, num_batches=choices.num_batches,
                choice_schedule=choices.schedule,
                schedule_epochs=epochs if choices.schedule == "progressive" else None,
                schedule_spread=choices.spread, schedule_random_mix=choices.random_mix)
        except (ValueError, TypeError) as exc:
            raise UserError(f"--train-img-sizes: {exc}") from None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.inner.set_epoch(epoch)
        self.start = start

    @property
    def average_batch_size(self) -> float:
        """The policy-average batch size: timm's reference for the LR and the loss scale."""
        return float(self.inner.average_batch_size)

    @property
    def batches(self) -> int:
        """Batches in a whole epoch."""
        return len(self.inner)

    def __iter__(self):
        return islice(iter(self.inner), self.start, None)

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.start)


def sized_samples(samples, transforms) -> ScheduledTransformDataset:
    """`samples` (seeded, without a transform of their own) through the transform of each key's
    choice: one transform per --train-img-sizes entry, applied after the sample's seeding."""
    return ScheduledTransformDataset(samples, transforms)


def loss_scale(batch: int, reference: float, mode: str) -> float:
    """--variable-batch-loss-scale (and --naflex-loss-scale): the factor of a batch's loss,
    relative to the policy-average batch, as timm's train loop computes it."""
    if mode not in LOSS_SCALES:
        raise UserError(f"loss scale must be one of {', '.join(LOSS_SCALES)}, got {mode!r}")
    if mode == "none":
        return 1.0
    ratio = batch / reference
    return ratio ** 0.5 if mode == "sqrt" else ratio
