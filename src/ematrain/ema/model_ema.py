"""Exponential moving averages of model weights.

`ModelEma` keeps one or several shadows of a model, ``ema = decay * ema + (1 - decay) * model``,
updated together in one fused multi-tensor operation per call.

The tensor plumbing (what is averaged, packed how, updated in which fused calls) is private to
this package, in `_fused`, whose notes say why it looks the way it does; shadows on another device
are `devices`'; each update's decay is the schedule's (`schedules`); the nn.Module and timm V3
surface is `timm_v3`'s.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Iterator, Sequence

import torch
from torch import nn

from ..util.modules import unwrap_model
from ._fused import (
    Plan,
    Shadows,
    all_finite,
    float_and_int_tensors,
    install_registration_hooks,
    placement,
    shadow_copy,
)
from .devices import HostAverager, WeightSwapper
from .schedules import EmaSchedule, Power, schedule_for
from .timm_v3 import TimmV3Module, step_argument, timm_v3_arguments

__all__ = ["ModelEma"]


class ModelEma(TimmV3Module):
    """One or several exponential moving averages of a model's weights, as an `nn.Module`.

    Args:
        model: the model to average (DDP and ``torch.compile`` wrappers are unwrapped); it
            needs floating-point parameters or buffers.
        decay: one decay or a sequence of decays in (0, 1); one shadow is kept per decay.
        device: where the shadows live (default: with the model). A CPU shadow of a CUDA model
            is updated from pinned staging buffers.
        dtype: floating dtype of the shadows. Default: the model's, except that 16-bit models
            get a float32 shadow, because ``(1 - decay) * (model - ema)`` rounds away in 16 bits.
        every: average every ``every`` calls to `update` using ``decay ** every``, so the horizon
            in optimizer steps is unchanged while the cost drops ``every``-fold.
        schedule: how each update's decay is chosen (`schedules`): ``constant``, ``timm``,
            ``debias`` for ``decay``, or an `EmaSchedule` naming its shadows (`ModelEma.power`).
        warmup, warmup_power, warmup_gamma: ``schedule="timm"`` and its shape (the old spelling).
        skip_nonfinite: check the model before every update and skip (and count) an update whose
            weights hold NaN or Inf (see `_fused` for its cost). Off by default: then
            `nonfinite_shadows` tells whether a non-finite update reached the shadows.
        exclude_buffers: copy the model's buffers (BatchNorm statistics) instead of averaging
            them, as timm's ``ModelEmaV3(exclude_buffers=True)``.

    As timm's ``ModelEmaV3`` where it can be (`TimmV3Module` says what is V3's and where ours
    differs).

    Attributes:
        module: the first shadow (an eval-mode copy of the model holding the averaged weights);
            ``module_1``, ... the others; ``shadows`` all of them, in order.
        schedule: the `EmaSchedule`; ``decays`` are its targets (sigma_rels for ``power``).
        steps: `update` calls seen (optimizer steps), part of the state.
        num_updates: averaging operations applied.
        skipped_nonfinite: updates skipped because the model held NaN or Inf.

    `full_state_dict` / `load_full_state_dict` hold everything an exact resume needs: counters,
    schedule and every shadow. Moving or converting the EMA (``ema.to(...)``) or one shadow
    (``ema.module.to(...)``) is taken into account (the latter at the next update).
    """

    def __init__(self, model: nn.Module, decay: float | Sequence[float] = 0.9998,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 every: int = 1, warmup: bool = False, warmup_power: float = 2 / 3,
                 warmup_gamma: float = 1.0, skip_nonfinite: bool = False,
                 schedule: str | EmaSchedule = "constant", exclude_buffers: bool = False,
                 **timm_v3):
        super().__init__()
        install_registration_hooks()  # here, not at import: a library import changes no global
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {every}")
        warmup = timm_v3_arguments(timm_v3).get("warmup", warmup)
        self.schedule = schedule_for(schedule, _decay_argument(decay), warmup, warmup_power,
                                     warmup_gamma)
        self.average_buffers = not exclude_buffers
        self.every = int(every)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.steps = 0
        self.num_updates = 0
        self.skipped_nonfinite = 0
        source = unwrap_model(model)
        if not float_and_int_tensors(source)[0]:
            raise ValueError(f"ModelEma averages floating-point weights, and the "
                             f"{type(source).__name__} given has none")
        self.device, self.dtype = placement(source, device, dtype)
        for i in range(len(self.decays)):
            self.add_module(_shadow_name(i), shadow_copy(source, self.device, self.dtype))
        self._host = HostAverager()
        self._adopt_shadows()

    # ----------------------------------------------------------------------------- set-up
    def _adopt_shadows(self) -> None:
        """Take the shadows as they are now (again after they were moved from outside)."""
        self._shadows = Shadows(self.shadows, self.average_buffers)
        self.device, self.dtype = self._shadows.device, self._shadows.dtype

    @classmethod
    def power(cls, model: nn.Module, sigma_rels: Sequence[float], **kwargs) -> "ModelEma":
        """Shadows that are EDM2 power-function EMAs of relative widths ``sigma_rels`` (one
        shadow each; `ModelEma`'s other arguments as keywords, ``decay`` and warmup aside)."""
        return cls(model, schedule=Power(sigma_rels=sigma_rels), **kwargs)

    @property
    def shadows(self) -> list[nn.Module]:
        """The shadow modules, one per decay, in order (``module`` first)."""
        return [self._modules[_shadow_name(i)] for i in range(len(self.decays))]

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
        passes it, so 1 at the first); average the model every ``every`` steps. True when an
        average was applied."""
        self.steps = self.steps + 1 if step is None else step_argument(step)
        if self.steps % self.every != 0:
            return False
        self.wait()
        if self._shadows.moved():
            self._adopt_shadows()
        plan = self._shadows.plan_for(model)
        # ema = decay * ema + (1 - decay) * model: each shadow's lerp weight 1 - decay (its decay
        # is the schedule's), applied to every shadow in one fused call by `Plan.average`.
        weights = [1.0 - d for d in self.current_decays(self.steps - self.every)]
        if plan.sync is not None:  # a CUDA model, shadows in host memory: off the main thread
            self._host.submit(plan, self._average, weights)
            return True
        plan.read_model()
        return self._average(plan, weights)

    def _average(self, plan: Plan, weights: list[float]) -> bool:
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

    # ----------------------------------------------------------------------------- state
    def shadow_state_dict(self, index: int = 0) -> dict[str, torch.Tensor]:
        """Weights of shadow ``index`` under the model's own names (detached, on its device)."""
        self.wait()
        return self.shadows[index].state_dict()

    def full_state_dict(self) -> dict:
        """Everything needed to resume: decays, schedule settings, counters and all shadows."""
        self.wait()
        return {"decays": list(self.decays), "every": self.every,
                "schedule": self.schedule.state_dict(), "steps": self.steps,
                "num_updates": self.num_updates, "skipped_nonfinite": self.skipped_nonfinite,
                "shadows": [m.state_dict() for m in self.shadows]}

    def load_full_state_dict(self, state: dict, other_decays: bool = False) -> None:
        """Load the shadows and counters of a `full_state_dict`, all or nothing.

        The settings in `state` (``every``, the schedule) are not applied: they are this
        instance's (a resumed run decides which settings hold). The decays (sigma_rels) define
        what each shadow is, so they must match, unless `other_decays` accepts the same shadows
        at other per-step decays (a half-life over another batch size, or a file that recorded
        none), which keep this instance's. Every shadow must fit this model. ValueError
        otherwise, naming what differs.
        """
        _check_full_state(state, self, other_decays)
        self.wait()
        for module, shadow in zip(self.shadows, state["shadows"]):
            module.load_state_dict(shadow)
        self.steps = int(state["steps"])
        self.num_updates = int(state["num_updates"])
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))

    # ----------------------------------------------------------------------------- evaluation
    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module, index: int = 0) -> Iterator[nn.Module]:
        """Temporarily load shadow ``index`` into ``model``; restore the raw weights bit for bit.

        See `WeightSwapper`: no second copy of the model is held on its device, and optimizer
        state is untouched.
        """
        self.wait()
        swapper = WeightSwapper(model, [self.shadows[index]])
        try:
            swapper.load(1)
            yield model
        finally:
            swapper.restore()

    def scored_dtype(self, model: nn.Module) -> torch.dtype:
        """The dtype validation scores the shadows in: their own, or the live model's when the
        shadows live on another device and are swapped into it."""
        live = next(unwrap_model(model).parameters())
        return live.dtype if self.device != live.device else self.dtype


def _shadow_name(index: int) -> str:
    return "module" if index == 0 else f"module_{index}"


def _decay_argument(decay) -> float | list[float]:
    """``decay`` as a number or a list of numbers (a string such as "0.9" is refused)."""
    if isinstance(decay, numbers.Real) and not isinstance(decay, bool):
        return float(decay)
    if isinstance(decay, Sequence) and not isinstance(decay, (str, bytes)) and all(
            isinstance(d, numbers.Real) and not isinstance(d, bool) for d in decay):
        return [float(d) for d in decay]
    raise TypeError(f"ModelEma decay must be a number or a sequence of numbers, got {decay!r}")


_FULL_STATE_KEYS = ("decays", "steps", "num_updates", "shadows")



def _check_full_state(state, ema: ModelEma, other_decays: bool = False) -> None:
    """A saved full state must hold the shadows this EMA keeps: as many, of the same decays,
    each fitting the model (of other decays too with `other_decays`); ValueError naming the first
    difference otherwise."""
    missing = [k for k in _FULL_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"not a ModelEma full_state_dict(): it lacks "
                         f"{', '.join(repr(k) for k in missing)}")
    ema.schedule.check_continues(state)
    decays = ema.decays
    if len(state["shadows"]) != len(decays):
        raise ValueError(f"EMA state holds {len(state['shadows'])} shadows, "
                         f"this EMA has {len(decays)}")
    saved = [float(d) for d in state["decays"]]
    if not other_decays and any(abs(a - b) > 1e-12 for a, b in zip(saved, decays)):
        raise ValueError(f"EMA state averages decays {', '.join(f'{d:g}' for d in saved)}, "
                         f"this EMA {', '.join(f'{d:g}' for d in decays)}")
    for i, (module, shadow) in enumerate(zip(ema.shadows, state["shadows"])):
        own = module.state_dict()
        missing = [k for k in own if k not in shadow]
        unexpected = [k for k in shadow if k not in own]
        wrong = [k for k in own
                 if k in shadow and getattr(shadow[k], "shape", None) != own[k].shape]
        for what, keys in (("lacks", missing), ("has unexpected", unexpected),
                           ("has another shape for", wrong)):
            if keys:
                raise ValueError(f"EMA state's shadow {i} {what} {len(keys)} key(s) of the "
                                 f"model, e.g. {keys[0]!r}")
