"""A run's splits read through timm's readers (`--dataset`, `data.readers`).

Map-style splits (an image-in-tar, torch/, hfds/) are read by index, so they go through the same
seeded samplers as an ImageFolder (`parts.TrainData`), and resume as exactly. Streams (wds/,
hfids/) are read shard by shard (`StreamData`): each rank and loader worker reads its own shards,
every rank runs the same steps, validation scores each sample once, and a resumed epoch goes on
from the stream's saved position (`data.readers.streams`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..data.folders import check_same_classes
from ..data.readers import (
    open_mapped,
    open_source,
    open_stream,
    split_path,
    stream_loader,
)
from ..data.readers.opening import check_distinct
from ..data.readers.spec import FOLDER, DatasetSpec
from ..data.readers.streams import ShardStream
from ..data.transforms import Normalize
from ..util.distributed import DistInfo
from ..util.errors import UserError


def reads_folders(spec: DatasetSpec) -> bool:
    """An ImageFolder run as train.py has always read it: a folder root whose splits are
    folders (not .tar files), with no --class-map. Anything else goes through the readers."""
    if spec.kind != FOLDER or spec.class_map or not Path(spec.root).is_dir():
        return False
    try:
        found = [split_path(spec.root, split, flag) for split, flag in
                 ((spec.train_split, "--train-split"), (spec.val_split, "--val-split"))]
    except UserError:
        return True  # the folder scan says what is missing, as it always has
    return all(path.is_dir() for path in found)


def mapped_splits(spec: DatasetSpec, num_classes: int | None):
    """The training and validation splits of a map-style dataset, with the same classes."""
    check_distinct(spec, spec.train_split, spec.val_split)
    mode = spec.img_mode()
    train = open_mapped(spec, spec.train_split, mode, num_classes, flag="--train-split")
    val = open_mapped(spec, spec.val_split, mode, num_classes or len(train.classes),
                      flag="--val-split")
    check_same_classes(train, val, f"{spec.dataset or spec.root} {spec.val_split}")
    return train, val


def stream_splits(spec: DatasetSpec, num_classes: int | None, dist: DistInfo, workers: int,
                  batch_size: int, val_batch: int, seed: int) -> tuple[ShardStream, ShardStream]:
    """This rank's training and validation streams."""
    mode = spec.img_mode()
    train_src = open_source(spec, spec.train_split, num_classes, flag="--train-split")
    val_src = open_source(spec, spec.val_split, num_classes or len(train_src.classes),
                          flag="--val-split")
    check_same_classes(train_src, val_src, f"{spec.dataset} {spec.val_split}")
    world, rank = dist.world_size, dist.rank
    train = open_stream(spec, train_src, spec.train_split, train=True, world=world, rank=rank,
                        workers=workers, batch_size=batch_size, seed=seed, mode=mode)
    val = open_stream(spec, val_src, spec.val_split, train=False, world=world, rank=rank,
                      workers=workers, batch_size=val_batch, seed=0, mode=mode)
    return train, val


@dataclass
class StreamData:
    """A stream's two splits, and the loaders of each epoch (`TrainData`'s face for streams).

    Its state (`state_dict`) is where the training stream stands: the epoch, the batches taken
    and each loader worker's position in its raw stream; a run resumed mid-epoch goes on from it.
    """
    train_stream: ShardStream
    val_stream: ShardStream
    data_config: dict
    batch_size: int
    val_batch_size: int
    pin_memory: bool
    steps_per_epoch: int  # optimizer steps
    world: int
    corrupt: str
    splits: tuple[str, str] = ("train", "validation")
    normalize: Normalize | None = None
    erase: object | None = None
    images_per_step: int | None = None  # as `parts.TrainData`'s: the settings' global batch
    warnings: list = field(default_factory=list)
    streaming = True
    _loaders: tuple | None = field(default=None, repr=False)
    _resume: dict | None = field(default=None, repr=False)

    @property
    def class_names(self) -> list[str]:
        return self.train_stream.classes

    @property
    def per_rank_samples(self) -> int:
        plan = self.train_stream.plan
        return plan.steps * plan.batch

    def counts(self) -> tuple[int, int | None]:
        """Training samples an epoch, and the validation split's size (None: unknown)."""
        return self.train_stream.plan.epoch_samples, self.val_stream.source.shards.total

    def start_lines(self) -> list[str]:
        return [self.train_stream.plan.line("training", self.splits[0]),
                self.val_stream.plan.line("validation", self.splits[1])]

    def set_transforms(self, train, evaluation) -> None:
        self.train_stream.transform, self.val_stream.transform = train, evaluation

    def loaders(self, epoch: int, start_batch: int, seed: int):
        """This epoch's loaders, training from batch `start_batch` (a resumed epoch)."""
        if self._loaders is None:
            self._loaders = (stream_loader(self.train_stream, seed, self.pin_memory),
                             stream_loader(self.val_stream, 0, self.pin_memory))
        train, val = self._loaders
        state = self._resume if start_batch else None
        if start_batch:
            self._check_resume(epoch, start_batch, state)
        train.set_epoch(epoch, start_batch, state)
        val.set_epoch(epoch)
        self._resume = None
        return train, val

    def _check_resume(self, epoch: int, start_batch: int, state: dict | None) -> None:
        if state is None or (state.get("epoch"), state.get("batches")) != (epoch, start_batch):
            raise UserError(f"{self.train_stream.plan.where}: the checkpoint does not hold the "
                            f"stream's position at epoch {epoch}, batch {start_batch}; resume "
                            f"from the checkpoint of an epoch's end")

    def _check_readers(self, state: dict) -> None:
        """A mid-epoch position is its readers': refused, before the run starts, for others."""
        plan, where = self.train_stream.plan, self.train_stream.plan.where
        then, now = (state.get("world"), state.get("workers")), (plan.world, plan.workers)
        if then != now:
            raise UserError(f"{where}: a stream resumes mid-epoch with the readers it had "
                            f"({then[0]} process(es) x {then[1]} loader worker(s), now {now[0]} "
                            f"x {now[1]}): give the same, or resume from the checkpoint of an "
                            f"epoch's end")
        if self.world > 1 and self.corrupt == "skip":
            # Each rank's position counts the samples it skipped; rank 0's alone is saved.
            raise UserError(f"{where}: under torchrun with --corrupt-samples skip a stream "
                            f"resumes at an epoch's end only (each process's position counts "
                            f"its own skipped samples); resume from the epoch's checkpoint")

    def state_dict(self) -> dict:
        if self._loaders is None:
            stream = self.train_stream
            return {"epoch": stream.epoch, "batches": 0, "positions": stream.positions(),
                    "workers": stream.plan.workers, "world": stream.plan.world}
        return self._loaders[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state.get("batches"):
            self._check_readers(state)
        self._resume = dict(state)

    def close(self) -> None:
        for loader in self._loaders or ():
            loader.close()
        self._loaders = None


def build_stream_data(spec: DatasetSpec, num_classes: int | None, dist: DistInfo, workers: int,
                      batch_size: int, val_batch: int, seed: int, accum_steps: int,
                      pin_memory: bool, warnings: list) -> StreamData:
    train, val = stream_splits(spec, num_classes, dist, workers, batch_size, val_batch, seed)
    steps = math.ceil(train.plan.steps / accum_steps)
    if train.plan.batch < batch_size:
        warnings.append(f"warning: -b {batch_size} is larger than the training stream's epoch "
                        f"({train.plan.batch} samples{' per process' if dist.world_size > 1 else ''}"
                        f"): every epoch is one step of {train.plan.batch}")
    return StreamData(train, val, {}, batch_size, val_batch, pin_memory, steps, dist.world_size,
                      spec.corrupt, (spec.train_split, spec.val_split),
                      warnings=[w for w in warnings if w])
