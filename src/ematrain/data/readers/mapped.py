"""Map-style splits (read by index): an image folder, an image-in-tar, a torchvision dataset, a
Hugging Face dataset. Each gives ``(image, label)`` by index, so the run's seeded samplers
(`data.SeededSamples`, `data.EpochSampler`) order and augment them, and resume stays exact.

The readers are timm's where timm has one (`ReaderImageInTar`, torchvision through
`timm.data.create_dataset`) and the Hugging Face one follows timm's `ReaderHfds` (same
`load_dataset` call, `image`/`label` keys, ClassLabel names as the classes); what is ours is the
decoding with --corrupt-samples and the one-line errors.
"""
from __future__ import annotations

import os
import tarfile

import numpy as np
import torch
from PIL import Image

from ...util.errors import UserError
from . import labels as lab
from .images import MAX_CONSECUTIVE, CorruptSample, SkipCount, corrupt_hint, decode


class MappedSplit(torch.utils.data.Dataset):
    """One split read by index: `classes`, `targets` (label of each index), `transform`."""

    def __init__(self, where: str, classes: list[str], targets, mode: str, corrupt: str):
        self.where, self.classes, self.targets = where, list(classes), list(targets)
        self.mode, self.corrupt = mode, corrupt
        self.transform = None
        self.skipped = SkipCount()

    def raw(self, index: int):
        """(image data: bytes, a file object, a path or a PIL image; where it is, for messages)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        # An unreadable sample under `skip` is replaced by the next one (a function of the data
        # alone, so a resumed run replaces it the same way); counted in `skipped`.
        first = None
        for attempt in range(MAX_CONSECUTIVE):
            data, where = self.raw(index)
            try:
                img = data.convert(self.mode) if isinstance(data, Image.Image) else decode(
                    data, self.mode, where)
                break
            except CorruptSample as exc:
                if self.corrupt == "stop":
                    raise UserError(corrupt_hint(str(exc))) from None
                first = first or str(exc)
                self.skipped.add()
                index = (index + 1) % len(self)
        else:
            raise UserError(f"{self.where}: {MAX_CONSECUTIVE} unreadable samples in a row, the "
                            f"first: {first}; the data is damaged")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def _mapped(where: str, found: list[str], targets, class_map: str, root) -> tuple[list, list, list]:
    """Classes, kept indices and their labels under --class-map (classes outside it are left
    out, as timm does), or the data's own classes."""
    targets = list(targets)
    if not class_map:
        return list(found), list(range(len(targets))), targets
    mapping = lab.load_class_map(lab.class_map_path(class_map, root))
    lab.check_named(mapping, found, class_map, where)
    new = [mapping.get(name, -1) for name in found]
    keep = [i for i, t in enumerate(targets) if new[t] >= 0]
    if not keep:
        raise UserError(f"{where}: no sample belongs to a class of --class-map {class_map}")
    return lab.names_in_order(mapping), keep, [new[targets[i]] for i in keep]


# ----------------------------------------------------------------------------- image folder
class FolderSplit(MappedSplit):
    """A split folder of class folders, found as train.py always found them
    (`data.load_image_folder`: hidden files skipped, link loops refused)."""

    def __init__(self, split_dir, mode: str, corrupt: str, class_map: str = "", root=None):
        from ..folders import (
            load_image_folder,  # the folder scan train.py has always used
        )

        folder = load_image_folder(split_dir)
        classes, keep, targets = _mapped(str(split_dir), folder.classes,
                                         [t for _, t in folder.samples], class_map, root)
        super().__init__(str(split_dir), classes, targets, mode, corrupt)
        self.samples = [(folder.samples[i][0], t) for i, t in zip(keep, targets)]

    def raw(self, index: int):
        path = self.samples[index][0]
        return path, path


# ----------------------------------------------------------------------------- image-in-tar
class TarSplit(MappedSplit):
    """A .tar of ``class/image`` members, read by timm's `ReaderImageInTar` (classes in timm's
    natural order: class_2 before class_10)."""

    def __init__(self, path, mode: str, corrupt: str, class_map: str = "", root=None):
        from timm.data.readers.reader_image_in_tar import ReaderImageInTar

        try:
            reader = ReaderImageInTar(str(path))
        except tarfile.TarError as exc:
            raise UserError(f"cannot read tar {path}: {exc}") from None
        except ValueError:  # timm's unpacking of an empty sample list
            raise UserError(f"tar {path} holds no images (looked for .jpg, .png, ...)") from None
        found = [name for name, _ in sorted(reader.class_name_to_idx.items(), key=lambda x: x[1])]
        classes, keep, targets = _mapped(str(path), found, reader.targets.tolist(), class_map, root)
        super().__init__(str(path), classes, targets, mode, corrupt)
        self.reader, self.keep, self._pid = reader, np.asarray(keep), os.getpid()

    def raw(self, index: int):
        if self._pid != os.getpid():
            self._forget_handles()
        i = int(self.keep[index])
        member = self.reader.samples[i][0].name
        try:
            fileobj, _ = self.reader[i]
            return fileobj.read(), f"{self.where}:{member}"
        except (tarfile.TarError, OSError) as exc:
            return b"", f"{self.where}:{member} ({exc})"  # decoding b"" reports it

    def _forget_handles(self) -> None:
        """timm's reader keeps its open tar files; a loader worker forked after the main process
        read a sample must open its own (a shared file offset mixes up reads)."""
        states = ([self.reader.tar_state] if self.reader.root_is_tar
                  else list(self.reader.tar_state.values()))
        for state in states:
            state.reset()
            for child in state.children.values():
                child.reset()
        self._pid = os.getpid()


# ----------------------------------------------------------------------------- torchvision
def torch_split_name(name: str, split: str, flag: str) -> str:
    """timm maps train synonyms to the train set and anything else to the test set of the basic
    datasets; we refuse a split name that is neither, rather than read the test set for it."""
    basic = ("cifar10", "cifar100", "mnist", "kmnist", "fashion_mnist", "qmnist")
    from .spec import EVAL_SPLITS, TRAIN_SPLITS
    if name in basic and split not in TRAIN_SPLITS + EVAL_SPLITS + ("test",):
        raise UserError(f"{flag} {split}: torch/{name} has a train split ({', '.join(TRAIN_SPLITS)}"
                        f") and a test split ({', '.join(EVAL_SPLITS)}, test)")
    return split


class TorchSplit(MappedSplit):
    """A torchvision dataset as timm's create_dataset builds it (``torch/<name>``)."""

    def __init__(self, name: str, root, split: str, mode: str, corrupt: str, download: bool,
                 flag: str = "--val-split"):
        from timm.data import create_dataset

        where = f"torch/{name} in {root}"
        try:
            ds = create_dataset(f"torch/{name}", root=root, split=torch_split_name(name, split, flag),
                                download=download)
        except RuntimeError as exc:
            if "download=True" in str(exc) and not download:
                raise UserError(f"{where}: not there; give --dataset-download to fetch it "
                                f"(nothing is downloaded without it)") from None
            raise UserError(f"{where}: {str(exc)[:160]}") from None
        except (FileNotFoundError, ValueError, AssertionError) as exc:
            raise UserError(f"{where} ({flag} {split}): {str(exc)[:160]}") from None
        classes = list(getattr(ds, "classes", None) or [])
        targets = [int(t) for t in getattr(ds, "targets", [])]
        if not classes or len(targets) != len(ds):
            raise UserError(f"{where}: torchvision gives no class list or labels for it")
        super().__init__(where, classes, targets, mode, corrupt)
        self.dataset = ds

    def raw(self, index: int):
        return self.dataset[index][0], f"{self.where}[{index}]"
