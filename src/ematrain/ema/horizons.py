"""What each EMA's horizon really is under its schedule: the start-up log and the final advice.

The horizon of a shadow is its *effective* half-life (`effective_half_lives`, below): the
age of the iterates that hold half of its weight, under the schedule in force. A decay alone
says little: timm's warmup keeps 0.9998 far below its target for 354,000 updates, and a long
constant EMA still holds its random start weights. The start-up log gives that horizon at 10%,
50% and 100% of the run, and warns when it is not what the decay promises; the final report
says, for each EMA that ended worse than the raw weights, why in one line and what to try.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .half_life import half_life_from_decay
from .model_ema import ModelEma
from .schedules import EmaSchedule, TimmWarmup

FRACTIONS = (0.1, 0.5, 1.0)
# A horizon at the end of the run longer than this share of it still averages early weights.
LONG_SHARE = 0.25
# The half-life the advice aims at: this share of the run.
ADVISED_SHARE = 0.05
# The advice never proposes a half-life of fewer averaging updates than this: a shorter one is
# the raw weights with a little smoothing, whatever the run.
MIN_ADVISED_UPDATES = 4


# ----------------------------------------------------------------------------- horizons
def effective_half_lives(schedule: EmaSchedule, steps: int, every: int = 1) -> list[float]:
    """Each shadow's effective half-life after ``steps`` optimizer steps, in optimizer steps.

    The shadow is a weighted sum of the start weights and every iterate averaged in; its half-
    life here is the age ``H`` such that the iterates of the last ``H`` steps hold half of its
    weight (interpolated between updates). For a constant decay ``d`` this is ``ln 0.5 / ln d``
    as long as the start weights hold less than half; when they hold more (the horizon is longer
    than the run so far) it is ``inf``. Exact for every schedule, at O(steps / every) cost.
    """
    updates = steps // every
    if updates < 1:
        return [math.inf] * len(schedule.targets)
    starts = np.arange(updates, dtype=np.int64) * every
    out = []
    for i in range(len(schedule.targets)):
        decays = schedule._decay(i, starts, every)
        # log of the product of the last m decays = the log of the weight older than m updates.
        with np.errstate(divide="ignore"):
            tail = np.cumsum(np.log(decays[::-1]))
        m = int(np.searchsorted(-tail, -math.log(0.5)))  # first m with tail[m] <= ln 0.5
        if m >= updates:
            out.append(math.inf)
            continue
        before = tail[m - 1] if m > 0 else 0.0
        frac = (before - math.log(0.5)) / (before - tail[m]) if tail[m] != before else 1.0
        out.append((m + frac) * every)
    return out


def start_shares(schedule: EmaSchedule, steps: int, every: int = 1) -> list[float]:
    """Each shadow's weight on the start weights after ``steps`` optimizer steps: the product
    of all its update decays (0 once a schedule's first update copied the model)."""
    starts = np.arange(steps // every, dtype=np.int64) * every
    return [float(np.prod(schedule._decay(i, starts, every))) for i in range(len(schedule.targets))]


# ----------------------------------------------------------------------------- log lines
@dataclass(frozen=True)
class RunLength:
    """The run's length in the units horizons are stated in."""
    steps_per_epoch: int
    total_steps: int
    images_per_step: int

    def steps(self, fraction: float) -> int:
        return max(1, round(fraction * self.total_steps))

    def epochs(self, steps: float) -> float:
        return steps / self.steps_per_epoch


def nominal_half_life(ema: ModelEma, index: int) -> float | None:
    """The half-life, in optimizer steps, the shadow's decay means by itself (None for the power
    schedule, whose horizon is a share of the training so far)."""
    if ema.schedule.name == "power":
        return None
    return half_life_from_decay(ema.decays[index])


def _amounts(steps: list[float], length: RunLength) -> str:
    def each(fmt):
        return " / ".join("start" if math.isinf(s) else fmt(s) for s in steps)
    text = (f"{each(lambda s: f'{s:.3g}')} steps = {each(lambda s: f'{length.epochs(s):.3g}')} "
            f"epochs = {each(lambda s: f'{s * length.images_per_step:.3g}')} images")
    if any(math.isinf(s) for s in steps):
        text += " ('start': the start weights still hold over half of the shadow)"
    return text


def _times(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def startup_lines(ema: ModelEma, labels: list[str], length: RunLength) -> list[tuple[bool, str]]:
    """(is_warning, text) lines: each EMA's effective half-life at 10/50/100% of the run, and
    warnings where the schedule keeps it far from its target or it is longer than the run."""
    at = {f: effective_half_lives(ema.schedule, length.steps(f), ema.every) for f in FRACTIONS}
    lines = []
    for i, label in enumerate(labels):
        horizons = [at[f][i] for f in FRACTIONS]
        nominal = nominal_half_life(ema, i)
        line = (f"{label} ({ema.schedule.name} schedule): effective half-life at 10% / 50% / 100% "
                f"of the run {_amounts(horizons, length)}")
        if nominal is not None and ema.schedule.name != "constant":
            line += f"; the decay {ema.decays[i]:.6g} alone means {nominal:.4g} steps"
        if ema.every > 1:
            line += f" (updated every {ema.every} steps)"
        lines.append((False, line))
        lines += [(True, w) for w in _warnings(ema, i, label, horizons, nominal, length)]
    return lines


def _warnings(ema, i, label, horizons, nominal, length: RunLength) -> list[str]:
    end, middle, total = horizons[-1], horizons[1], length.total_steps
    if math.isinf(end):
        return [f"warning: {label} has a half-life longer than the whole run ({total} steps): it "
                f"will still mostly hold the start weights"]
    if isinstance(ema.schedule, TimmWarmup) and middle < 0.5 * nominal:
        reach = ema.schedule.steps_to_target(i)
        return [f"warning: timm's warmup keeps {label} far below its decay for most of the run: "
                f"its half-life is {middle:.4g} steps at 50% and {end:.4g} at the end, not "
                f"{nominal:.4g}; it reaches {ema.decays[i]:.6g} only after {reach:,.0f} steps "
                f"({_times(reach / total)} the run). --model-ema-schedule debias reaches the decay "
                f"as fast as the arithmetic allows"]
    if nominal is not None and nominal > total:
        return [f"warning: {label}'s decay has a half-life ({nominal:.4g} steps) longer than the "
                f"whole run ({total} steps): under the {ema.schedule.name} schedule it is close "
                f"to a plain average of the run so far (half-life {end:.4g} steps at the end)"]
    if end > LONG_SHARE * total:
        start = start_shares(ema.schedule, total, ema.every)[i]
        return [f"warning: {label} has a half-life at the end of the run ({end:.4g} steps) of "
                f"{100 * end / total:.0f}% of the run: it will still average early weights"
                + (f", {100 * start:.0f}% of it the start weights" if start >= 0.01 else "")]
    if end < 0.1 * length.steps_per_epoch:
        return [f"warning: {label} has a half-life ({end:.4g} steps) under a tenth of an epoch "
                f"at the end of the run: it averages almost nothing"]
    return []


def advice(ema: ModelEma, labels: list[str], length: RunLength, raw: float,
           finals: list[float], metric: str) -> list[str]:
    """For each EMA whose final `metric` is worse than the raw weights' `raw`: why, in one
    line, and a setting to try (never a horizon under `MIN_ADVISED_UPDATES` averaging updates,
    nor one about the length the EMA had). `finals` are the shadows' final values, in order."""
    lower_better = metric == "loss"
    worse = [i for i, v in enumerate(finals) if (v > raw if lower_better else v < raw)]
    if not worse:
        return []
    ends = effective_half_lives(ema.schedule, length.total_steps, ema.every)
    lines = []
    for i in worse:
        end, gap = ends[i], f"{metric} {finals[i]:.2f} vs raw {raw:.2f}"
        share = math.inf if math.isinf(end) else end / length.total_steps
        if share > LONG_SHARE:
            horizon = ("longer than the run" if math.isinf(end) else
                       f"{length.epochs(end):.3g} epochs, {100 * share:.0f}% of the run")
            why = f"its horizon at the end ({horizon}) still averages the early, worse weights"
            fix = _half_life(ADVISED_SHARE * length.total_steps, end, shorter=True, ema=ema,
                             length=length)
            if ema.schedule.name == "constant":
                debias = "--model-ema-schedule debias, which gives the start weights no share"
                fix = f"{fix} (or {debias})" if fix else debias
        elif end < 0.1 * length.steps_per_epoch:
            why = (f"its horizon at the end ({end:.3g} steps) averages almost nothing, so it "
                   f"is the raw weights plus noise")
            fix = _half_life(max(length.steps_per_epoch, ADVISED_SHARE * length.total_steps),
                             end, shorter=False, ema=ema, length=length)
        else:
            why = (f"its horizon at the end ({length.epochs(end):.3g} epochs) reaches back to "
                   f"weights that were still clearly worse")
            fix = _half_life(end / 4, end, shorter=True, ema=ema, length=length)
        if ema.schedule.name == "power":  # its horizon is set by sigma_rel, not a half-life
            scale = 2.0 if end < 0.1 * length.steps_per_epoch else 0.5
            fix = f"--model-ema-sigma-rel {ema.decays[i] * scale:.2g}"
        fix = (f"try {fix}" if fix else f"at {length.total_steps} steps the run is too short for "
               f"a shorter horizon of at least {MIN_ADVISED_UPDATES} updates: train longer")
        lines.append(f"{labels[i]} ended worse than the raw weights ({gap}): {why}; {fix}")
    return lines


def _half_life(steps: float, current: float, shorter: bool, ema: ModelEma,
               length: RunLength) -> str | None:
    """``--model-ema-half-life`` of about `steps` optimizer steps, at least a few updates, in
    epochs (or steps under a tenth of an epoch); None when that is not `shorter` (or longer)
    than the EMA's `current` horizon by a clear margin: it had that horizon already."""
    steps = max(steps, MIN_ADVISED_UPDATES * ema.every)
    in_epochs = steps >= 0.1 * length.steps_per_epoch
    # Two significant digits, rounded up so the floor holds as printed.
    value = _round_up(length.epochs(steps) if in_epochs else steps, 2)
    steps = value * length.steps_per_epoch if in_epochs else value
    if not math.isinf(current) and (steps > 0.75 * current if shorter else steps < 1.5 * current):
        return None
    return f"--model-ema-half-life {value:g}{'ep' if in_epochs else 'it'}"


def _round_up(x: float, digits: int) -> float:
    unit = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{math.ceil(x / unit - 1e-9) * unit:.{digits}g}")


# ----------------------------------------------------------------------------- horizons
