"""A training run's parts: `Run`, built once from its settings by `build.build_run`, and its
data (`TrainData`).

`Run.parts` names the stateful parts, each with ``state_dict()`` / ``load_state_dict()``; the
checkpoint schema (`checkpoint.schema`) alone maps them to a checkpoint's keys.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.data import AugMixDataset, Mixup
from timm.data.scheduled_sampler import ScheduledTransformDataset
from torch import nn

from ..data.loaders import end_workers, make_loader
from ..data.samplers import EpochSampler, EpochTagged, SeededSamples
from ..data.transforms import Normalize
from ..ema.collection import EmaCollection
from ..ema.horizons import RunLength
from ..ema.policies import ShadowPolicy
from ..posthoc.schedule import SnapshotSchedule
from ..posthoc.snapshots import snapshot_record
from ..settings.model_specs import Precision
from ..settings.train_specs import TrainSettings
from ..trackers import Trackers
from ..util.distributed import DistInfo
from ..util.modules import unwrap_model
from .keeper import CheckpointKeeper
from .loop import Counters
from .summary import Summary
from .weight_sets import WeightSet, ema_labels, regular_emas


def base_samples(dataset):
    """The data set under the training wrappers: seeded samples, timm's AugMixDataset views
    (--aug-splits), its ScheduledTransformDataset sizes (--train-img-sizes)."""
    while isinstance(dataset, (SeededSamples, AugMixDataset, ScheduledTransformDataset)):
        dataset = dataset.dataset
    return dataset


@dataclass
class TrainData:
    """The two splits, their samplers, and the loaders of each epoch."""
    train_set: SeededSamples
    val_set: object
    sampler: EpochSampler
    val_sampler: EpochSampler
    data_config: dict
    batch_size: int
    val_batch_size: int
    workers: int
    pin_memory: bool
    drop_last: bool
    steps_per_epoch: int  # optimizer steps
    normalize: Normalize | None = None  # the loaders give uint8 images
    erase: object | None = None         # random erasing of the normalized batch
    collate: object | None = None       # --aug-splits: timm's fast_collate, split-major
    batch_sampler: object | None = None  # --train-img-sizes: `data.sized_batches.SizedBatches`
    naflex: object | None = None        # --naflex-loader: `data.naflex.NaFlexBatches`
    val_collate: object | None = None   # --naflex-loader: timm's NaFlex collate
    # --naflex-loader: images per optimizer step over all processes, on average over the epoch
    # (its batches hold more images at shorter sequences); None: the settings' global batch.
    images_per_step: int | None = None
    warnings: list = field(default_factory=list)  # said when training starts
    _loaders: tuple | None = field(default=None, repr=False)

    streaming = False

    @property
    def class_names(self) -> list[str]:
        return base_samples(self.train_set).classes

    @property
    def per_rank_samples(self) -> int:
        return len(self.sampler)

    def counts(self) -> tuple[int, int]:
        """Training and validation images."""
        return len(self.train_set), len(self.val_set)

    def start_lines(self) -> list[str]:
        return []

    def set_transforms(self, train, evaluation) -> None:
        self.train_set.dataset.transform, self.val_set.transform = train, evaluation

    def loaders(self, epoch: int, start_batch: int, seed: int):
        """This epoch's loaders; training starts at batch `start_batch` (resume). They are made
        once and keep their worker processes from epoch to epoch."""
        # The epoch's order and augmentation depend only on (seed, epoch): that makes resume exact.
        self.train_set.set_epoch(epoch)
        if self.naflex is not None:  # whole batches of its own schedule, counted as such
            self.naflex.set_epoch(epoch, start=start_batch)
        elif self.batch_sampler is not None:  # its batches are counted, not its images
            self.batch_sampler.set_epoch(epoch, start=start_batch)
        else:
            self.sampler.set_epoch(epoch, start=start_batch * self.batch_size)
        if self._loaders is None:
            sampler = None if self.batch_sampler is not None else EpochTagged(self.sampler)
            if self.naflex is not None:
                train = make_loader(self.naflex, None, self.workers, seed=seed,
                                    pin_memory=self.pin_memory, persistent=True)
            else:
                train = make_loader(self.train_set, self.batch_size, self.workers, seed=seed,
                                    drop_last=self.drop_last, pin_memory=self.pin_memory,
                                    sampler=sampler, persistent=True, collate_fn=self.collate,
                                    batch_sampler=self.batch_sampler)
            val = make_loader(self.val_set, self.val_batch_size, self.workers, seed=0,
                              pin_memory=self.pin_memory, sampler=self.val_sampler,
                              persistent=True, collate_fn=self.val_collate)
            self._loaders = (train, val)
        return self._loaders

    def close(self) -> None:
        """End the loaders' worker processes."""
        for loader in self._loaders or ():
            end_workers(loader)
        self._loaders = None


def images_per_step(data, settings: TrainSettings, world_size: int) -> int:
    """Images per optimizer step, the unit of EMA horizons and intervals stated in images: what
    the data counts (NaFlex batches), else the settings' global batch."""
    return data.images_per_step or settings.global_batch(world_size)


@dataclass
class Run:
    """One training run's parts, built once from its settings."""
    settings: TrainSettings
    dist: DistInfo
    device: torch.device
    precision: Precision
    data: TrainData  # or a stream's `datasets.StreamData`
    num_classes: int
    model: nn.Module          # what trains, possibly wrapped in DDP and torch.compile: the
    #                           model, or with feature distillation the student and projection
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    num_epochs: int
    lr: float
    scaler: torch.amp.GradScaler | None
    emas: EmaCollection       # every EMA: the regular shadows and the post-hoc power EMAs
    snapshots: SnapshotSchedule | None  # when the post-hoc power EMAs are snapshotted
    loss_fn: nn.Module
    mixup_fn: Mixup | None
    weight_sets: tuple[WeightSet, ...]
    keeper: CheckpointKeeper
    shadow_policy: ShadowPolicy = field(default_factory=ShadowPolicy)
    counters: Counters = field(default_factory=Counters)
    # --kd-model-name: the loss of each step (timm's distillation task around the student);
    # `module` is the student, which every EMA averages and every checkpoint holds.
    distill: object | None = None
    summary: Summary = None
    trackers: Trackers = field(default_factory=Trackers)  # W&B, TensorBoard (`tracking`)
    # Who the run is: drawn at a fresh start, kept by every resume, in every checkpoint and
    # post-hoc snapshot (None: resumed from a checkpoint written before run ids).
    run_id: str | None = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self):
        if self.summary is None:
            self.summary = Summary(self.weight_sets)
        self.counters.world_size = self.dist.world_size

    @property
    def module(self) -> nn.Module:
        """The plain model inside any DDP / torch.compile wrapper (with distillation: the
        student, what the EMAs average and checkpoints hold)."""
        return self.distill.student if self.distill is not None else unwrap_model(self.model)

    @property
    def eval_model(self) -> nn.Module:
        """What validation scores as the raw weights: `model` when it is the model (in its
        wrappers), the plain student when it trains beside a projection (its forward gives
        features too)."""
        return self.model if unwrap_model(self.model) is self.module else self.module

    @property
    def decays(self) -> list[float]:
        """The regular EMA's decays (sigma_rels under the power schedule); none without one."""
        return self.emas.regular.decays if self.emas.regular is not None else []

    def parts(self) -> dict:
        """The stateful parts, by the name the checkpoint schema gives their owner."""
        parts = {"model": self.module, "optimizer": self.optimizer, "scheduler": self.scheduler,
                 "amp_scaler": self.scaler, "emas": self.emas if self.emas else None,
                 "snapshots": self.snapshots, "counters": self.counters,
                 "keeper": self.keeper, "summary": self.summary,
                 "data_stream": self.data if self.data.streaming else None,
                 "task_state": self.distill if self.distill and self.distill.holds_state
                 else None,
                 "trackers": self.trackers if self.trackers.spec.any else None}
        return {name: part for name, part in parts.items() if part is not None}

    def replica_modules(self) -> list[nn.Module]:
        """The model and every shadow: what each torchrun process holds its own copy of."""
        self.emas.wait()
        return [self.module] + self.emas.shadows

    def record(self) -> dict:
        """The run's settings as a plain dict (args.yaml, a checkpoint's `args`)."""
        record = dict(vars(self.settings.args))
        # Absolute, so `-c args.yaml` and `--resume PATH` work from any directory.
        for key in ("data_dir", "initial_checkpoint", "pretrained_path", "class_map",
                    "log_tensorboard", "kd_pretrained_path"):
            if record.get(key) and (key != "class_map" or Path(record[key]).is_file()):
                record[key] = str(Path(record[key]).resolve())
        kind, _, name = str(record.get("dataset") or "").partition("/")
        if kind.lower() in ("hfds", "hfids") and name and Path(name).exists():  # a local folder
            record["dataset"] = f"{kind}/{Path(name).resolve()}"
        return record

    def images_per_step(self) -> int:
        return images_per_step(self.data, self.settings, self.dist.world_size)

    def length(self) -> RunLength:
        """The run's length, in the units EMA horizons are stated in."""
        steps = self.data.steps_per_epoch
        return RunLength(steps, steps * self.num_epochs, self.images_per_step())

    def ema_labels(self) -> list[str]:
        return ema_labels(self.settings.ema, self.decays)

    def ema_names(self) -> list[str]:
        """Each EMA's name as logs and summary.csv give it (``0.99``, ``hl2ep``, ``sr0.1``)."""
        return [s.name.removeprefix("ema ") for s in regular_emas(self.weight_sets)]

    def take_snapshot(self) -> None:
        """The post-hoc snapshot of this optimizer step, when it is one of the series'."""
        if self.snapshots is not None:
            self.snapshots.take(self.counters.num_updates, lambda: snapshot_record(self),
                                self.keeper)
