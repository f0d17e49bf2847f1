"""The face `ModelEma` shows a timm user: timm's ``ModelEmaV3`` as an `nn.Module`, its arguments
and its step count.

timm's documented V3 loop runs on `ModelEma` unchanged: ``ModelEma(model, decay=...,
use_warmup=...)``, ``update(model, step=num_updates)``, ``ema(images)`` (the first shadow),
``.to()``, ``.module``, ``.decay``, ``get_decay(step)`` and ``state_dict()`` with V3's keys, so
timm's ``get_state_dict(model_ema)`` gives the checkpoint's ``state_dict_ema``.
"""
from __future__ import annotations

import operator

from torch import nn


def timm_v3_arguments(kwargs: dict) -> dict:
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



def step_argument(step) -> int:
    """``update(model, step)``'s step: the optimizer steps so far, this one included."""
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"EMA step must be a whole number, got {step!r}") from None
    if step < 1:
        raise ValueError(f"EMA step counts the optimizer steps so far, this one included (timm's "
                         f"num_updates), so the first update is step=1; got {step} (from a "
                         f"0-based loop counter, pass i + 1)")
    return step


def is_full_state(state) -> bool:
    """Whether `state` is a `ModelEma.full_state_dict` (rather than V3's module state)."""
    return isinstance(state, dict) and "shadows" in state and "decays" in state


class TimmV3Module(nn.Module):
    """The `nn.Module` side of `ModelEma`, as timm's ``ModelEmaV3`` has it: calling it runs the
    first shadow, ``to()`` and the like move every shadow, and ``state_dict()`` holds the
    shadows' weights (``module.<name>`` for the first, as V3's, ``module_<i>.<name>`` for the
    others); ``decay`` and ``get_decay`` as V3's. `ModelEma` is this module; what it adds
    (several shadows, schedules, CPU shadows, the full state) lives there.

    As V3: the arguments ``decay``, ``device``, ``dtype``, ``use_warmup``, ``warmup_power``,
    ``warmup_gamma``, ``exclude_buffers``, ``foreach``; ``update(model, step)``, ``set``,
    ``get_decay``, ``decay``, ``module``, and the module API. Unlike V3 one instance keeps several
    shadows, 16-bit models get float32 shadows, schedules replace ``min_decay``, and without
    warmup ``update(model, step=1)`` averages with ``decay`` where V3 copies the model."""

    def forward(self, *args, **kwargs):
        """The first shadow's forward (``ema(images)``, as timm's ``ModelEmaV3``)."""
        self.wait()
        return self.module(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # `to()`, `cuda()`, `half()`, ... go through here: the shadows are re-packed where they
        # now live, so `device` and `dtype` tell the truth at once.
        self.wait()
        super()._apply(fn, recurse)
        self._adopt_shadows()
        return self

    @property
    def decay(self) -> float:
        """The first shadow's decay (timm's ``ModelEmaV3.decay``)."""
        return self.decays[0]

    def extra_repr(self) -> str:
        return f"{self.schedule!r}, every={self.every}"

    def get_decay(self, step: int | None = None) -> float:
        """As timm's ``ModelEmaV3.get_decay``: the target decay, or the per-update decay that
        ``update(model, step=step)`` averages the first shadow with (``current_decays`` gives
        every shadow's)."""
        if step is None:
            return self.decay
        step = step_argument(step) - 1
        return self.current_decays(step - step % self.every)[0]

    def state_dict(self, *args, **kwargs):
        """The shadows' weights as a module's (``module.<name>``, ``module_<i>.<name>``)."""
        self.wait()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The shadows' weights as a module's; a `full_state_dict` is loaded whole."""
        if is_full_state(state_dict):
            return self.load_full_state_dict(state_dict)
        self.wait()
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:  # new tensor objects: pack them again
            self._adopt_shadows()
        return result
