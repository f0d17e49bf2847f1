"""Exponential moving averages of model weights.

`ModelEma` keeps one or several shadows of a model, ``ema = decay * ema + (1 - decay) * model``,
updated together in one fused multi-tensor operation per call.

The tensor plumbing (what is averaged, packed how, updated in which fused calls, on which
device and thread) lives in `ema_tensors`, whose notes say why it looks the way it does.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .ema_schedules import EmaSchedule, Power, schedule_for, warmup_decay
from .ema_tensors import (HostAverager, Plan, Shadows, all_finite, float_and_int_tensors,
                          placement, shadow_copy)
from .models import unwrap_model

__all__ = [
    "ModelEma",
    "WeightSwapper",
    "decay_from_half_life",
    "half_life_from_decay",
    "parse_half_life",
    "warmup_decay",  # re-exported from ema_schedules, where it lives now
]


def half_life_from_decay(decay: float) -> float:
    """Updates after which an old weight's share has halved: ln 0.5 / ln decay."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay}")
    return math.log(0.5) / math.log(decay)


def decay_from_half_life(half_life_updates: float) -> float:
    """Per-update decay whose half-life is ``half_life_updates`` updates."""
    if half_life_updates <= 0:
        raise ValueError(f"half-life must be positive, got {half_life_updates}")
    return 0.5 ** (1.0 / half_life_updates)


_HALF_LIFE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kKmM]?)\s*(ep|it|img)\s*$")


@dataclass(frozen=True)
class HalfLife:
    value: float
    unit: str  # 'ep', 'it' or 'img'

    def in_updates(self, images_per_update: float, updates_per_epoch: float) -> float:
        """Convert to EMA updates given the real images per update and updates per epoch."""
        if self.unit == "it":
            # 'it' counts optimizer steps; images_per_update already includes the update interval.
            return self.value
        if self.unit == "ep":
            return self.value * updates_per_epoch
        return self.value / images_per_update


def parse_half_life(text: str) -> HalfLife:
    """Parse ``'2ep'``, ``'500it'``, ``'1.2Mimg'`` or ``'300kimg'``."""
    match = _HALF_LIFE_RE.match(text)
    if not match:
        raise ValueError(
            f"bad half-life {text!r}: expected a number and a unit, e.g. 2ep, 500it, 300kimg")
    number, suffix, unit = match.groups()
    value = float(number)
    if suffix and unit != "img":
        raise ValueError(f"bad half-life {text!r}: k/M suffixes apply to img only")
    value *= {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6}[suffix]
    if not 0 < value < math.inf:
        raise ValueError(f"bad half-life {text!r}: must be a positive finite number")
    return HalfLife(value, unit)



def _timm_v3_arguments(kwargs: dict) -> dict:
    """What a timm ``ModelEmaV3`` user passes that means the same here: ``use_warmup`` (timm's
    warmup schedule), ``foreach`` (updates here are always fused, so it is accepted and has no
    effect); ``min_decay`` and ``update_after_step`` only at their no-op defaults."""
    kwargs = dict(kwargs)
    out = {"warmup": bool(kwargs.pop("use_warmup"))} if "use_warmup" in kwargs else {}
    kwargs.pop("foreach", None)
    for name, off in (("min_decay", 0.0), ("update_after_step", 0)):
        if name in kwargs and kwargs.pop(name) != off:
            raise ValueError(f"ModelEma has no {name}: its schedules ('timm', 'debias', "
                             f"'power') shape the start of the average instead")
    if kwargs:
        raise TypeError(f"ModelEma got unexpected keyword argument(s): {', '.join(kwargs)}")
    return out


class ModelEma:
    """One or several exponential moving averages of a model's weights.

    Args:
        model: the model to average (DDP and ``torch.compile`` wrappers are unwrapped).
        decay: one decay or a sequence of decays in (0, 1); one shadow is kept per decay.
        device: where the shadows live (default: with the model). A CPU shadow of a CUDA model
            is updated from pinned staging buffers.
        dtype: floating dtype of the shadows. Default: the model's, except that 16-bit models
            get a float32 shadow, because ``(1 - decay) * (model - ema)`` rounds away in 16 bits.
        every: average every ``every`` calls to `update` using ``decay ** every``, so the horizon
            in optimizer steps is unchanged while the cost drops ``every``-fold.
        schedule: how each update's decay is chosen (`ema_schedules`): ``constant``, ``timm``,
            ``debias`` for ``decay``, or an `EmaSchedule` naming its shadows (`ModelEma.power`).
        warmup, warmup_power, warmup_gamma: ``schedule="timm"`` and its shape (the old spelling).
        skip_nonfinite: check the model before every update and skip (and count) an update whose
            weights hold NaN or Inf (see the module notes for its cost). Off by default: then
            `nonfinite_shadows` tells whether a non-finite update reached the shadows.
        exclude_buffers: copy the model's buffers (BatchNorm statistics) instead of averaging
            them, as timm's ``ModelEmaV3(exclude_buffers=True)``.

    From timm's ``ModelEmaV3``: ``decay``, ``device``, ``warmup_power``/``warmup_gamma``,
    ``exclude_buffers``, ``use_warmup``, ``foreach`` and ``update(model, step)`` mean the same
    (but V3 also copies the model at ``step=1`` without warmup). Unlike V3 one instance keeps
    several shadows, 16-bit models get float32 shadows, and schedules replace ``min_decay``.

    Attributes:
        modules: one eval-mode copy of the model per decay, holding the averaged weights.
        module: ``modules[0]``.
        schedule: the `EmaSchedule`; ``decays`` are its targets (sigma_rels for ``power``).
        steps: `update` calls seen (optimizer steps), part of the state.
        num_updates: averaging operations applied.
        skipped_nonfinite: updates skipped because the model held NaN or Inf.

    Moving or converting a shadow module (``ema.module.to(...)``) is noticed at the next update.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float | Sequence[float] = 0.9998,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        every: int = 1,
        warmup: bool = False,
        warmup_power: float = 2 / 3,
        warmup_gamma: float = 1.0,
        skip_nonfinite: bool = False,
        schedule: str | EmaSchedule = "constant",
        exclude_buffers: bool = False,
        **timm_v3,
    ):
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {every}")
        warmup = _timm_v3_arguments(timm_v3).get("warmup", warmup)
        self.schedule = schedule_for(schedule, decay, warmup, warmup_power, warmup_gamma)
        self.average_buffers = not exclude_buffers
        self.every = int(every)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.steps = 0
        self.num_updates = 0
        self.skipped_nonfinite = 0
        source = unwrap_model(model)
        self.device, self.dtype = placement(source, device, dtype)
        self.modules = [shadow_copy(source, self.device, self.dtype) for _ in self.decays]
        self._host = HostAverager()
        self._adopt_shadows()

    # ----------------------------------------------------------------------------- set-up
    def _adopt_shadows(self) -> None:
        """Take the shadows as they are now (again after they were moved from outside)."""
        self._shadows = Shadows(self.modules, self.average_buffers)
        self.device, self.dtype = self._shadows.device, self._shadows.dtype

    @classmethod
    def power(cls, model: nn.Module, sigma_rels: Sequence[float], **kwargs) -> "ModelEma":
        """Shadows that are EDM2 power-function EMAs of relative widths ``sigma_rels`` (one
        shadow each; `ModelEma`'s other arguments as keywords, ``decay`` and warmup aside)."""
        return cls(model, schedule=Power(sigma_rels=sigma_rels), **kwargs)

    @property
    def module(self) -> nn.Module:
        return self.modules[0]

    @property
    def decays(self) -> list[float]:
        """What names each shadow: its decay, or its sigma_rel under the power schedule."""
        return self.schedule.targets

    # ----------------------------------------------------------------------------- decay
    def current_decays(self, step: int | None = None) -> list[float]:
        """Per-update decays of the update whose interval starts at optimizer step ``step``
        (default: the interval in progress)."""
        step = self.steps - self.steps % self.every if step is None else step
        return self.schedule.decays(step, self.every)

    # ----------------------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> bool:
        """Count one optimizer step (``step``: set the count, steps including this one, as timm
        passes it); average the model every ``every`` steps. True when an average was applied."""
        self.steps = self.steps + 1 if step is None else int(step)
        if self.steps % self.every != 0:
            return False
        self.wait()
        if self._shadows.moved():
            self._adopt_shadows()
        plan = self._shadows.plan_for(model)
        weights = [1.0 - d for d in self.current_decays(self.steps - self.every)]
        if plan.sync is not None:  # a CUDA model, shadows in host memory: off the main thread
            self._host.submit(plan, self._average, weights)
            return True
        plan.read_model()
        return self._average(plan, weights)

    def _average(self, plan: "Plan", weights: list[float]) -> bool:
        if self.skip_nonfinite and not all_finite(plan.check):
            self.skipped_nonfinite += 1
            return False
        plan.average(weights)
        plan.copy_ints(self._shadows)
        self.num_updates += 1
        return True

    def wait(self) -> None:
        """Wait for an update still running in the background (shadows in host memory)."""
        self._host.wait()

    def nonfinite_shadows(self) -> list[int]:
        """Indices of the shadows holding NaN or Inf (empty when all are finite); reads every
        shadow once, with one host synchronization."""
        self.wait()
        return [i for i, floats in enumerate(self._shadows.floats) if not all_finite(list(floats))]

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy the model's weights into every shadow (the update count is kept)."""
        self.wait()
        floats, ints = float_and_int_tensors(unwrap_model(model), self.average_buffers)
        for shadow_floats, shadow_ints in zip(self._shadows.floats, self._shadows.ints):
            torch._foreach_copy_(shadow_floats, floats)
            if ints:
                torch._foreach_copy_(shadow_ints, ints)

    # ----------------------------------------------------------------------------- evaluation
    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module, index: int = 0) -> Iterator[nn.Module]:
        """Temporarily load shadow ``index`` into ``model``; restore the raw weights bit for bit.

        See `WeightSwapper`: no second copy of the model is held on its device, and optimizer
        state is untouched.
        """
        self.wait()
        swapper = WeightSwapper(model, [self.modules[index]])
        try:
            swapper.load(1)
            yield model
        finally:
            swapper.restore()

    # ----------------------------------------------------------------------------- state
    def shadow_state_dict(self, index: int = 0) -> dict[str, torch.Tensor]:
        """Weights of shadow ``index`` under the model's own names (detached, on its device)."""
        self.wait()
        return self.modules[index].state_dict()

    def state_dict(self) -> dict:
        """Everything needed to resume: decays, schedule settings, counters and all shadows."""
        self.wait()
        return {
            "decays": list(self.decays),
            "every": self.every,
            "schedule": self.schedule.state_dict(),
            "steps": self.steps,
            "num_updates": self.num_updates,
            "skipped_nonfinite": self.skipped_nonfinite,
            "shadows": [m.state_dict() for m in self.modules],
        }

    def load_state_dict(self, state: dict) -> None:
        """Load the shadows and counters of `state`.

        The settings in `state` (``every``, the schedule) are not applied: they are this
        instance's (a resumed run decides which settings hold). The decays (sigma_rels) define
        what each shadow is, so they must match: ValueError otherwise.
        """
        self.schedule.check_continues(state)
        _check_same_shadows(state, self.decays)
        self.wait()
        for module, shadow in zip(self.modules, state["shadows"]):
            module.load_state_dict(shadow)
        self.steps = int(state["steps"])
        self.num_updates = int(state["num_updates"])
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))

    def scored_dtype(self, model: nn.Module) -> torch.dtype:
        """The dtype validation scores the shadows in: their own, or the live model's when the
        shadows live on another device and are swapped into it."""
        live = next(unwrap_model(model).parameters())
        return live.dtype if self.device != live.device else self.dtype


def _check_same_shadows(state: dict, decays: list[float]) -> None:
    """A saved EMA state must hold the shadows this EMA keeps: as many, of the same decays."""
    if len(state["shadows"]) != len(decays):
        raise ValueError(f"EMA state holds {len(state['shadows'])} shadows, "
                         f"this EMA has {len(decays)}")
    saved = [float(d) for d in state["decays"]]
    if any(abs(a - b) > 1e-12 for a, b in zip(saved, decays)):
        raise ValueError(f"EMA state averages decays {', '.join(f'{d:g}' for d in saved)}, "
                         f"this EMA {', '.join(f'{d:g}' for d in decays)}")


class WeightSwapper:
    """Loads the raw weights or one of several shadows into the live model, one copy per change.

    This is how a shadow that lives elsewhere (``--model-ema-force-cpu``) is evaluated on the
    training device without a second copy of the model there. The raw weights are stashed in
    host memory (pinned for a CUDA model) and `restore` puts them back bit for bit. Only tensor
    values are copied, so the Parameter objects, and the optimizer state keyed on them, stay.

    Sets are numbered 0 (the raw weights) and 1.. (``shadows`` in order).
    """

    def __init__(self, model: nn.Module, shadows: Sequence[nn.Module]):
        source = unwrap_model(model)
        self.live = list(source.parameters()) + list(source.buffers())
        on_cuda = any(t.device.type == "cuda" for t in self.live)
        stash = [t.detach().to("cpu", copy=True) for t in self.live]
        if on_cuda and torch.cuda.is_available():
            stash = [t.pin_memory() for t in stash]
        self.sets = [stash] + [list(m.parameters()) + list(m.buffers()) for m in shadows]
        for tensors in self.sets[1:]:
            if len(tensors) != len(self.live):
                raise ValueError("shadow does not match the model's structure")
        self.current = 0

    @torch.no_grad()
    def load(self, index: int) -> None:
        """Make set ``index`` the live weights (a no-op when it already is)."""
        if index != self.current:
            torch._foreach_copy_(self.live, self.sets[index], non_blocking=True)
            self.current = index

    def restore(self) -> None:
        """Put the raw weights back, and wait for the copy so the stash can be dropped."""
        self.load(0)
        if any(t.device.type == "cuda" for t in self.live):
            torch.cuda.synchronize()
