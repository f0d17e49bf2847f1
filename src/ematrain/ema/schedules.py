"""EMA schedules: the decay each averaging update of a `ModelEma` uses, and the horizon it gives.

A schedule maps "the update that completes the interval starting at optimizer step ``step``"
(``step`` steps already seen, ``every`` steps per update) to one per-update decay per shadow,
``shadow += (1 - decay) * (model - shadow)``. Schedules hold settings only: every decay is a pure
function of ``(step, every)``, and ``step`` is `ModelEma.steps`, part of the EMA's state, so a
resumed run continues with exactly the decays the uninterrupted one would have used.

* `Constant`: ``decay ** every`` (the horizon in optimizer steps does not depend on ``every``).
* `TimmWarmup`: timm's ``1 - (1 + step / gamma) ** -power``, capped at the target, of the
  interval's first step, raised to ``every``.
* `Debias`: bias correction as Adam's. With ``b = decay ** every`` and ``k`` the update's number
  (1, 2, ...), the update weight ``(1 - b) / (1 - b ** k)`` makes the shadow the normalised
  exponential average ``sum_i b**(k-i) x_i / sum_i b**(k-i)`` of the iterates averaged so far: the
  initial weights get no share (the first update copies the model), and the weights of the past
  are exactly those of the target decay, truncated at the start.
* `Power`: Karras et al. 2024 (EDM2) power-function EMA, ``beta_k = (1 - 1/k) ** (gamma + 1)``
  with ``k`` the update's number. The product telescopes: the iterate of update ``i`` keeps the
  weight ``(1 - beta_i) * (i / k) ** (gamma + 1)``, about ``(gamma + 1) i**gamma / k**(gamma+1)``,
  a profile whose relative width ``sigma_rel`` stays a fixed fraction of the training so far.
  Updates every ``every`` steps sample that same profile in time. Its shadows are named by their
  ``sigma_rel`` where the other schedules name them by their decay.

A skipped update (``ModelEma(skip_nonfinite=True)``) still counts as a step of the schedule.

`ModelEma` builds its schedule with `make_schedule`; post-hoc EMA synthesis builds power-function
shadows with ``ModelEma.power(model, sigma_rels)`` or ``ModelEma(model, schedule=Power(...))``.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

__all__ = [
    "SCHEDULES",
    "Constant",
    "Debias",
    "EmaSchedule",
    "Power",
    "TimmWarmup",
    "OutOfRange",
    "check_decay",
    "check_gamma",
    "gamma_to_sigma_rel",
    "make_schedule",
    "schedule_for",
    "sigma_rel_to_gamma",
    "warmup_decay",
]

# The largest sigma_rel a power profile with gamma >= 0 has (gamma = 0: a uniform average).
SIGMA_REL_MAX = math.sqrt(1.0 / 12.0)
# The smallest one the conversion takes: its exponent (about 1 / sigma_rel) and sigma_rel ** -2
# stay far from float64's range (1e-200 would overflow), and a narrower profile is the last
# iterate alone for any run shorter than a trillion updates.
SIGMA_REL_MIN = 1e-12
# The ranges as the rules state them (the settings' one-line messages quote these).
DECAY_RANGE = "(0, 1)"
SIGMA_REL_RANGE = f"[{SIGMA_REL_MIN:g}, {SIGMA_REL_MAX:.4f}] (the uniform average)"


class OutOfRange(ValueError):
    """A value outside a range one of the EMA's rules allows. Each rule states its range once,
    here; `interval` is it as text and `value` the value refused, so that a caller with words of
    its own (a flag's one-line message) says the same rule."""

    def __init__(self, what: str, interval: str, value: float):
        super().__init__(f"{what} must be in {interval}, got {value:g}")
        self.what, self.interval, self.value = what, interval, value


# ----------------------------------------------------------------------------- pure functions
def check_decay(decay: float) -> float:
    """An EMA decay: in (0, 1) (0 keeps nothing of the past, 1 nothing of the model)."""
    if not 0.0 < decay < 1.0:
        raise OutOfRange("EMA decay", DECAY_RANGE, decay)
    return float(decay)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power profile ``t ** gamma`` on [0, 1] (EDM2's
    ``exp_to_std``): ``sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))``."""
    gamma = float(gamma)
    if not gamma > -1.0:
        raise ValueError(f"power EMA exponent gamma must be > -1, got {gamma}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent whose power profile has relative width ``sigma_rel`` (EDM2's ``std_to_exp``):
    the largest real root of ``gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s)``, ``s =
    sigma_rel ** -2``. Defined for ``SIGMA_REL_MIN <= sigma_rel <= sqrt(1/12)`` (then
    ``gamma >= 0``)."""
    sigma_rel = float(sigma_rel)
    if not SIGMA_REL_MIN <= sigma_rel <= SIGMA_REL_MAX * (1 + 1e-12):
        raise OutOfRange("power EMA sigma_rel", SIGMA_REL_RANGE, sigma_rel)
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    real = roots[np.abs(roots.imag) <= 1e-9 * max(1.0, s)].real
    gamma = float(real.max())
    # One Newton step on the float64 cubic sharpens what the eigenvalue solver returns.
    f = ((gamma + 7.0) * gamma + 16.0 - s) * gamma + 12.0 - s
    df = (3.0 * gamma + 14.0) * gamma + 16.0 - s
    if df != 0.0:
        gamma -= f / df
    return max(gamma, 0.0)


# The exponents of the sigma_rels `sigma_rel_to_gamma` takes: 0 (the uniform average) up to the
# narrowest profile's.
GAMMA_MAX = sigma_rel_to_gamma(SIGMA_REL_MIN)
GAMMA_RANGE = f"[0, {GAMMA_MAX:.4g}] (sigma_rel {SIGMA_REL_MAX:.4f} to {SIGMA_REL_MIN:g})"


def check_gamma(gamma: float) -> float:
    """A power EMA exponent whose profile is one `sigma_rel_to_gamma` gives: in `GAMMA_RANGE`."""
    try:
        fits = gamma >= 0 and gamma_to_sigma_rel(gamma) >= SIGMA_REL_MIN
    except OverflowError:
        fits = False
    if not fits:
        raise OutOfRange("power EMA exponent gamma", GAMMA_RANGE, gamma)
    return float(gamma)


def warmup_decay(target: float, step: int, power: float = 2 / 3, gamma: float = 1.0) -> float:
    """timm's EMA warmup: ``1 - (1 + step / gamma) ** -power``, capped at ``target``.

    ``step`` counts optimizer steps already averaged in, so the first update (step 0) copies the
    model and the decay then rises towards the target.
    """
    return min(target, 1.0 - (1.0 + step / gamma) ** -power)


def _check_decays(decays: Sequence[float]) -> list[float]:
    decays = [float(d) for d in decays]
    if not decays:
        raise ValueError("at least one EMA decay is required")
    return [check_decay(d) for d in decays]


# ----------------------------------------------------------------------------- schedules
class EmaSchedule:
    """The per-update decays of every shadow of one `ModelEma` (subclasses give `_decay`).

    Attributes:
        name: the ``--model-ema-schedule`` value.
        targets: one value per shadow that names it: its decay, or (`Power`) its sigma_rel.
    """
    name = ""
    target_name = "decay"

    def __init__(self, targets: Sequence[float]):
        self.targets = _check_decays(targets)

    def decays(self, step: int, every: int = 1) -> list[float]:
        """Per-update decays of the update that averages in the interval of ``every`` optimizer
        steps starting at step ``step`` (``step`` steps seen before it)."""
        return [float(self._decay(i, step, every)) for i in range(len(self.targets))]

    def _decay(self, index: int, step, every: int):
        """Shadow ``index``'s decay for the interval starting at ``step``: an int, or a numpy
        array of steps (`effective_half_lives`), with the same float64 arithmetic."""
        raise NotImplementedError

    def settings(self) -> dict:
        """What defines the schedule besides its targets (saved in the EMA's state)."""
        return {}

    def state_dict(self) -> dict:
        return {"name": self.name, "targets": list(self.targets), **self.settings()}

    def check_continues(self, ema_state: dict) -> None:
        """ValueError unless the shadows of a saved EMA state (`ModelEma.state_dict`) are named
        as this schedule names its own (decays, or sigma_rels), so they can continue under it."""
        saved = (ema_state.get("schedule") or {}).get("name")
        saved = saved or ("timm" if ema_state.get("warmup") else "constant")
        if (saved == "power") != (self.name == "power"):
            raise ValueError(f"EMA state holds {saved} shadows, this EMA {self.name} ones")

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({self.targets!r}{extra})"


class Constant(EmaSchedule):
    """The same decay at every step: ``decay ** every`` per update."""
    name = "constant"

    def _decay(self, index: int, step, every: int):
        return np.full(np.shape(step), self.targets[index] ** every)


class TimmWarmup(EmaSchedule):
    """timm's warmup (`warmup_decay`) of the interval's first step, raised to ``every``."""
    name = "timm"

    def __init__(self, targets: Sequence[float], power: float = 2 / 3, gamma: float = 1.0):
        super().__init__(targets)
        if not (power > 0 and gamma > 0):
            raise ValueError(f"warmup power and gamma must be > 0, got {power}, {gamma}")
        self.power, self.gamma = float(power), float(gamma)

    def _decay(self, index: int, step, every: int):
        rise = 1.0 - (1.0 + np.asarray(step, dtype=np.float64) / self.gamma) ** -self.power
        return np.minimum(self.targets[index], rise) ** every

    def settings(self) -> dict:
        return {"power": self.power, "gamma": self.gamma}

    def steps_to_target(self, index: int) -> float:
        """The optimizer step from which the warmup decay reaches its target."""
        return self.gamma * ((1.0 - self.targets[index]) ** (-1.0 / self.power) - 1.0)


class Debias(EmaSchedule):
    """Bias-corrected EMA: the normalised exponential average of the iterates seen so far."""
    name = "debias"

    def _decay(self, index: int, step, every: int):
        k = np.asarray(step // every + 1, dtype=np.float64)
        log_b = every * math.log(self.targets[index])
        # 1 - (1 - b) / (1 - b**k) with expm1: exact where b is near 1 and k small.
        return 1.0 - math.expm1(log_b) / np.expm1(k * log_b)


class Power(EmaSchedule):
    """EDM2's power-function EMA of relative width ``sigma_rels`` (or exponents ``gammas``)."""
    name = "power"
    target_name = "sigma_rel"

    def __init__(self, sigma_rels: Sequence[float] | None = None,
                 gammas: Sequence[float] | None = None):
        if (sigma_rels is None) == (gammas is None):
            raise ValueError("give the power EMA's sigma_rels or its gammas, not both")
        if gammas is not None:
            gammas = [float(g) for g in gammas]
            sigma_rels = [gamma_to_sigma_rel(g) for g in gammas]
        else:
            gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        super().__init__(sigma_rels)
        self.gammas = gammas

    def _decay(self, index: int, step, every: int):
        k = np.asarray(step // every + 1, dtype=np.float64)
        return (1.0 - 1.0 / k) ** (self.gammas[index] + 1.0)

    def settings(self) -> dict:
        return {"gammas": list(self.gammas)}


SCHEDULES = {cls.name: cls for cls in (Constant, TimmWarmup, Debias, Power)}


def make_schedule(name: str, targets: Sequence[float], warmup_power: float = 2 / 3,
                  warmup_gamma: float = 1.0) -> EmaSchedule:
    """The schedule ``name`` for shadows ``targets`` (decays; sigma_rels for ``power``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown EMA schedule {name!r}: one of {', '.join(SCHEDULES)}")
    if name == "timm":
        return TimmWarmup(targets, warmup_power, warmup_gamma)
    if name == "power":
        return Power(sigma_rels=targets)
    return SCHEDULES[name](targets)


def schedule_for(schedule: str | EmaSchedule, decay: float | Sequence[float] = 0.9998,
                 warmup: bool = False, warmup_power: float = 2 / 3,
                 warmup_gamma: float = 1.0) -> EmaSchedule:
    """`ModelEma`'s schedule from its arguments: an `EmaSchedule` as given, or the one named
    for ``decay`` (``warmup=True``: timm's, the old spelling)."""
    if isinstance(schedule, EmaSchedule):
        return schedule
    if warmup and schedule not in ("constant", "timm"):
        raise ValueError(f"warmup=True is the timm schedule, not {schedule!r}")
    targets = [decay] if isinstance(decay, numbers.Real) else list(decay)
    return make_schedule("timm" if warmup else schedule, targets, warmup_power, warmup_gamma)
