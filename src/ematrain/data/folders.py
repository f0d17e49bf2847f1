"""ImageFolder splits, timm transforms and seeded data loaders."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..util.errors import UserError
from ..util.logs import log

# 16-bit grayscale modes: PIL's convert("RGB") clips them at 255 (a white image).
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


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
