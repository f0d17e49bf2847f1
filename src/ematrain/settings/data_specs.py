"""What goes in: `ImageSpec` (evaluation geometry and normalisation, shared with validate.py),
`LoaderSpec` (batch size, loader processes, also shared), `DataSpec` (the splits), `AugSpec`
(training augmentation) and `LabelSpec` (mixup/cutmix, smoothing, BCE)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..data.readers.spec import DatasetSpec, resolve_dataset
from ..data.sized_batches import SizeChoices
from ..util.errors import UserError
from ..util.logs import plural
from .checks import at_least, flag_of, within

# No timm model takes inputs larger than this; a bigger size only exhausts memory.
MAX_IMAGE_SIZE = 4096
# timm's evaluation crop modes (validate.py --crop-mode).
CROP_MODES = ("center", "squash", "border")
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# The random-resized crop's aspect ratios (width / height) a flag may ask for.
MAX_RATIO = 100.0
# Color jitter factors up to 1 + this: far beyond, every image is black or white (and torch
# cannot draw a factor past float32's range).
MAX_JITTER = 100.0


# ----------------------------------------------------------------------------- shared specs
@dataclass(frozen=True)
class ImageSpec:
    """The evaluation image geometry and normalisation (timm's data config overrides)."""
    img_size: int | None = None
    input_size: list | None = None
    crop_pct: float | None = None
    mean: list | None = None
    std: list | None = None
    interpolation: str = ""

    def __post_init__(self):
        for dest in ("img_size", "input_size"):
            sizes = getattr(self, dest)
            sizes = [sizes] if isinstance(sizes, int) else (sizes or [])
            for size in sizes[-2:] if dest == "input_size" else sizes:
                if not 1 <= size <= MAX_IMAGE_SIZE:
                    raise UserError(f"{flag_of(self, dest)} must be between 1 and "
                                    f"{MAX_IMAGE_SIZE} pixels, got {size}")
        if self.input_size is not None and self.input_size[0] != 3:
            raise UserError(f"--input-size: ImageFolder images are loaded as RGB, so the first "
                            f"value (channels) must be 3, got {self.input_size[0]}")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise UserError(f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        for dest in ("mean", "std"):
            value = getattr(self, dest)
            if value is not None and len(value) not in (1, 3):
                raise UserError(f"--{dest} takes 1 or 3 values (RGB), got {len(value)}")
        if self.std is not None and not all(s > 0 for s in self.std):
            # Each channel is divided by its std: 0 makes every input (and the loss) non-finite.
            raise UserError(f"--std values must be > 0, got {' '.join(f'{s:g}' for s in self.std)}")
        if self.interpolation not in ("",) + _INTERPOLATIONS:
            raise UserError(f"--interpolation must be one of {', '.join(_INTERPOLATIONS)}, "
                            f"got {self.interpolation!r}")

    def overrides(self) -> dict:
        """What timm's resolve_data_config takes from the user."""
        return {"img_size": self.img_size, "input_size": self.input_size, "crop_pct": self.crop_pct,
                "mean": self.mean, "std": self.std, "interpolation": self.interpolation}


@dataclass(frozen=True)
class LoaderSpec:
    """Batch size and loader processes (`workers` None: as many as `available_cores` allow)."""
    batch_size: int | None
    workers: int | None

    def __post_init__(self):
        at_least(self, 1, "batch_size")
        at_least(self, 0, "workers")

    def workers_per_process(self, local_processes: int = 1) -> int:
        """timm's 4 loader processes, fewer where the cores this process may use are fewer
        (more workers than cores only add switching, and torch warns about it)."""
        if self.workers is not None:
            return self.workers
        return max(1, min(4, available_cores() // max(1, local_processes)))

    def too_many_workers(self, local_processes: int = 1) -> str | None:
        """A warning when -j asks for more loader processes than there are cores."""
        cores = available_cores()
        total = self.workers_per_process(local_processes) * max(1, local_processes)
        if total <= cores:
            return None
        return (f"warning: -j {self.workers} starts {total} loader processes on "
                f"{plural(cores, 'core')}: they will compete with training (-j {max(1, cores // local_processes)} "
                "or leave -j out to pick it from the cores)")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity, which containers and taskset set)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------- train specs
@dataclass(frozen=True)
class DataSpec:
    """Where the splits are and how they are batched (how they are read: `dataset_spec`)."""
    data_dir: str | None
    train_split: str
    val_split: str
    validation_batch_size: int | None
    aug_repeats: float
    dataset: str = ""
    worker_seeding: str = "all"
    use_multi_epochs_loader: bool = False

    def __post_init__(self):
        if self.worker_seeding != "all":
            # Every sample is seeded from (seed, epoch, index) in whichever worker loads it.
            raise UserError(f"--worker-seeding {self.worker_seeding}: every sample here is "
                            f"seeded from the seed, epoch and its index, which is timm's 'all' "
                            f"and more; no other seeding is offered")
        if not self.data_dir and not self.dataset:
            raise UserError("no data root given: train.py DIR (with DIR/train and DIR/val)")
        at_least(self, 1, "validation_batch_size")
        repeats = self.aug_repeats
        if not (repeats >= 0 and repeats == int(repeats)):
            raise UserError(f"--aug-repeats must be a whole number >= 0, got {repeats:g}")


@dataclass(frozen=True)
class AugSpec:
    """Training augmentation (timm's create_transform) and repeated augmentation."""
    no_aug: bool
    scale: list
    ratio: list
    train_interpolation: str
    hflip: float
    vflip: float
    color_jitter: float
    aa: str | None
    reprob: float
    remode: str
    recount: int
    train_crop_mode: str | None = None
    color_jitter_prob: float | None = None
    grayscale_prob: float | None = None
    gaussian_blur_prob: float | None = None
    aug_splits: int = 0
    jsd_loss: bool = False
    resplit: bool = False
    split_bn: bool = False

    CROP_MODES = ("rrc", "rkrc", "rkrr")

    def __post_init__(self):
        within(self, 0.0, 1.0, "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob")
        if self.train_crop_mode not in (None, "") + self.CROP_MODES:
            raise UserError(f"--train-crop-mode must be one of {', '.join(self.CROP_MODES)}, "
                            f"got {self.train_crop_mode!r}")
        for dest in ("scale", "ratio"):
            if len(getattr(self, dest)) != 2:
                raise UserError(f"--{dest} takes MIN MAX (2 values), got "
                                f"{len(getattr(self, dest))}")
        if self.train_interpolation not in ("", "random") + _INTERPOLATIONS:
            raise UserError(f"--train-interpolation must be random or one of "
                            f"{', '.join(_INTERPOLATIONS)}, got {self.train_interpolation!r}")
        within(self, 0.0, 1.0, "hflip", "vflip", "reprob")
        at_least(self, 1, "recount")
        if not 0 <= self.color_jitter <= MAX_JITTER:
            raise UserError(f"--color-jitter must be in [0, {MAX_JITTER:g}] (brightness, contrast "
                            f"and saturation factors from max(0, 1 - x) to 1 + x), got "
                            f"{self.color_jitter:g}")
        low, high = self.scale
        if not 0.0 < low <= high <= 1.0:
            raise UserError(f"--scale takes MIN MAX with 0 < MIN <= MAX <= 1 (fractions of the "
                            f"image area), got {low:g} {high:g}")
        low, high = self.ratio
        if not 1.0 / MAX_RATIO <= low <= high <= MAX_RATIO:
            raise UserError(f"--ratio takes MIN MAX with {1 / MAX_RATIO:g} <= MIN <= MAX <= "
                            f"{MAX_RATIO:g} (crop aspect ratios, width / height), got {low:g} "
                            f"{high:g}")


@dataclass(frozen=True)
class SizeSpec:
    """Variable-size training (timm's --train-img-sizes family): each batch one of several
    (image size, batch size) choices, drawn by timm's ScheduledBatchSampler."""
    train_img_sizes: list | None = None
    train_batch_sizes: list | None = None
    train_size_probs: list | None = None
    train_size_schedule: str = "constant"
    train_size_schedule_spread: float = 0.65
    train_size_random_mix: float = 0.1
    train_batches_per_epoch: int | None = None
    variable_batch_loss_scale: str = "none"

    def __post_init__(self):
        if not self.train_img_sizes:
            for dest in ("train_batch_sizes", "train_size_probs", "train_batches_per_epoch"):
                if getattr(self, dest) is not None:
                    raise UserError(f"{flag_of(self, dest)} shapes variable-size training: "
                                    f"give --train-img-sizes")
            return
        for size in self.train_img_sizes:
            if not 1 <= size <= MAX_IMAGE_SIZE:
                raise UserError(f"--train-img-sizes must be between 1 and {MAX_IMAGE_SIZE} "
                                f"pixels, got {size}")
        self.choices(1)  # the choices' own checks

    @property
    def enabled(self) -> bool:
        return bool(self.train_img_sizes)

    def average_batch(self, batch_size: int) -> float:
        """timm's policy-average batch size (the choices' batches weighted by their probs)."""
        choices = self.choices(batch_size)
        weights = choices.probs or (1.0,) * len(choices.batch_sizes)
        return sum(w * b for w, b in zip(weights, choices.batch_sizes)) / sum(weights)

    def choices(self, batch_size: int):
        return SizeChoices.of(self.train_img_sizes, self.train_batch_sizes, batch_size,
                              probs=self.train_size_probs, schedule=self.train_size_schedule,
                              spread=self.train_size_schedule_spread,
                              random_mix=self.train_size_random_mix,
                              num_batches=self.train_batches_per_epoch)


@dataclass(frozen=True)
class NaflexSpec:
    """timm's NaFlex loader (--naflex-loader and its family): patch sequences of several
    lengths in token-budget batches for training, one length for evaluation. validate.py has
    the last two fields only (None: as the checkpoint was trained)."""
    naflex_loader: bool | None = False
    naflex_max_seq_len: int | None = 576
    naflex_train_seq_lens: list = (128, 256, 576, 784, 1024)
    naflex_patch_sizes: list | None = None
    naflex_patch_size_probs: list | None = None
    naflex_loss_scale: str = "linear"
    naflex_patchify_channels_first: bool = False

    def __post_init__(self):
        at_least(self, 1, "naflex_max_seq_len")
        if not self.naflex_train_seq_lens or min(self.naflex_train_seq_lens) < 1:
            raise UserError("--naflex-train-seq-lens must be >= 1 (patches per image)")
        if self.naflex_patch_sizes is not None and min(self.naflex_patch_sizes) < 1:
            raise UserError("--naflex-patch-sizes must be >= 1 (pixels)")
        probs, sizes = self.naflex_patch_size_probs, self.naflex_patch_sizes
        if probs is not None:
            if sizes is None:
                raise UserError("--naflex-patch-size-probs weighs --naflex-patch-sizes: give them")
            if len(probs) != len(sizes):
                raise UserError(f"--naflex-patch-size-probs gives {len(probs)} weights for "
                                f"{len(sizes)} --naflex-patch-sizes: one each")
            if min(probs) < 0 or not sum(probs) > 0:
                raise UserError("--naflex-patch-size-probs must be >= 0 with a positive sum")
        if not self.naflex_loader and sizes is not None:
            raise UserError("--naflex-patch-sizes shapes NaFlex training: give --naflex-loader")

    @property
    def enabled(self) -> bool:
        return bool(self.naflex_loader)

    @property
    def channels_last(self) -> bool:
        """Patches flattened P-P-C (timm's default), else C-P-P."""
        return not self.naflex_patchify_channels_first


@dataclass(frozen=True)
class LabelSpec:
    """What the loss sees: mixup/cutmix, label smoothing, BCE."""
    mixup: float
    cutmix: float
    cutmix_minmax: list | None
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str
    mixup_off_epoch: int
    smoothing: float
    bce_loss: bool
    bce_target_thresh: float | None
    bce_sum: bool = False
    bce_pos_weight: float | None = None

    def __post_init__(self):
        if (self.bce_sum or self.bce_pos_weight is not None) and not self.bce_loss:
            raise UserError("--bce-sum and --bce-pos-weight shape the BCE loss: give --bce-loss")
        if self.bce_pos_weight is not None and not self.bce_pos_weight > 0:
            raise UserError(f"--bce-pos-weight must be > 0, got {self.bce_pos_weight:g}")
        if self.cutmix_minmax is not None and len(self.cutmix_minmax) != 2:
            raise UserError(f"--cutmix-minmax takes MIN MAX (2 values), got "
                            f"{len(self.cutmix_minmax)}")
        within(self, 0.0, 1.0, "smoothing", closed=False)
        within(self, 0.0, 1.0, "mixup_prob", "mixup_switch_prob")
        if self.mixup < 0 or self.cutmix < 0:
            raise UserError("--mixup and --cutmix must be >= 0")
        at_least(self, 0, "mixup_off_epoch")
        within(self, 0.0, 1.0, "bce_target_thresh")
        if self.cutmix_minmax is not None and not 0 < self.cutmix_minmax[0] < self.cutmix_minmax[1] <= 1:
            raise UserError(f"--cutmix-minmax takes MIN MAX with 0 < MIN < MAX <= 1, got "
                            f"{' '.join(f'{v:g}' for v in self.cutmix_minmax)}")

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


def dataset_spec(ns, train: bool = True) -> DatasetSpec:
    """timm's dataset flags as one `DatasetSpec`, each checked where it is resolved
    (`data.readers.spec`); validate.py's --split and --num-samples are its one split's."""
    if train:
        splits = dict(train_split=ns.train_split, val_split=ns.val_split,
                      train_num_samples=ns.train_num_samples, val_num_samples=ns.val_num_samples,
                      epoch_repeats=ns.epoch_repeats)
    else:
        splits = dict(train_split=ns.split, val_split=ns.split, train_num_samples=ns.num_samples,
                      val_num_samples=ns.num_samples)
    if not ns.data_dir and not ns.dataset:
        raise UserError("no data root given: " + ("train.py DIR (with DIR/train and DIR/val)"
                                                 if train else "validate.py DIR --checkpoint PATH"))
    if ns.input_img_mode not in (None, "RGB"):
        raise UserError(f"--input-img-mode {ns.input_img_mode}: ematrain's models take RGB "
                        f"images (--in-chans 3), so images are converted to RGB")
    return resolve_dataset(ns.dataset, ns.data_dir, class_map=ns.class_map,
                           input_img_mode=ns.input_img_mode, input_key=ns.input_key,
                           target_key=ns.target_key, dataset_download=ns.dataset_download,
                           dataset_trust_remote_code=ns.dataset_trust_remote_code,
                           corrupt_samples=ns.corrupt_samples, **splits)
