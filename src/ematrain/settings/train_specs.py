"""train.py's settings: the loop and device specs, `TrainSettings` (every spec of a run), and
their resolution, once, from the command line, its `-c` recipe and, with --resume, the
checkpoint's recorded settings through the resume policy (`resolve_train`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from ..data.augmix import check_splits
from ..data.readers.spec import FOLDER, DatasetSpec
from ..trackers.spec import TrackerSpec
from ..util.distributed import device_named
from ..util.errors import UserError
from ..util.runtime import import_device_modules
from .checks import at_least, from_args
from .data_specs import (
    AugSpec,
    DataSpec,
    ImageSpec,
    LabelSpec,
    LoaderSpec,
    NaflexSpec,
    SizeSpec,
    dataset_spec,
)
from .ema_specs import EmaSpec, PosthocSpec
from .flags import train_parser
from .layers import Layer, parse_command
from .model_specs import DistillSpec, ModelSpec, OptimSpec, PrecisionSpec, ScheduleSpec
from .resume_policy import ResumeSource, apply_to_settings, find_checkpoint, open_source
from .tracker_specs import tracker_spec

_DIST_BACKENDS = ("nccl", "gloo", "mpi", "ucc")


@dataclass(frozen=True)
class LoopSpec:
    """The epoch loop: seeding, read-outs, non-finite steps, checkpoints and the run folder."""
    seed: int
    log_interval: int
    skip_nonfinite: int
    recovery_interval: int
    checkpoint_hist: int
    eval_metric: str
    primary_weights: str
    output: str
    experiment: str
    resume: str
    no_resume_opt: bool
    start_epoch: int | None = None
    val_interval: int = 1
    save_images: bool = False

    def __post_init__(self):
        at_least(self, 1, "log_interval", "checkpoint_hist", "val_interval")
        at_least(self, 0, "start_epoch")
        if not 0 <= self.seed < 2**32:  # numpy's generators take no other seed
            raise UserError(f"--seed must be in [0, 2**32 - 1], got {self.seed}")
        at_least(self, 0, "skip_nonfinite", "recovery_interval")
        name = self.experiment
        if name and (Path(name).name != name or name in (".", "..") or "\\" in name):
            raise UserError(f"--experiment {name!r} must be a folder name, not a path: runs go to "
                            f"<--output>/<--experiment>")


@dataclass(frozen=True)
class DistSpec:
    """Device and torchrun settings."""
    device: str | None
    dist_backend: str | None
    dist_bn: str
    sync_bn: bool
    no_ddp_bb: bool = False
    synchronize_step: bool = False
    local_rank: int = 0
    device_modules: list | None = None

    def __post_init__(self):
        import_device_modules(self.device_modules)  # before a device of theirs is named
        if self.device:
            device_named(self.device)  # whether this machine has it: when the run starts
        if self.dist_backend and self.dist_backend not in _DIST_BACKENDS:
            raise UserError(f"--dist-backend must be one of {', '.join(_DIST_BACKENDS)}, got "
                            f"{self.dist_backend!r}")


@dataclass(frozen=True)
class TrainSettings:
    """Everything train.py was asked for, checked; `args` is the flat record of it."""
    args: argparse.Namespace
    data: DataSpec
    dataset: DatasetSpec
    loader: LoaderSpec
    image: ImageSpec
    model: ModelSpec
    aug: AugSpec
    labels: LabelSpec
    optim: OptimSpec
    schedule: ScheduleSpec
    precision: PrecisionSpec
    ema: EmaSpec
    posthoc: PosthocSpec
    loop: LoopSpec
    dist: DistSpec
    trackers: TrackerSpec
    distill: DistillSpec = field(default_factory=DistillSpec)
    sizes: SizeSpec = field(default_factory=SizeSpec)
    naflex: NaflexSpec = field(default_factory=NaflexSpec)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "TrainSettings":
        specs = {"data": DataSpec, "loader": LoaderSpec, "image": ImageSpec, "model": ModelSpec,
                 "aug": AugSpec, "labels": LabelSpec, "optim": OptimSpec, "schedule": ScheduleSpec,
                 "precision": PrecisionSpec, "loop": LoopSpec, "dist": DistSpec,
                 "distill": DistillSpec, "sizes": SizeSpec, "naflex": NaflexSpec}
        built = {name: from_args(spec, ns) for name, spec in specs.items()}
        trackers = tracker_spec(vars(ns), resuming=bool(ns.resume))
        settings = cls(args=ns, ema=EmaSpec.from_args(ns), posthoc=PosthocSpec.from_args(ns),
                       dataset=dataset_spec(ns), trackers=trackers, **built)
        _check_naflex(settings)
        if settings.labels.mixing and settings.loader.batch_size % 2 and not settings.naflex.enabled:
            raise UserError(f"mixup/cutmix need an even --batch-size, got "
                            f"{settings.loader.batch_size}")
        if settings.dataset.kind == FOLDER:
            _output_outside_splits(settings.loop.output, settings.data)
        if settings.dataset.streaming:
            _stream_checks(settings)
        a = settings.aug
        check_splits(a.aug_splits, a.jsd_loss, a.split_bn, a.resplit, settings.labels.mixing,
                     a.no_aug)
        _check_sizes(settings)
        if (a.aug_splits or settings.sizes.enabled) and settings.ema.bn == "recalibrate":
            raise UserError("--model-ema-bn recalibrate draws training batches of one kind; "
                            "with --aug-splits or --train-img-sizes use average or copy")
        start = settings.loop.start_epoch
        if start is not None and start >= settings.schedule.epochs:
            raise UserError(f"--start-epoch {start} is not before the run's end (--epochs "
                            f"{settings.schedule.epochs})")
        return settings

    @property
    def batch_size(self) -> float:
        """Images per batch: -b, or with --train-img-sizes timm's policy-average batch."""
        if self.sizes.enabled:
            return self.sizes.average_batch(self.loader.batch_size)
        return self.loader.batch_size

    def global_batch(self, world_size: int = 1) -> int:
        """Images per optimizer step: processes x batch size x accumulation."""
        return round(world_size * self.batch_size * self.optim.grad_accum_steps)

    def lr(self, world_size: int = 1) -> float:
        """The global learning rate (--lr, or --lr-base scaled by the global batch)."""
        return self.optim.lr_for(self.global_batch(world_size))


def _check_sizes(s: "TrainSettings") -> None:
    """Variable-size training's combinations that cannot work (timm asserts the first)."""
    if not s.sizes.enabled:
        return
    if s.aug.aug_splits:
        raise UserError("--train-img-sizes and --aug-splits: timm's variable-size batches take "
                        "one view per image; give one of them")
    batches = s.sizes.choices(s.loader.batch_size).batch_sizes
    if s.labels.mixing and any(b % 2 for b in batches):
        raise UserError(f"mixup/cutmix need even batches, got --train-batch-sizes "
                        f"{' '.join(map(str, batches))}")


def _check_naflex(s: TrainSettings) -> None:
    """What NaFlex training cannot be combined with (timm refuses or asserts the first four),
    each with its reason."""
    if not s.naflex.enabled:
        return
    schedule = "the NaFlex stream draws each epoch's batches by its own schedule"
    refused = (
        ("--train-img-sizes", s.sizes.enabled, "both are batch schedules (timm: alternatives)"),
        ("--aug-splits", s.aug.aug_splits, "a patch batch holds one view of each image"),
        ("--no-aug", s.aug.no_aug,
         "timm's NaFlex training transform has no plain path (timm ignores --no-aug there)"),
        ("--aug-repeats", s.data.aug_repeats, schedule),
        ("--use-multi-epochs-loader", s.data.use_multi_epochs_loader, schedule),
        ("--kd-model-name", s.distill.enabled,
         "timm's teachers take image tensors, not patch sequences"),
        ("--save-images", s.loop.save_images, "a patch batch is no image grid"),
        ("--model-ema-bn recalibrate", s.ema.bn == "recalibrate",
         "recalibration draws image batches"),
        ("--cutmix-minmax", s.labels.cutmix_minmax is not None,
         "timm's NaFlexMixup has no such bounds"),
        (f"--mixup-mode {s.labels.mixup_mode}", s.labels.mixup_mode != "batch",
         "timm's NaFlexMixup mixes per pair of images (--mixup-mode batch)"),
        (f"--dataset {s.dataset.dataset}", s.dataset.streaming,
         "the NaFlex stream reads a map-style data set by index"))
    for flag, on, why in refused:
        if on:
            raise UserError(f"--naflex-loader with {flag}: {why}; give one of the two")


def _stream_checks(s: TrainSettings) -> None:
    """What needs a map-style dataset (read by index), refused for a stream."""
    where = f"--dataset {s.dataset.dataset} is a stream, read shard by shard"
    if s.data.aug_repeats:
        raise UserError(f"--aug-repeats repeats samples by index; {where} (use --epoch-repeats "
                        f"for longer epochs)")
    if s.ema.bn == "recalibrate":
        raise UserError(f"--model-ema-bn recalibrate draws training images by index; {where} "
                        f"(use --model-ema-bn average or copy)")
    if s.aug.aug_splits or s.sizes.enabled:
        raise UserError(f"--aug-splits and --train-img-sizes draw samples by index; {where}")


def _output_outside_splits(output: str, spec: DataSpec) -> None:
    """Runs written inside a split would be read as one more class folder of it."""
    runs = Path(output or Path("output") / "train").resolve()
    aliases = {"val": "validation", "validation": "val"}
    for split in (spec.train_split, spec.val_split):
        for name in {split, aliases.get(split, split)}:
            folder = (Path(spec.data_dir) / name).resolve()
            if runs == folder or folder in runs.parents:
                raise UserError(f"--output {runs} is inside the data's {name} split ({folder}): "
                                f"its runs would be read as a class folder; write them elsewhere")


# ----------------------------------------------------------------------------- resolution
def train_settings(argv: list[str]) -> TrainSettings:
    """train.py's settings from the command line and its `-c` recipe (no resume)."""
    return TrainSettings.from_args(parse_command(train_parser, [str(a) for a in argv]))


def resolve_train(argv: list[str]) -> tuple[TrainSettings, ResumeSource | None]:
    """train.py's settings, resolved once: with --resume, the checkpoint's recorded settings
    under the recipe and the command line, through the resume policy."""
    argv = [str(a) for a in argv]
    ns = parse_command(train_parser, argv)
    path = find_checkpoint(ns.resume, ns.output, ns.experiment, ns.model)
    if path is None:
        return TrainSettings.from_args(ns), None
    source = open_source(path)
    if source.recorded is not None:
        ns = parse_command(train_parser, argv, below=[Layer(f"checkpoint {path}", source.recorded)])
    apply_to_settings(ns, source)
    return TrainSettings.from_args(ns), source
