"""The EMA's settings: `EmaSpec` (the regular shadows: decays or half-lives, schedule, placement,
dtype, BatchNorm policy, switch-EMA) and `PosthocSpec` (the post-hoc power EMAs and their
snapshots), each with every check of its flags."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch

from ..ema.half_life import HalfLife, decay_from_half_life, parse_half_life
from ..ema.schedules import SCHEDULES, OutOfRange, check_decay, check_gamma, gamma_to_sigma_rel
from ..util.errors import UserError
from .checks import DTYPES, at_least, at_most, check_sigma_rels, from_args

# Each EMA shadow is a full copy of the weights, validated every epoch, and each post-hoc target
# one more in float64 while the sweep forms it: longer lists are a slip (a shell glob), not a plan.
MAX_SHADOWS = 16


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
            at_most(flag, values, MAX_SHADOWS, "each is one more EMA of the weights")
        for d in self.decays or []:
            try:
                check_decay(d)
            except OutOfRange as exc:
                raise UserError(f"--model-ema-decay must be in {exc.interval}, got {d}") from None
        parsed = []
        for text in self.half_lives or []:
            try:
                parsed.append(parse_half_life(str(text)))
            except ValueError as exc:
                raise UserError(f"--model-ema-half-life: {exc}") from None
        object.__setattr__(self, "half_life_units", parsed)
        at_least(self, 1, "every", "bn_batches")
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
        check_sigma_rels("--model-ema-sigma-rel", self.sigma_rels, MAX_SHADOWS)
        for g in self.power_gammas or []:
            try:  # the exponent of a sigma_rel the profile can have (`check_sigma_rels`)
                check_gamma(g)
            except OutOfRange as exc:
                raise UserError(f"--model-ema-power-gamma must be in {exc.interval}, "
                                f"got {g:g}") from None

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
        try:
            return decay_from_half_life(steps)
        except ValueError as exc:  # OutOfRange: the decay rounds to 0 or 1
            long = getattr(exc, "value", 0.0) >= 1.0
            raise UserError(f"--model-ema-half-life {text} is {steps:.3g} optimizer steps, too "
                            f"{'long' if long else 'short'} for a decay in (0, 1)") from None


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
        check_sigma_rels("--model-ema-posthoc", self.sigma_rels, MAX_SHADOWS, named=True)
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
        return DTYPES[self.snapshot_dtype or self.DEFAULT_DTYPE]

    def steps_between(self, steps_per_epoch: int, images_per_step: int, total_steps: int) -> int:
        """Optimizer steps between snapshots (at least one; an interval longer than the run,
        1e308ep included, is the run: its end is snapshotted in any case)."""
        if self.interval is None:
            steps = total_steps / self.DEFAULT_SNAPSHOTS
        else:
            steps = self.interval.in_updates(images_per_step, steps_per_epoch)
        return max(1, int(math.floor(min(steps, max(total_steps, 1)) + 0.5)))
