"""Typed settings, resolved once from the parsed flags, each with every check of its values.

A spec is a frozen dataclass whose fields are flag values; its `__post_init__` holds all the checks
of those values, so the checks of one flag are found next to it. train.py and validate.py share the
specs of what they share (images, loaders). Builders take specs, never the argparse Namespace; the
Namespace itself survives only as the run's record (args.yaml, a checkpoint's ``args``).
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .config import Layer, parse_command
from .ema import HalfLife, parse_half_life
from .distributed import device_named
from .ema_schedules import (
    SCHEDULES,
    SIGMA_REL_MAX,
    SIGMA_REL_MIN,
    gamma_to_sigma_rel,
    sigma_rel_to_gamma,
)
from .errors import UserError
from .logs import plural
from .flags import train_parser, validate_parser
from .resume import ResumeSource, apply_to_settings, find_checkpoint, open_source

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
# No timm model takes inputs larger than this; a bigger size only exhausts memory.
MAX_IMAGE_SIZE = 4096
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# Each EMA shadow is a full copy of the weights, validated every epoch, and each post-hoc target
# one more in float64 while the sweep forms it: longer lists are a slip (a shell glob), not a plan.
MAX_SHADOWS = 16
MAX_TARGETS = 32
# The random-resized crop's aspect ratios (width / height) a flag may ask for.
MAX_RATIO = 100.0
# Color jitter factors up to 1 + this: far beyond, every image is black or white (and torch
# cannot draw a factor past float32's range).
MAX_JITTER = 100.0
_DIST_BACKENDS = ("nccl", "gloo", "mpi", "ucc")
# Values that go into float32 weights must fit them.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def from_args(cls, ns: argparse.Namespace, **renamed: str):
    """Build spec `cls` from the namespace: each field from the dest of its name (or the one
    `renamed` gives); a field the namespace lacks keeps its default."""
    values = {}
    for f in fields(cls):
        dest = renamed.get(f.name, f.name)
        if f.init and hasattr(ns, dest):
            values[f.name] = getattr(ns, dest)
    return cls(**values)


def _flag(spec, field_name: str) -> str:
    """The command-line flag of a spec's field (specs may name a field unlike its flag)."""
    return getattr(spec, "FLAGS", {}).get(field_name) or "--" + field_name.replace("_", "-")


def _at_least(spec, minimum: int, *dests: str) -> None:
    for dest in dests:
        value = getattr(spec, dest)
        if value is not None and value < minimum:
            raise UserError(f"{_flag(spec, dest)} must be >= {minimum}, got {value}")


def _within(spec, low: float, high: float, *dests: str, closed: bool = True) -> None:
    for dest in dests:
        value = getattr(spec, dest)
        if value is None:
            continue
        if not (low <= value <= high if closed else low <= value < high):
            raise UserError(f"{_flag(spec, dest)} must be in [{low:g}, {high:g}"
                            f"{']' if closed else ')'}, got {value}")


def _positive(spec, *dests: str) -> None:
    for dest in dests:
        value = getattr(spec, dest)
        if value is not None and not value > 0:
            raise UserError(f"{_flag(spec, dest)} must be > 0, got {value:g}")


def _at_most(flag: str, values, most: int, what: str) -> None:
    if values is not None and len(values) > most:
        raise UserError(f"{flag} takes at most {most} values ({what}), got {len(values)}")


def _sigma_rels(flag: str, values, most: int, named: bool = False) -> None:
    """Each sigma_rel one the power profile can have (`sigma_rel_to_gamma`); at most `most`."""
    _at_most(flag, values, most, "each is one more EMA of the weights")
    for value in values or []:
        try:
            sigma_rel_to_gamma(value)
        except ValueError:
            raise UserError(f"{flag}{': sigma_rel' if named else ''} must be in "
                            f"[{SIGMA_REL_MIN:g}, {SIGMA_REL_MAX:.4f}] (the uniform average), "
                            f"got {value:g}") from None


def dtype_named(name: str | None) -> torch.dtype | None:
    return _DTYPES[name] if name else None


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
                    raise UserError(f"{_flag(self, dest)} must be between 1 and "
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
        _at_least(self, 1, "batch_size")
        _at_least(self, 0, "workers")

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
    """Where the ImageFolder splits are and how they are batched."""
    data_dir: str | None
    train_split: str
    val_split: str
    validation_batch_size: int | None
    aug_repeats: float

    def __post_init__(self):
        if not self.data_dir:
            raise UserError("no data root given: train.py DIR (with DIR/train and DIR/val)")
        _at_least(self, 1, "validation_batch_size")
        repeats = self.aug_repeats
        if not (repeats >= 0 and repeats == int(repeats)):
            raise UserError(f"--aug-repeats must be a whole number >= 0, got {repeats:g}")


@dataclass(frozen=True)
class ModelSpec:
    """The network: timm architecture, its construction arguments, initial weights."""
    model: str
    num_classes: int | None
    pretrained: bool
    pretrained_path: str | None
    initial_checkpoint: str
    gp: str | None
    model_kwargs: dict
    in_chans: int | None
    drop: float
    drop_path: float | None
    drop_block: float | None
    bn_momentum: float | None
    bn_eps: float | None
    head_init_scale: float | None
    head_init_bias: float | None
    grad_checkpointing: bool
    torchcompile: str | None

    # Keys of --model-kwargs that a flag of ours owns.
    OWNED = {"num_classes": "--num-classes", "pretrained": "--pretrained",
             "checkpoint_path": "--initial-checkpoint", "pretrained_cfg_overlay": "--pretrained-path"}

    def __post_init__(self):
        _at_least(self, 1, "num_classes")
        _within(self, 0.0, 1.0, "drop", "drop_path", "drop_block", closed=False)
        _within(self, 0.0, 1.0, "bn_momentum")
        _within(self, -FLOAT32_MAX, FLOAT32_MAX, "head_init_scale", "head_init_bias")
        if self.bn_eps is not None and not self.bn_eps > 0.0:
            raise UserError(f"--bn-eps must be a positive number, got {self.bn_eps}")
        for key in self.model_kwargs:
            if key in self.OWNED:
                raise UserError(f"--model-kwargs {key}: use {self.OWNED[key]} instead")
        if self.in_chans is not None and self.in_chans != 3:
            raise UserError(f"--in-chans {self.in_chans}: ImageFolder images are loaded as RGB, so "
                            f"only 3 channels are supported")
        if self.torchcompile:
            import torch._dynamo
            if self.torchcompile not in torch._dynamo.list_backends(exclude_tags=()):
                raise UserError(f"--torchcompile: unknown backend {self.torchcompile!r} "
                                f"(e.g. {', '.join(torch._dynamo.list_backends())}, eager)")

    def create_kwargs(self) -> dict:
        """timm.create_model keyword arguments; --model-kwargs wins over the named flags."""
        return {"drop_rate": self.drop, "drop_path_rate": self.drop_path,
                "drop_block_rate": self.drop_block, "global_pool": self.gp,
                "in_chans": self.in_chans, **self.model_kwargs}


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

    def __post_init__(self):
        if self.train_interpolation not in ("", "random") + _INTERPOLATIONS:
            raise UserError(f"--train-interpolation must be random or one of "
                            f"{', '.join(_INTERPOLATIONS)}, got {self.train_interpolation!r}")
        _within(self, 0.0, 1.0, "hflip", "vflip", "reprob")
        _at_least(self, 1, "recount")
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

    def __post_init__(self):
        _within(self, 0.0, 1.0, "smoothing", closed=False)
        _within(self, 0.0, 1.0, "mixup_prob", "mixup_switch_prob")
        if self.mixup < 0 or self.cutmix < 0:
            raise UserError("--mixup and --cutmix must be >= 0")
        _at_least(self, 0, "mixup_off_epoch")
        _within(self, 0.0, 1.0, "bce_target_thresh")
        if self.cutmix_minmax is not None and not 0 < self.cutmix_minmax[0] < self.cutmix_minmax[1] <= 1:
            raise UserError(f"--cutmix-minmax takes MIN MAX with 0 < MIN < MAX <= 1, got "
                            f"{' '.join(f'{v:g}' for v in self.cutmix_minmax)}")

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


@dataclass(frozen=True)
class OptimSpec:
    """timm's optimizer, the learning rate, gradient accumulation and clipping."""
    opt: str
    lr: float | None
    lr_base: float
    lr_base_size: int
    lr_base_scale: str
    opt_eps: float | None
    opt_betas: list | None
    opt_kwargs: dict
    momentum: float
    weight_decay: float
    layer_decay: float | None
    clip_grad: float | None
    clip_mode: str
    grad_accum_steps: int
    opt_fused: bool

    def __post_init__(self):
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        _at_least(self, 1, "grad_accum_steps", "lr_base_size")
        # A negative clip or layer decay flips the sign of updates and 0 freezes the layers;
        # above 1 each lower layer's LR grows by the factor (1e308: an overflow).
        _positive(self, "lr_base", "clip_grad")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise UserError(f"--layer-decay must be in (0, 1], got {self.layer_decay:g}")
        if self.opt_betas is not None and len(self.opt_betas) not in (2, 3):
            raise UserError(f"--opt-betas takes 2 (or 3, e.g. for adan) values, got "
                            f"{len(self.opt_betas)}")
        if self.opt_betas is not None and not all(0.0 <= b < 1.0 for b in self.opt_betas):
            raise UserError(f"--opt-betas takes 2 (or 3, e.g. for adan) values in [0, 1), "
                            f"got {' '.join(f'{b:g}' for b in self.opt_betas)}")

    def lr_for(self, global_batch: int) -> float:
        """--lr (the global rate), or --lr-base scaled by the global batch as timm does:
        adaptive optimizers with its square root, the others linearly."""
        if self.lr is not None:
            return self.lr
        ratio = global_batch / self.lr_base_size
        scale = self.lr_base_scale
        if not scale:
            scale = "sqrt" if any(name in self.opt.lower() for name in ("ada", "lamb")) else "linear"
        return self.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)

    def create_kwargs(self) -> dict:
        kwargs = dict(self.opt_kwargs)
        if self.opt_eps is not None:
            kwargs["eps"] = self.opt_eps
        if self.opt_betas is not None:
            kwargs["betas"] = tuple(self.opt_betas)
        return kwargs


@dataclass(frozen=True)
class ScheduleSpec:
    """timm's LR scheduler and the run's length."""
    sched: str
    epochs: int
    warmup_epochs: int
    warmup_lr: float
    min_lr: float
    cooldown_epochs: int
    decay_epochs: float
    decay_rate: float
    decay_milestones: list
    patience_epochs: int
    warmup_prefix: bool
    lr_noise: list | None
    lr_noise_pct: float
    lr_noise_std: float
    lr_cycle_mul: float
    lr_cycle_decay: float
    lr_cycle_limit: int
    lr_k_decay: float
    sched_on_updates: bool

    def __post_init__(self):
        _at_least(self, 1, "epochs")
        _at_least(self, 0, "warmup_epochs", "cooldown_epochs")
        if self.warmup_lr < 0 or self.min_lr < 0:
            raise UserError(f"--warmup-lr and --min-lr must be >= 0, got {self.warmup_lr:g} and "
                            f"{self.min_lr:g}")
        if self.lr_noise is not None and len(self.lr_noise) not in (1, 2):
            raise UserError("--lr-noise takes one or two values")
        self._check_shape()

    def _check_shape(self) -> None:
        """The values timm's schedulers compute with: each would otherwise fail (or spin) inside
        them, at the first epoch's end or later."""
        _positive(self, "decay_epochs", "decay_rate", "lr_cycle_mul")  # divisor, base, log base
        _within(self, 0.0, 1.0, "lr_cycle_decay")  # the peak's factor per cycle
        # The noise is redrawn until it is below the pct (0: never); beyond 1 the LR turns < 0.
        if not 0 < self.lr_noise_pct <= 1:
            raise UserError(f"--lr-noise-pct must be in (0, 1], got {self.lr_noise_pct:g}")
        if self.sched in ("step", "multistep", "plateau") and self.decay_rate > 1:
            raise UserError(f"--decay-rate {self.decay_rate:g}: the {self.sched} schedule "
                            f"multiplies the LR by it at each decay; it must be in (0, 1]")
        _at_least(self, 1, "lr_cycle_limit")
        if not 0 < self.lr_k_decay <= 10:  # t ** k: 0 ** -k divides by zero, large k overflows
            raise UserError(f"--lr-k-decay must be in (0, 10], got {self.lr_k_decay:g}")
        if not 0 <= self.lr_noise_std <= 100 * self.lr_noise_pct:
            # timm redraws the noise until it is below the limit: a std far above it never is.
            raise UserError(f"--lr-noise-std must be in [0, 100 x --lr-noise-pct] = "
                            f"[0, {100 * self.lr_noise_pct:g}], got {self.lr_noise_std:g}")
        if self.sched in ("cosine", "tanh") and self.lr_cycle_mul < 1 and (
                (self.epochs + self.cooldown_epochs) * (1 - self.lr_cycle_mul) >= self.epochs):
            # Cycles of shrinking length add up to epochs / (1 - mul): timm's schedule ends there.
            raise UserError(f"--lr-cycle-mul {self.lr_cycle_mul:g}: shrinking cycles add up to "
                            f"{self.epochs / (1 - self.lr_cycle_mul):.4g} epochs, fewer than the "
                            f"run's {self.epochs + self.cooldown_epochs}; give 1 or more")

    def warmup_warning(self, num_epochs: int) -> str | None:
        """A warning when the LR warmup takes most of the run: the LR then reaches its peak
        late or never (timm's default of 5 warmup epochs on a 5-epoch run)."""
        if self.sched == "none" or 2 * self.warmup_epochs <= num_epochs:
            return None
        return (f"warning: --warmup-epochs {self.warmup_epochs} covers most of this "
                f"{num_epochs}-epoch run: the LR reaches its peak only at epoch "
                f"{self.warmup_epochs}{' (after the run)' if self.warmup_epochs >= num_epochs else ''}"
                f"; try --warmup-epochs {num_epochs // 5}")

    @property
    def noise(self):
        """--lr-noise as timm's factory takes it: one value, or an [on, off] pair."""
        if self.lr_noise is None:
            return None
        return self.lr_noise[0] if len(self.lr_noise) == 1 else list(self.lr_noise)


@dataclass(frozen=True)
class Precision:
    """What `PrecisionSpec` means on one device."""
    autocast: torch.dtype | None   # AMP dtype, None when off
    model_dtype: torch.dtype | None  # --model-dtype, None: as created (float32)
    grad_scaler: bool               # float16 AMP needs a scaler
    channels_last: bool


@dataclass(frozen=True)
class PrecisionSpec:
    """AMP, low-precision weights and memory layout."""
    amp: bool
    amp_dtype: str
    model_dtype: str | None
    channels_last: bool

    def __post_init__(self):
        if self.amp and self.model_dtype not in (None, "float32"):
            raise UserError(f"--amp is mixed precision for a float32 model; with --model-dtype "
                            f"{self.model_dtype} the model already computes in {self.model_dtype}: "
                            f"give one of them")

    def on(self, device: torch.device) -> Precision:
        autocast = self._dtype("--amp-dtype", self.amp_dtype, device) if self.amp else None
        model_dtype = (None if self.model_dtype in (None, "float32")
                       else self._dtype("--model-dtype", self.model_dtype, device))
        return Precision(autocast, model_dtype, autocast == torch.float16, self.channels_last)

    @staticmethod
    def _dtype(flag: str, name: str, device: torch.device) -> torch.dtype:
        dtype = _DTYPES[name]
        if dtype == torch.float16 and device.type != "cuda":
            raise UserError(f"{flag} float16 needs CUDA; on the CPU use {flag} bfloat16")
        return dtype


@dataclass(frozen=True)
class EmaSpec:
    """The EMA shadows: their horizons, schedule, placement and dtype."""
    enabled: bool
    decays: list | None
    half_lives: list | None
    force_cpu: bool
    every: int
    warmup: bool
    warmup_power: float
    dtype: str | None
    precheck: bool
    schedule_flag: str | None = None
    sigma_rels: list | None = None
    power_gammas: list | None = None
    bn: str = "average"
    bn_batches: int = 20
    switch: bool = False
    half_life_units: list = field(init=False, repr=False, compare=False)

    DEFAULT_DECAY = 0.9998
    DEFAULT_SIGMA_REL = 0.1
    FLAGS = {"every": "--model-ema-every", "warmup_power": "--model-ema-warmup-power",
             "bn_batches": "--model-ema-bn-batches"}

    def __post_init__(self):
        if self.decays is not None and self.half_lives is not None:
            raise UserError("give --model-ema-decay or --model-ema-half-life, not both")
        for flag, values in (("--model-ema-decay", self.decays),
                             ("--model-ema-half-life", self.half_lives),
                             ("--model-ema-power-gamma", self.power_gammas)):
            _at_most(flag, values, MAX_SHADOWS, "each is one more EMA of the weights")
        for d in self.decays or []:
            if not 0.0 < d < 1.0:
                raise UserError(f"--model-ema-decay must be in (0, 1), got {d}")
        parsed = []
        for text in self.half_lives or []:
            try:
                parsed.append(parse_half_life(str(text)))
            except ValueError as exc:
                raise UserError(f"--model-ema-half-life: {exc}") from None
        object.__setattr__(self, "half_life_units", parsed)
        _at_least(self, 1, "every", "bn_batches")
        if not self.warmup_power > 0:
            raise UserError(f"--model-ema-warmup-power must be > 0, got {self.warmup_power}")
        self._check_schedule()

    def _check_schedule(self) -> None:
        name = self.schedule_flag
        if name is not None and name not in SCHEDULES:
            raise UserError(f"--model-ema-schedule must be one of {', '.join(SCHEDULES)}, "
                            f"got {name!r}")
        if self.warmup and name not in (None, "timm"):
            raise UserError(f"--model-ema-warmup is --model-ema-schedule timm: it cannot go with "
                            f"--model-ema-schedule {name}")
        powered = self.sigma_rels is not None or self.power_gammas is not None
        if powered and name not in (None, "power"):
            raise UserError(f"--model-ema-sigma-rel and --model-ema-power-gamma belong to "
                            f"--model-ema-schedule power, not {name}")
        if self.schedule != "power":
            return
        if self.sigma_rels is not None and self.power_gammas is not None:
            raise UserError("give --model-ema-sigma-rel or --model-ema-power-gamma, not both")
        if self.decays is not None or self.half_lives is not None or self.warmup:
            raise UserError("--model-ema-schedule power: its shadows are given by "
                            "--model-ema-sigma-rel (or --model-ema-power-gamma), not by a decay, "
                            "half-life or warmup")
        _sigma_rels("--model-ema-sigma-rel", self.sigma_rels, MAX_SHADOWS)
        for g in self.power_gammas or []:
            try:  # the exponent of a sigma_rel the profile can have (`_sigma_rels`)
                fits = g >= 0 and gamma_to_sigma_rel(g) >= SIGMA_REL_MIN
            except OverflowError:
                fits = False
            if not fits:
                raise UserError(f"--model-ema-power-gamma must be in [0, "
                                f"{sigma_rel_to_gamma(SIGMA_REL_MIN):.4g}] (sigma_rel "
                                f"{SIGMA_REL_MAX:.4f} to {SIGMA_REL_MIN:g}), got {g:g}")

    @property
    def schedule(self) -> str:
        """The schedule in force: --model-ema-schedule, or what --model-ema-warmup or a
        sigma_rel (power) imply, else constant."""
        if self.schedule_flag is not None:
            return self.schedule_flag
        if self.warmup:
            return "timm"
        if self.sigma_rels is not None or self.power_gammas is not None:
            return "power"
        return "constant"

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "EmaSpec":
        return from_args(cls, ns, enabled="model_ema", decays="model_ema_decay",
                         half_lives="model_ema_half_life", force_cpu="model_ema_force_cpu",
                         every="model_ema_every", warmup="model_ema_warmup",
                         warmup_power="model_ema_warmup_power", dtype="model_ema_dtype",
                         precheck="model_ema_precheck", schedule_flag="model_ema_schedule",
                         sigma_rels="model_ema_sigma_rel", power_gammas="model_ema_power_gamma",
                         bn="model_ema_bn", bn_batches="model_ema_bn_batches",
                         switch="model_ema_switch")

    def decays_per_step(self, images_per_step: int, steps_per_epoch: int) -> list[float]:
        """Per-optimizer-step decays (the power schedule's sigma_rels, which name its shadows).
        A half-life in images or epochs is converted with the real images per optimizer step,
        so it survives a change of batch size or GPU count."""
        if self.schedule == "power":
            decays = (list(self.sigma_rels) if self.sigma_rels is not None else
                      [gamma_to_sigma_rel(g) for g in self.power_gammas or []]
                      or [self.DEFAULT_SIGMA_REL])
        elif not self.half_life_units:
            decays = list(self.decays or [self.DEFAULT_DECAY])
        else:
            decays = [self._decay_of(text, half_life, images_per_step, steps_per_epoch)
                      for text, half_life in zip(self.half_lives, self.half_life_units)]
        labels = [f"{d:g}" for d in decays]
        if len(set(labels)) < len(labels):
            raise UserError(f"EMA decays must differ in their first 6 digits: {', '.join(labels)}")
        return decays

    @staticmethod
    def _decay_of(text: str, half_life: HalfLife, images_per_step: int,
                  steps_per_epoch: int) -> float:
        steps = half_life.in_updates(images_per_step, steps_per_epoch)
        decay = 0.5 ** (1.0 / steps)
        if not 0.0 < decay < 1.0:
            raise UserError(f"--model-ema-half-life {text} is {steps:.3g} optimizer steps, too "
                            f"{'long' if decay >= 1.0 else 'short'} for a decay in (0, 1)")
        return decay


@dataclass(frozen=True)
class PosthocSpec:
    """Post-hoc EMA: the power-function EMAs tracked for it and their snapshots."""
    sigma_rels: list | None
    snapshot_every: str | None
    snapshot_dtype: str | None
    interval: HalfLife | None = field(init=False, repr=False, compare=False)

    DEFAULT_SIGMA_RELS = (0.05, 0.10)
    # Snapshots per run when --model-ema-snapshot-every is not given (see the README's
    # measurement: the default sweep's fit error against the snapshot count and dtype).
    DEFAULT_SNAPSHOTS = 32
    DEFAULT_DTYPE = "float32"
    FLAGS = {"sigma_rels": "--model-ema-posthoc", "snapshot_every": "--model-ema-snapshot-every",
             "snapshot_dtype": "--model-ema-snapshot-dtype"}

    def __post_init__(self):
        if self.sigma_rels is None:
            if self.snapshot_every is not None or self.snapshot_dtype is not None:
                raise UserError("--model-ema-snapshot-every and --model-ema-snapshot-dtype set "
                                "the snapshots of --model-ema-posthoc: give it too")
            object.__setattr__(self, "interval", None)
            return
        _sigma_rels("--model-ema-posthoc", self.sigma_rels, MAX_SHADOWS, named=True)
        if len({f"{v:g}" for v in self.sigma_rels}) < len(self.sigma_rels):
            raise UserError(f"--model-ema-posthoc: the sigma_rels must differ, got "
                            f"{' '.join(f'{v:g}' for v in self.sigma_rels)}")
        interval = None
        if self.snapshot_every is not None:
            try:
                interval = parse_half_life(str(self.snapshot_every))
            except ValueError as exc:
                raise UserError(f"--model-ema-snapshot-every: "
                                f"{str(exc).replace('half-life', 'interval')}") from None
        object.__setattr__(self, "interval", interval)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "PosthocSpec":
        return from_args(cls, ns, sigma_rels="model_ema_posthoc",
                         snapshot_every="model_ema_snapshot_every",
                         snapshot_dtype="model_ema_snapshot_dtype")

    @property
    def enabled(self) -> bool:
        return self.sigma_rels is not None

    @property
    def tracked(self) -> list[float]:
        """The sigma_rels to track (the default pair for a bare --model-ema-posthoc)."""
        return list(self.sigma_rels or self.DEFAULT_SIGMA_RELS)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.snapshot_dtype or self.DEFAULT_DTYPE]

    def steps_between(self, steps_per_epoch: int, images_per_step: int, total_steps: int) -> int:
        """Optimizer steps between snapshots (at least one; an interval longer than the run,
        1e308ep included, is the run: its end is snapshotted in any case)."""
        if self.interval is None:
            steps = total_steps / self.DEFAULT_SNAPSHOTS
        else:
            steps = self.interval.in_updates(images_per_step, steps_per_epoch)
        return max(1, int(math.floor(min(steps, max(total_steps, 1)) + 0.5)))


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

    def __post_init__(self):
        _at_least(self, 1, "log_interval", "checkpoint_hist")
        if not 0 <= self.seed < 2**32:  # numpy's generators take no other seed
            raise UserError(f"--seed must be in [0, 2**32 - 1], got {self.seed}")
        _at_least(self, 0, "skip_nonfinite", "recovery_interval")
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

    def __post_init__(self):
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

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "TrainSettings":
        specs = {"data": DataSpec, "loader": LoaderSpec, "image": ImageSpec, "model": ModelSpec,
                 "aug": AugSpec, "labels": LabelSpec, "optim": OptimSpec, "schedule": ScheduleSpec,
                 "precision": PrecisionSpec, "loop": LoopSpec, "dist": DistSpec}
        built = {name: from_args(spec, ns) for name, spec in specs.items()}
        settings = cls(args=ns, ema=EmaSpec.from_args(ns), posthoc=PosthocSpec.from_args(ns),
                       **built)
        if settings.labels.mixing and settings.loader.batch_size % 2:
            raise UserError(f"mixup/cutmix need an even --batch-size, got "
                            f"{settings.loader.batch_size}")
        _output_outside_splits(settings.loop.output, settings.data)
        return settings

    def global_batch(self, world_size: int = 1) -> int:
        """Images per optimizer step: processes x batch size x accumulation."""
        return world_size * self.loader.batch_size * self.optim.grad_accum_steps

    def lr(self, world_size: int = 1) -> float:
        """The global learning rate (--lr, or --lr-base scaled by the global batch)."""
        return self.optim.lr_for(self.global_batch(world_size))


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


# ----------------------------------------------------------------------------- validate.py
@dataclass(frozen=True)
class WeightChoice:
    """Which weights of a checkpoint validate.py evaluates."""
    use_ema: bool
    ema_decay: str | None  # a decay or a shadow's name (`checkpoint.ema_index_for_decay`)
    ema_index: int | None

    def __post_init__(self):
        _at_least(self, 0, "ema_index")

    @property
    def wants_ema(self) -> bool:
        return self.use_ema or self.ema_index is not None or self.ema_decay is not None


@dataclass(frozen=True)
class ValidateSettings:
    """Everything validate.py was asked for, checked."""
    args: argparse.Namespace
    data_dir: str | None
    split: str
    checkpoint: str | None
    pretrained: bool
    pretrained_path: str | None
    posthoc: str | None
    sigma_rel: list | None
    half_life: list | None
    model: str | None
    num_classes: int | None
    device: str | None
    results_file: str
    results_format: str | None
    image: ImageSpec
    loader: LoaderSpec
    choice: WeightChoice
    precision: PrecisionSpec

    def __post_init__(self):
        if not self.data_dir:
            raise UserError("no data root given: validate.py DIR --checkpoint PATH")
        sources = [f for f, on in (("--checkpoint", self.checkpoint),
                                   ("--pretrained-path", self.pretrained_path),
                                   ("--pretrained", self.pretrained),
                                   ("--posthoc", self.posthoc)) if on]
        if len(sources) != 1:
            raise UserError("give the weights to evaluate: --checkpoint PATH, --posthoc RUN_DIR, "
                            "or --model NAME with --pretrained-path FILE or --pretrained"
                            + (f" (not {' and '.join(sources)})" if sources else ""))
        if self.pretrained and not self.model:
            raise UserError("--pretrained needs --model NAME")
        if self.pretrained and self.choice.wants_ema:
            raise UserError("--pretrained loads timm's released weights: they have no EMA to pick")
        if not self.posthoc and (self.sigma_rel is not None or self.half_life is not None):
            raise UserError("--sigma-rel and --half-life choose what --posthoc reconstructs: "
                            "give --posthoc RUN_DIR")
        if self.posthoc and (self.choice.wants_ema or self.model or self.results_file):
            raise UserError("--posthoc scores its own weight sets from the run's snapshots: "
                            "--use-ema, --ema-decay, --ema-index, --model and --results-file "
                            "do not apply")
        _sigma_rels("--sigma-rel", self.sigma_rel, MAX_TARGETS)
        _at_most("--half-life", self.half_life, MAX_TARGETS, "each is one more EMA to form")
        if self.device:
            device_named(self.device)
        for text in self.half_life or []:
            try:
                parse_half_life(str(text))
            except ValueError as exc:
                raise UserError(f"--half-life: {exc}") from None
        _at_least(self, 1, "num_classes")
        if self.results_file:
            path = Path(self.results_file)
            if self.results_format is None and path.suffix not in (".json", ".csv"):
                raise UserError(f"--results-file must end in .json or .csv (or give "
                                f"--results-format): {path}")
            if not path.parent.is_dir():
                raise UserError(f"--results-file directory does not exist: {path.parent}")

    @property
    def source(self) -> str:
        """The file the weights come from, or timm's name for its cache."""
        return self.checkpoint or self.pretrained_path or f"timm's pretrained {self.model}"

    @property
    def results_kind(self) -> str:
        """csv or json: --results-format, else the results file's suffix."""
        return self.results_format or Path(self.results_file).suffix.lstrip(".")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "ValidateSettings":
        parts = {"image": ImageSpec, "loader": LoaderSpec, "choice": WeightChoice,
                 "precision": PrecisionSpec}
        own = {f.name: getattr(ns, f.name) for f in fields(cls)
               if f.name != "args" and f.name not in parts}
        return cls(args=ns, **{name: from_args(spec, ns) for name, spec in parts.items()},
                   **own)


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


def validate_settings(argv: list[str]) -> ValidateSettings:
    """validate.py's settings from its command line."""
    return ValidateSettings.from_args(parse_command(validate_parser, [str(a) for a in argv]))
