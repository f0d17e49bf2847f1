"""The network and how it trains: `ModelSpec` (timm architecture, construction arguments, initial
weights), `OptimSpec` (optimizer, learning rate, accumulation, clipping), `ScheduleSpec` (timm's
LR scheduler, the run's length) and `PrecisionSpec` (AMP, weight dtype, memory layout)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..util.errors import UserError
from ..util.runtime import check_compile_mode
from .checks import DTYPES, FLOAT32_MAX, at_least, positive, within


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
    torchcompile_mode: str | None = None
    fast_norm: bool = False
    drop_connect: float | None = None

    # Keys of --model-kwargs that a flag of ours owns.
    OWNED = {"num_classes": "--num-classes", "pretrained": "--pretrained",
             "checkpoint_path": "--initial-checkpoint", "pretrained_cfg_overlay": "--pretrained-path"}

    def __post_init__(self):
        at_least(self, 1, "num_classes")
        within(self, 0.0, 1.0, "drop", "drop_path", "drop_block", closed=False)
        within(self, 0.0, 1.0, "bn_momentum")
        within(self, -FLOAT32_MAX, FLOAT32_MAX, "head_init_scale", "head_init_bias")
        if self.bn_eps is not None and not self.bn_eps > 0.0:
            raise UserError(f"--bn-eps must be a positive number, got {self.bn_eps}")
        for key in self.model_kwargs:
            if key in self.OWNED:
                raise UserError(f"--model-kwargs {key}: use {self.OWNED[key]} instead")
        if self.in_chans is not None and self.in_chans != 3:
            raise UserError(f"--in-chans {self.in_chans}: ImageFolder images are loaded as RGB, so "
                            f"only 3 channels are supported")
        within(self, 0.0, 1.0, "drop_connect", closed=False)
        if self.drop_connect is not None and self.drop_path not in (None, self.drop_connect):
            raise UserError(f"--drop-connect is timm's old name of --drop-path: give one "
                            f"(got {self.drop_connect:g} and {self.drop_path:g})")
        check_compile_mode(self.torchcompile_mode, self.torchcompile)

    def create_kwargs(self) -> dict:
        """timm.create_model keyword arguments; --model-kwargs wins over the named flags."""
        drop_path = self.drop_path if self.drop_path is not None else self.drop_connect
        return {"drop_rate": self.drop, "drop_path_rate": drop_path,
                "drop_block_rate": self.drop_block, "global_pool": self.gp,
                "in_chans": self.in_chans, **self.model_kwargs}


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
    layer_decay_min_scale: float = 0.0
    layer_decay_no_opt_scale: float | None = None

    def __post_init__(self):
        if self.layer_decay is None and (self.layer_decay_min_scale
                                         or self.layer_decay_no_opt_scale is not None):
            raise UserError("--layer-decay-min-scale and --layer-decay-no-opt-scale bound "
                            "--layer-decay's scales: give --layer-decay")
        within(self, 0.0, 1.0, "layer_decay_min_scale", "layer_decay_no_opt_scale")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        at_least(self, 1, "grad_accum_steps", "lr_base_size")
        # A negative clip or layer decay flips the sign of updates and 0 freezes the layers;
        # above 1 each lower layer's LR grows by the factor (1e308: an overflow).
        positive(self, "lr_base", "clip_grad")
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
        at_least(self, 1, "epochs")
        at_least(self, 0, "warmup_epochs", "cooldown_epochs")
        if self.warmup_lr < 0 or self.min_lr < 0:
            raise UserError(f"--warmup-lr and --min-lr must be >= 0, got {self.warmup_lr:g} and "
                            f"{self.min_lr:g}")
        if self.lr_noise is not None and len(self.lr_noise) not in (1, 2):
            raise UserError("--lr-noise takes one or two values")
        self._check_shape()

    def _check_shape(self) -> None:
        """The values timm's schedulers compute with: each would otherwise fail (or spin) inside
        them, at the first epoch's end or later."""
        positive(self, "decay_epochs", "decay_rate", "lr_cycle_mul")  # divisor, base, log base
        within(self, 0.0, 1.0, "lr_cycle_decay")  # the peak's factor per cycle
        # The noise is redrawn until it is below the pct (0: never); beyond 1 the LR turns < 0.
        if not 0 < self.lr_noise_pct <= 1:
            raise UserError(f"--lr-noise-pct must be in (0, 1], got {self.lr_noise_pct:g}")
        if self.sched in ("step", "multistep", "plateau") and self.decay_rate > 1:
            raise UserError(f"--decay-rate {self.decay_rate:g}: the {self.sched} schedule "
                            f"multiplies the LR by it at each decay; it must be in (0, 1]")
        at_least(self, 1, "lr_cycle_limit")
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
        dtype = DTYPES[name]
        if dtype == torch.float16 and device.type != "cuda":
            raise UserError(f"{flag} float16 needs CUDA; on the CPU use {flag} bfloat16")
        return dtype


@dataclass(frozen=True)
class DistillSpec:
    """Knowledge distillation (--kd-model-name and timm's kd- family)."""
    kd_model_name: str | None = None
    kd_pretrained_path: str | None = None
    kd_distill_type: str = "logit"
    kd_loss_type: str = "kl"
    distill_loss_weight: float | None = None
    task_loss_weight: float | None = None
    kd_temperature: float = 4.0
    kd_student_feature_dim: int | None = None
    kd_teacher_feature_dim: int | None = None
    kd_token_distill_type: str = "soft"

    def __post_init__(self):
        if not self.kd_model_name:
            if self.kd_pretrained_path:
                raise UserError("--kd-pretrained-path is the teacher's weights: give "
                                "--kd-model-name too")
            return
        positive(self, "kd_student_feature_dim", "kd_teacher_feature_dim")  # the projection's
        if self.kd_loss_type != "kl":
            raise UserError(f"--kd-loss-type: timm's logit and token distillation take kl only, "
                            f"got {self.kd_loss_type!r}")
        positive(self, "kd_temperature")
        for dest in ("distill_loss_weight", "task_loss_weight"):
            value = getattr(self, dest)
            if value is not None and not 0 <= value <= FLOAT32_MAX:
                raise UserError(f"--{dest.replace('_', '-')} must be >= 0, got {value:g}")

    @property
    def enabled(self) -> bool:
        return bool(self.kd_model_name)
