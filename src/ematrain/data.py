"""ImageFolder splits, timm transforms and seeded data loaders."""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import UserError
from .logs import log
from .seeding import loader_generator, seed_sample, seed_worker
from .signals import in_loader_worker

# Keys of the data config that fix the evaluation transform; kept in checkpoints so that
# validate.py rebuilds exactly the transform training validated with.
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# The largest side the evaluation resize may give (its crop is --img-size): as MAX_IMAGE_SIZE
# for the input itself, anything bigger only exhausts memory.
MAX_RESIZE = 4096
# How far normalization may take a pixel in [0, 1]: the ImageNet statistics give about 2.6; far
# beyond, the first layers overflow in 16-bit precision and training is not what was meant.
MAX_NORMALIZED = 1e4
# 16-bit grayscale modes: PIL's convert("RGB") clips them at 255 (a white image).
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


@contextlib.contextmanager
def _worker_count_said():
    """Where -j exceeds the cores, train.py and validate.py say so once
    (`LoaderSpec.too_many_workers`): torch's own warning, which it repeats for every loader it
    makes and starts (once inside the progress bar), is silenced around those calls only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create",
                                category=UserWarning)
        yield


def resolve_split_dir(root: str | Path, split: str) -> Path:
    """`root/split`, accepting timm's 'validation' for a missing 'val' (and the reverse)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data root not found: {root}")
    path = root / split
    if path.is_dir():
        return path
    alias = {"val": "validation", "validation": "val"}.get(split)
    if alias and (root / alias).is_dir():
        return root / alias
    raise UserError(f"split '{split}' not found: no folder {path}")


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.mode in _SIXTEEN_BIT or (img.mode == "I" and img.format == "PNG"):
                # Its high byte, as PIL itself reads 16-bit RGB files: 65535 is 255. (A PNG has
                # at most 16 bits; some PIL versions open its grayscale ones as mode I.)
                pixels = np.asarray(img).astype(np.int64).clip(0, 65535)
                img = Image.fromarray((pixels >> 8).astype(np.uint8))
            elif img.mode in ("I", "F"):
                raise UserError(f"cannot read image {path}: its pixels are 32-bit "
                                f"{'integers' if img.mode == 'I' else 'floats'} with no fixed "
                                f"range; save it with 8 or 16 bits per channel") from None
            return img.convert("RGB")
    except Image.DecompressionBombError:
        raise UserError(f"cannot read image {path}: its header claims more pixels than any "
                        f"real image (a decompression bomb?)") from None
    except (OSError, ValueError) as exc:
        reason = "not a valid image" if "cannot identify" in str(exc) else str(exc)[:100]
        raise UserError(f"cannot read image {path}: {reason}") from None


def _hidden(name: str) -> bool:
    # Dot-files and folders: .ipynb_checkpoints, macOS's AppleDouble ._x.png, .DS_Store, ...
    return name.startswith(".")


class _Scan:
    """Walks a split's class folders: hidden entries skipped (and counted), links to folders
    followed, but a link back to a folder already walked (a loop, or a second path to the same
    images) refused rather than counted twice. An image name that is not a regular file (a
    named pipe would block its reader forever; a socket, a device, a broken link) is skipped
    and counted."""

    def __init__(self, split_dir: Path):
        self.split_dir = split_dir
        self.hidden = 0
        self.not_files = 0
        self.seen: dict[str, str] = {}

    def _refuse(self, error: OSError) -> None:
        raise UserError(f"cannot read folder {error.filename}: "
                        f"{(error.strerror or str(error)).lower()}")

    def _entries(self, folder) -> list[os.DirEntry]:
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self._refuse(exc)

    def classes(self) -> list[str]:
        entries = self._entries(self.split_dir)
        self.hidden += sum(_hidden(e.name) for e in entries)
        return [e.name for e in entries if not _hidden(e.name) and e.is_dir()]

    def images(self, class_dir: str) -> list[str]:
        found, pending = [], [class_dir]
        while pending:  # depth first, in name order
            folder = pending.pop()
            real = os.path.realpath(folder)
            if real in self.seen:
                raise UserError(f"split {self.split_dir}: {folder} leads back to "
                                f"{self.seen[real]} (a folder link loop, or two paths to the same "
                                f"images); remove the link")
            self.seen[real] = folder
            folders = []
            for entry in self._entries(folder):
                if _hidden(entry.name):
                    self.hidden += 1
                elif entry.is_dir():  # links followed (is_dir and is_file follow them)
                    folders.append(entry.path)
                elif entry.name.lower().endswith(IMG_EXTENSIONS):
                    if entry.is_file():
                        found.append(entry.path)
                    else:
                        self.not_files += 1
            pending += reversed(folders)
        return found


class SplitFolder(ImageFolder):
    """torchvision's ImageFolder over the samples that `_Scan` finds."""

    def __init__(self, split_dir: Path, transform=None):
        self.scan = _Scan(Path(split_dir))
        super().__init__(str(split_dir), transform=transform, loader=_load_rgb, allow_empty=True)

    def find_classes(self, directory):
        classes = self.scan.classes()
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        return [(path, index) for name, index in class_to_idx.items()
                for path in self.scan.images(os.path.join(directory, name))]


def load_image_folder(split_dir: Path, transform=None) -> ImageFolder:
    """An ImageFolder whose bad layouts and bad images surface as one-line UserErrors."""
    dataset = SplitFolder(split_dir, transform)
    if not dataset.classes:
        raise UserError(f"split {split_dir} has no class folders")
    if not dataset.samples:
        raise UserError(f"split {split_dir} has no images "
                        f"(looked for {', '.join(IMG_EXTENSIONS[:4])}, ...)")
    counts = np.bincount([t for _, t in dataset.samples], minlength=len(dataset.classes))
    empty = [c for c, n in zip(dataset.classes, counts) if n == 0]
    if empty:
        raise UserError(f"split {split_dir}: class folder(s) with no images: {', '.join(empty[:5])}")
    if dataset.scan.hidden:
        log.info(f"{split_dir}: skipped {dataset.scan.hidden} hidden file(s) and folder(s) "
                 f"(names starting with '.')")
    if dataset.scan.not_files:
        log.warning(f"warning: {split_dir}: skipped {dataset.scan.not_files} image name(s) that "
                    f"are not regular files (named pipes, sockets, devices or broken links)")
    return dataset


def check_same_classes(train: ImageFolder, val: ImageFolder, val_dir: Path) -> None:
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        parts = []
        if only_train:
            parts.append(f"missing in val: {', '.join(only_train[:5])}")
        if only_val:
            parts.append(f"not in train: {', '.join(only_val[:5])}")
        raise UserError(f"class folders of {val_dir} differ from the training split ({'; '.join(parts)})")


def data_config_for(overrides: dict, model) -> dict:
    """timm's data config for the model, with the user's overrides (`ImageSpec.overrides()`),
    checked now that the model's defaults fill what the user left out."""
    config = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    config = {k: config[k] for k in DATA_CONFIG_KEYS if k in config}
    check_data_config(config)
    return config


def check_data_config(config: dict) -> None:
    """The evaluation resize (timm's: the crop size over --crop-pct) and the normalization of
    a data config stay within what an image can mean."""
    size, crop = max((config.get("input_size") or (0,))[-2:]), config.get("crop_pct") or 1.0
    resize = math.floor(size / crop)
    if resize > MAX_RESIZE:
        raise UserError(f"--crop-pct {crop:g} would resize every image to {resize} px before "
                        f"the {size} px center crop (at most {MAX_RESIZE}): give a --crop-pct of "
                        f"at least {size / MAX_RESIZE:.3g}, e.g. 0.875 or 1")
    for m, s in zip(config.get("mean") or (), config.get("std") or ()):
        reach = max(abs(m), abs(1.0 - m)) / s if s > 0 else math.inf
        if not reach <= MAX_NORMALIZED:
            raise UserError(f"--mean {m:g} with --std {s:g} takes pixels in [0, 1] to "
                            f"{reach:.3g} (at most {MAX_NORMALIZED:g}): mean and std are in "
                            f"units of the full pixel range, e.g. 0.485 and 0.229")


def train_transform(data_config: dict, aug):
    """timm's training transform for `data_config` with the augmentation of `aug` (AugSpec).

    Like timm's loader with its prefetcher, the transform stops at uint8 tensors: loader
    workers neither convert nor normalize, and pass a quarter of the bytes; `Normalize` does it
    for the whole batch, and random erasing (`batch_eraser`) follows it there.
    """
    config = dict(data_config, interpolation=aug.train_interpolation or data_config["interpolation"])
    try:
        return create_transform(
            **config, is_training=True, no_aug=aug.no_aug, scale=tuple(aug.scale),
            ratio=tuple(aug.ratio), hflip=aug.hflip, vflip=aug.vflip, color_jitter=aug.color_jitter,
            auto_augment=aug.aa, use_prefetcher=True)
    except (AssertionError, KeyError, ValueError) as exc:
        raise UserError(f"cannot build the training augmentation (--aa {aug.aa}, --scale, "
                        f"--ratio, --color-jitter): {type(exc).__name__} {exc}".rstrip()) from None


def batch_eraser(aug, device: torch.device) -> RandomErasing | None:
    """timm's random erasing of a normalized batch (--reprob), each image on its own draw."""
    if aug.no_aug or not aug.reprob:
        return None
    return RandomErasing(aug.reprob, mode=aug.remode, max_count=aug.recount, device=device)


def eval_transform(data_config: dict):
    """The evaluation transform, to uint8 tensors (see `train_transform` and `Normalize`)."""
    return create_transform(**data_config, is_training=False, use_prefetcher=True)


class Normalize:
    """uint8 image batches to the model's normalized float32 input, on the batch's device.

    ``(x - 255 * mean) / (255 * std)``: what a per-sample ToTensor and Normalize compute, as one
    operation per batch in the main process (timm's prefetcher does the same).
    """

    def __init__(self, mean, std, device: torch.device):
        shape = (1, -1, 1, 1)
        self.scale = torch.tensor([255.0 * s for s in std], device=device).view(shape)
        self.shift = torch.tensor([255.0 * m for m in mean], device=device).view(shape)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():  # already normalized (a caller's own transform)
            return images
        return images.float().sub_(self.shift).div_(self.scale)


def make_loader(dataset, batch_size: int, workers: int, seed: int, drop_last: bool = False,
                pin_memory: bool = False, sampler=None, shuffle: bool = False,
                persistent: bool = False) -> DataLoader:
    """A loader whose order comes from its sampler (or `seed`) alone. `persistent` keeps its
    worker processes from one pass to the next (the samples are seeded by their own key, so it
    does not matter which worker loads what)."""
    with _worker_count_said():
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, num_workers=workers, drop_last=drop_last,
                          pin_memory=pin_memory, worker_init_fn=_init_worker,
                          generator=loader_generator(seed),
                          persistent_workers=persistent and workers > 0)


@contextlib.contextmanager
def batches(loader):
    """Iterate `loader`; end its worker processes on an error (a reference to the iterator kept
    by the error's traceback would keep them running), and after the pass unless they persist."""
    with _worker_count_said():
        iterator = iter(loader)
    try:
        yield iterator
    except BaseException:
        end_workers(loader, iterator)
        raise
    if not loader.persistent_workers:
        end_workers(loader, iterator)


def end_workers(loader, iterator=None) -> None:
    """Shut the loader's worker processes down (if it has any running)."""
    iterator = iterator if iterator is not None else getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    if getattr(loader, "_iterator", None) is iterator:
        loader._iterator = None


def _init_worker(worker_id: int) -> None:
    in_loader_worker()
    seed_worker(worker_id)


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
