"""Opening one split of a `DatasetSpec`: a map-style split (folder, tar, torch/, hfds/) or a
stream's source (wds/, hfids/), and a stream with its loader for a rank.

Builders take explicit values (the split, the image mode, the world), never the Namespace.
"""
from __future__ import annotations

import os
from pathlib import Path

from ...util.errors import UserError
from . import spec as S
from .labels import ValueLabels
from .mapped import FolderSplit, MappedSplit, TarSplit, TorchSplit
from .streams import ShardStream, StreamLoader, StreamPlan

SPLIT_ALIASES = {"val": "validation", "validation": "val"}


def split_path(root: str, split: str, flag: str) -> Path:
    """A folder split's source: `root` itself when it is a .tar, else ``root/<split>`` as a folder
    or a .tar, accepting 'val' for 'validation' (and the reverse)."""
    path = Path(root)
    if path.is_file():
        if path.suffix.lower() != ".tar":
            raise UserError(f"data root {root} is a file but not a .tar of images")
        return path
    if not path.is_dir():
        raise UserError(f"data root not found: {root}")
    for name in (split, SPLIT_ALIASES.get(split)):
        if name and (path / name).is_dir():
            return path / name
        if name and (path / f"{name}.tar").is_file():
            return path / f"{name}.tar"
    raise UserError(f"{flag} {split}: not found: no folder {path / split} "
                    f"(nor {split}.tar{', ' + SPLIT_ALIASES[split] if split in SPLIT_ALIASES else ''})")


def open_mapped(spec: S.DatasetSpec, split: str, mode: str, num_classes: int | None = None,
                flag: str = "--val-split") -> MappedSplit:
    """A map-style split: read by index, ordered by the run's samplers."""
    if spec.kind == S.FOLDER:
        source = split_path(spec.root, split, flag)
        kind = TarSplit if source.is_file() else FolderSplit
        return kind(source, mode, spec.corrupt, spec.class_map, spec.root)
    if spec.kind == S.TORCH:
        if spec.name in ("folder", "image_folder"):
            folder = split_path(spec.root, split, flag)
            if folder.is_file():
                raise UserError(f"--dataset torch/{spec.name} reads folders; {folder} is a .tar "
                                f"(leave --dataset empty for timm's tar reader)")
            return TorchSplit(spec.name, str(folder.parent), folder.name, mode, spec.corrupt,
                              False, flag)
        return TorchSplit(spec.name, spec.root, split, mode, spec.corrupt, spec.download, flag)
    if spec.kind == S.HFDS:
        from .hf import HfdsSplit
        return HfdsSplit(spec, split, mode, num_classes, flag)
    raise ValueError(f"{spec.kind} is a stream; use open_source")


def open_source(spec: S.DatasetSpec, split: str, num_classes: int | None = None,
                flag: str = "--val-split"):
    """A stream's shards and decoding (`WdsSource` or `HfidsSource`)."""
    if spec.kind == S.WDS:
        from .shards import WdsSource, shard_list
        shards = shard_list(spec.root, split, flag)
        given = spec.num_samples(split)
        if given is not None:
            shards.total = given
        where = f"--dataset {spec.dataset} {flag} {split}"
        labels = ValueLabels(spec.class_map, spec.root, num_classes, where)
        return WdsSource(shards, labels, spec.input_key, spec.target_key, spec.corrupt, where)
    if spec.kind == S.HFIDS:
        from .hfstream import HfidsSource
        return HfidsSource(spec, split, flag, num_classes)
    raise ValueError(f"{spec.kind} is read by index; use open_mapped")


def epoch_samples(spec: S.DatasetSpec, source, split: str) -> int:
    """A training stream's epoch: --train-num-samples or the metadata's count, times
    --epoch-repeats (timm: at least one pass)."""
    total = source.shards.total
    if not total:
        raise UserError(f"--dataset {spec.dataset} {split}: the training split's size is unknown "
                        f"(no count in the shard metadata); give --train-num-samples N "
                        f"(or a pattern with '|N', or an _info.json with shard_lengths)")
    return max(1, round(max(1.0, spec.epoch_repeats) * total))


def open_stream(spec: S.DatasetSpec, source, split: str, *, train: bool, world: int, rank: int,
                workers: int, batch_size: int, seed: int, mode: str) -> ShardStream:
    where = f"--dataset {spec.dataset} split {split}"
    plan = StreamPlan(source.num_shards, world, workers, batch_size,
                      epoch_samples(spec, source, split) if train else None, train, where)
    return ShardStream(source, plan, rank, seed, mode, spec.corrupt)


def stream_loader(stream: ShardStream, seed: int, pin_memory: bool = False) -> StreamLoader:
    """The stream's loader: its workers persist from epoch to epoch (the epoch reaches them
    through shared memory)."""
    from ..loaders import make_loader
    loader = make_loader(stream, stream.plan.batch, stream.plan.loader_workers, seed,
                         pin_memory=pin_memory, persistent=True)
    return StreamLoader(stream, loader)


def check_distinct(spec: S.DatasetSpec, train_split: str, val_split: str) -> None:
    """train.py: a .tar root holds one split, which timm would read for both."""
    if spec.kind == S.FOLDER and spec.root and os.path.isfile(spec.root):
        raise UserError(f"data root {spec.root} is one .tar, which would be both {train_split} and "
                        f"{val_split}; give a folder holding {train_split}.tar and {val_split}.tar "
                        f"(a .tar root suits validate.py)")

