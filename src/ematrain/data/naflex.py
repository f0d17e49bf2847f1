"""NaFlex training and evaluation (--naflex-loader and its family), resumable.

timm's `NaFlexMapDatasetWrapper` turns a map-style dataset into whole batches of patch
sequences: a canonical schedule of (sequence length, batch size) pairs, fixed by the seed so
that every batch holds about the same number of tokens, shuffled each epoch; each image is
resized to fit its batch's sequence length and cut into patches (``{'patches', 'patch_coord',
'patch_valid'}``, what NaFlexVit models take). Two things are changed for our loop:

- each sample is drawn through `data.SeededSamples` keyed by (epoch, index), so its
  augmentation does not depend on the worker that loads it or on what ran before;
- `set_epoch(epoch, start)` skips the epoch's first `start` batches (resume); the schedule is a
  function of (seed, epoch), so the rest is exactly the uninterrupted run's.

Normalization and patch random erasing run in the main process after the step's seeding
(`PatchNormalize`, timm's `PatchRandomErasing`), not in timm's prefetcher, which would draw its
erasing before the step is seeded.
"""
from __future__ import annotations

import contextlib
import io
from functools import partial

import torch
from timm.data import create_transform
from timm.data.naflex_dataset import NaFlexCollator, NaFlexMapDatasetWrapper
from timm.data.naflex_mixup import NaFlexMixup
from timm.data.naflex_random_erasing import PatchRandomErasing
from timm.data.readers.shared_count import SharedCount
from torch import nn

from ..util.errors import UserError

PATCH_KEYS = ("patches", "patch_coord", "patch_valid")


def model_patch_size(model: nn.Module, name: str) -> tuple[int, int]:
    """The patch size of a NaFlex-compatible model (timm's ``get_patch_size()``)."""
    if not hasattr(model, "get_patch_size"):
        raise UserError(f"--naflex-loader needs a NaFlex model (e.g. "
                        f"naflexvit_base_patch16_gap): {name} takes image tensors, not patch "
                        f"sequences")
    return tuple(model.get_patch_size())


def check_patch_sizes(model: nn.Module, name: str, sizes) -> None:
    """--naflex-patch-sizes other than the model's own need a NaFlexVit that resizes its patch
    embedding to each batch's patches (timm's ``enable_patch_interpolator``)."""
    own = model_patch_size(model, name)
    others = [s for s in sizes or () if (s, s) != tuple(own)]
    embeds = getattr(model, "embeds", None)
    if others and not getattr(embeds, "enable_patch_interpolator", True):
        raise UserError(f"--naflex-patch-sizes {' '.join(map(str, sizes))}: {name} embeds "
                        f"{own[0]}x{own[1]} patches only; give --model-kwargs "
                        f"enable_patch_interpolator=True to train it at other patch sizes")


class _EpochKeyed(torch.utils.data.Dataset):
    """Index ``i`` of `samples` (seeded samples) as the key ``(epoch, i)`` of the shared epoch."""

    def __init__(self, samples, epoch: SharedCount):
        self.samples, self.epoch = samples, epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[(self.epoch.value, index)]


class NaFlexBatches(NaFlexMapDatasetWrapper):
    """timm's NaFlex batch stream over seeded samples, able to start part-way into an epoch."""

    def __init__(self, samples, *, start_epoch: int = 0, **kwargs):
        epoch = SharedCount(start_epoch)
        super().__init__(_EpochKeyed(samples, epoch), epoch=start_epoch, **kwargs)
        self.shared_epoch = epoch  # one counter for the wrapper and its samples
        self.start = SharedCount(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.shared_epoch.value = epoch
        self.start.value = start

    def _prepare_epoch_batches(self, epoch: int):
        return super()._prepare_epoch_batches(epoch)[self.start.value:]

    def __len__(self) -> int:
        return max(0, self._num_batches_per_rank - self.start.value)

    @property
    def batches(self) -> int:
        """Batches in a whole epoch of this rank."""
        return self._num_batches_per_rank


def train_batches(samples, *, patch_size, seq_lens, batch_size: int, seed: int,
                  transform_kwargs: dict, patch_sizes=None, patch_size_probs=None,
                  mixup_fn=None, rank: int = 0, world_size: int = 1,
                  channels_last: bool = True) -> NaFlexBatches:
    """The training stream as timm's `create_naflex_loader` configures it: ``batch_size`` images
    of the longest sequence make the token budget of every batch."""
    kwargs = dict(transform_kwargs, is_training=True)
    kwargs.pop("input_size", None)  # the sequence length sizes each image
    factory = partial(create_transform, use_prefetcher=True, naflex=True,
                      patchify_channels_last=channels_last, **kwargs)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # timm prints its schedule's size
            return NaFlexBatches(samples, patch_size=None if patch_sizes else patch_size,
                                 patch_size_choices=patch_sizes,
                                 patch_size_choice_probs=patch_size_probs,
                                 seq_lens=tuple(seq_lens),
                                 max_tokens_per_batch=batch_size * max(seq_lens),
                                 transform_factory=factory, mixup_fn=mixup_fn, seed=seed,
                                 distributed=world_size > 1, rank=rank, world_size=world_size,
                                 patchify_channels_last=channels_last)
    except (ValueError, AssertionError) as exc:
        raise UserError(f"--naflex-loader: {str(exc)[:160]}") from None


def eval_transform(data_config: dict, patch_size, max_seq_len: int, channels_last: bool = True):
    """The evaluation transform of timm's NaFlex loader: the image resized to fit
    `max_seq_len` patches, patchified, left as uint8 for `PatchNormalize`."""
    return create_transform(is_training=False, interpolation=data_config["interpolation"],
                            mean=data_config["mean"], std=data_config["std"], use_prefetcher=True,
                            naflex=True, patch_size=patch_size, max_seq_len=max_seq_len,
                            patchify=True, patchify_channels_last=channels_last)


def eval_collate(max_seq_len: int) -> NaFlexCollator:
    return NaFlexCollator(max_seq_len=max_seq_len)


class PatchNormalize:
    """A NaFlex batch on the device with its patches normalized, as timm's prefetcher does
    (``(x - 255 mean) / (255 std)`` per channel of each flattened patch)."""

    def __init__(self, mean, std, device: torch.device, channels: int = 3,
                 channels_last: bool = True, dtype: torch.dtype | None = None):
        shape = (1, 1, 1, channels) if channels_last else (1, 1, channels, 1)
        mean = list(mean) * (channels // len(mean)) if len(mean) < channels else list(mean)
        std = list(std) * (channels // len(std)) if len(std) < channels else list(std)
        self.shift = torch.tensor([255.0 * m for m in mean], device=device).view(shape)
        self.scale = torch.tensor([255.0 * s for s in std], device=device).view(shape)
        self.device, self.channels, self.channels_last = device, channels, channels_last
        self.dtype = dtype or torch.float32

    def __call__(self, batch: dict) -> dict:
        out = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
               for k, v in batch.items()}
        patches = out["patches"].float()
        b, n = patches.shape[:2]
        view = (b, n, -1, self.channels) if self.channels_last else (b, n, self.channels, -1)
        normalized = patches.reshape(view).sub(self.shift).div(self.scale)
        out["patches"] = normalized.reshape(patches.shape).to(self.dtype)
        return out


class PatchErase:
    """timm's patch random erasing of a normalized NaFlex batch (--reprob, --remode,
    --recount), as its NaFlex prefetcher applies it: on P-P-C patches, each image on its own
    draw."""

    def __init__(self, prob: float, mode: str, count: int, device: torch.device,
                 channels: int = 3, channels_last: bool = True):
        self.erase = PatchRandomErasing(erase_prob=prob, mode=mode, max_count=count,
                                        device=device)
        self.channels, self.channels_last = channels, channels_last

    def __call__(self, batch: dict) -> dict:
        patches = batch["patches"]
        b, n = patches.shape[:2]
        view = (b, n, -1, self.channels) if self.channels_last else (b, n, self.channels, -1)
        flat = patches.reshape(view)
        if not self.channels_last:
            flat = flat.transpose(-2, -1).contiguous()
        flat = self.erase(flat, patch_coord=batch["patch_coord"],
                          patch_valid=batch.get("patch_valid"))
        if not self.channels_last:
            flat = flat.transpose(-2, -1).contiguous()
        return dict(batch, patches=flat.reshape(patches.shape))


def naflex_mixup(num_classes: int, mixup: float, cutmix: float, prob: float,
                 switch_prob: float, smoothing: float, off_epoch: int) -> NaFlexMixup:
    """timm's mixup/cutmix of NaFlex batches (pairs of images of any sizes), run by the batch
    stream before patchifying; it turns the targets into soft ones and stops at `off_epoch`
    (--mixup-off-epoch)."""
    return NaFlexMixup(num_classes=num_classes, mixup_alpha=mixup, cutmix_alpha=cutmix,
                       prob=prob, switch_prob=switch_prob, label_smoothing=smoothing,
                       mixup_off_epoch=off_epoch)


def batch_images(batch) -> int:
    """Images in a batch of either kind (a NaFlex dict or an image tensor)."""
    return batch["patches"].shape[0] if isinstance(batch, dict) else batch.shape[0]


def to_dtype(batch, dtype: torch.dtype):
    """A batch of either kind with its pixel values in `dtype` (a NaFlex batch's coordinates
    and masks keep theirs)."""
    if isinstance(batch, dict):
        return dict(batch, patches=batch["patches"].to(dtype))
    return batch.to(dtype)
