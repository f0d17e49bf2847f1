"""Exponential moving averages of model weights.

`ModelEma` keeps one or several shadows of a model, ``ema = decay * ema + (1 - decay) * model``,
updated together in one fused multi-tensor operation per call.

Design notes (why it looks the way it does):

* The tensor lists the update works on are built once and reused. The model side is cached by
  the identity and storage pointers of its tensors, so a model moved or re-allocated between
  steps is picked up again instead of silently reading stale memory.
* Floating-point parameters *and* floating-point buffers (BatchNorm running statistics) are
  averaged; integer buffers (``num_batches_tracked``) are copied.
* Several decays are updated by one ``torch._foreach_lerp_`` call over a list in which every
  slice of the model is followed by the matching slices of each shadow. Slices are small enough
  to stay in cache, so the model is read from memory about once rather than once per decay.
* The shadow may live on another device or in another dtype (a float32 shadow of a bfloat16
  model). The model is then first copied into staging buffers (pinned host memory for a CUDA
  model and a CPU shadow) with batched non-blocking copies, and the update runs where the
  shadow lives.
* An update whose model weights hold NaN or Inf is skipped and counted, never blended in.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "ModelEma",
    "unwrap_model",
    "decay_from_half_life",
    "half_life_from_decay",
    "parse_half_life",
    "warmup_decay",
]

# Slices of this many elements (1 MiB of float32) keep one model slice and its shadows in L2.
_CHUNK_ELEMS = 1 << 18


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def half_life_from_decay(decay: float) -> float:
    """Updates after which an old weight's share has halved: ln 0.5 / ln decay."""
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
    if value <= 0:
        raise ValueError(f"bad half-life {text!r}: must be positive")
    return HalfLife(value, unit)


def warmup_decay(target: float, step: int, power: float = 2 / 3, gamma: float = 1.0) -> float:
    """timm's EMA warmup: ``1 - (1 + step / gamma) ** -power``, capped at ``target``.

    ``step`` counts optimizer steps already averaged in, so the first update (step 0) copies the
    model and the decay then rises towards the target.
    """
    return min(target, 1.0 - (1.0 + step / gamma) ** -power)


def _float_and_int_tensors(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters and buffers in a stable order, each storage once (tied weights count once)."""
    floats, ints, seen = [], [], set()
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        (floats if tensor.is_floating_point() else ints).append(tensor)
    return floats, ints


def _chunks(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Flat views of at most _CHUNK_ELEMS elements (the whole tensor if it cannot be flattened)."""
    if not tensor.is_contiguous() or tensor.numel() <= _CHUNK_ELEMS:
        return [tensor]
    return list(tensor.detach().view(-1).split(_CHUNK_ELEMS))


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
        warmup: use timm's warmup schedule (see `warmup_decay`) instead of the fixed decay.
        warmup_power, warmup_gamma: warmup shape.
        skip_nonfinite: skip (and count) updates whose model weights hold NaN or Inf.

    Attributes:
        modules: one eval-mode copy of the model per decay, holding the averaged weights.
        module: ``modules[0]``.
        steps: `update` calls seen (optimizer steps), part of the state.
        num_updates: averaging operations applied.
        skipped_nonfinite: updates skipped because the model held NaN or Inf.
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
        skip_nonfinite: bool = True,
    ):
        decays = [float(decay)] if isinstance(decay, (int, float)) else [float(d) for d in decay]
        if not decays:
            raise ValueError("at least one EMA decay is required")
        for d in decays:
            if not 0.0 < d < 1.0:
                raise ValueError(f"EMA decay must be in (0, 1), got {d}")
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {every}")
        self.decays = decays
        self.every = int(every)
        self.warmup = bool(warmup)
        self.warmup_power = float(warmup_power)
        self.warmup_gamma = float(warmup_gamma)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.steps = 0
        self.num_updates = 0
        self.skipped_nonfinite = 0

        source = unwrap_model(model)
        src_floats, _ = _float_and_int_tensors(source)
        model_dtype = src_floats[0].dtype if src_floats else torch.float32
        if dtype is None:
            dtype = torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype
        self.dtype = dtype
        if device is None:
            device = src_floats[0].device if src_floats else torch.device("cpu")
        self.device = torch.device(device)

        self.modules = [self._make_copy(source) for _ in decays]
        self._shadow_floats, self._shadow_ints = [], []
        for module in self.modules:
            floats, ints = _float_and_int_tensors(module)
            self._shadow_floats.append(floats)
            self._shadow_ints.append(ints)
        self._model_key = None
        self._plan = None

    # ----------------------------------------------------------------------------- set-up
    def _make_copy(self, source: nn.Module) -> nn.Module:
        module = copy.deepcopy(source)
        module.to(device=self.device)
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(self.dtype)
        module.eval()
        module.requires_grad_(False)
        return module

    @property
    def module(self) -> nn.Module:
        return self.modules[0]

    def _model_tensors(self, model: nn.Module):
        """The model's tensors, rebuilding the update plan when they moved or were replaced."""
        source = unwrap_model(model)
        floats, ints = _float_and_int_tensors(source)
        key = (id(source), tuple(t.data_ptr() for t in floats), tuple(t.data_ptr() for t in ints))
        if key != self._model_key:
            if len(floats) != len(self._shadow_floats[0]) or len(ints) != len(self._shadow_ints[0]):
                raise ValueError("model does not match the EMA's structure")
            for m, s in zip(floats, self._shadow_floats[0]):
                if m.shape != s.shape:
                    raise ValueError(f"model tensor of shape {tuple(m.shape)} does not match EMA "
                                     f"tensor of shape {tuple(s.shape)}")
            self._model_key = key
            self._plan = self._build_plan(floats, ints)
        return self._plan

    def _build_plan(self, floats, ints) -> dict:
        needs_staging = any(t.device != self.device or t.dtype != self.dtype for t in floats)
        staging = None
        sources = floats
        if needs_staging:
            pin = self.device.type == "cpu" and any(t.device.type == "cuda" for t in floats)
            total = sum(t.numel() for t in floats)
            flat = torch.empty(total, dtype=self.dtype, device=self.device, pin_memory=pin)
            staging, offset = [], 0
            for t in floats:
                staging.append(flat[offset:offset + t.numel()].view(t.shape))
                offset += t.numel()
            sources = staging
        if len(self.decays) == 1:
            lerp_self, lerp_end = self._shadow_floats[0], list(sources)
        else:
            # Every model slice followed by the same slice of each shadow: see module docstring.
            lerp_self, lerp_end = [], []
            shadow_chunks = [[_chunks(t) for t in shadow] for shadow in self._shadow_floats]
            for i, src in enumerate(sources):
                for j, src_chunk in enumerate(_chunks(src)):
                    for k in range(len(self.decays)):
                        lerp_self.append(shadow_chunks[k][i][j])
                        lerp_end.append(src_chunk)
        int_sources = [t for t in ints]
        return {
            "floats": floats,
            "staging": staging,
            "lerp_self": lerp_self,
            "lerp_end": lerp_end,
            "ints": int_sources,
        }

    # ----------------------------------------------------------------------------- decay
    def current_decays(self, step: int | None = None) -> list[float]:
        """Per-update decays used at optimizer step ``step`` (default: the next update)."""
        step = self.steps if step is None else step
        decays = self.decays
        if self.warmup:
            decays = [warmup_decay(d, step, self.warmup_power, self.warmup_gamma) for d in decays]
        return [d ** self.every for d in decays]

    # ----------------------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, model: nn.Module) -> bool:
        """Count one optimizer step; average the model in every ``every`` steps.

        Returns True when an average was applied.
        """
        self.steps += 1
        if self.steps % self.every != 0:
            return False
        plan = self._model_tensors(model)
        floats = plan["floats"]
        if plan["staging"] is not None:
            torch._foreach_copy_(plan["staging"], floats, non_blocking=True)
            if any(t.device.type == "cuda" for t in floats):
                torch.cuda.current_stream(floats[0].device).synchronize()
            floats = plan["staging"]
        if self.skip_nonfinite and not _all_finite(floats):
            self.skipped_nonfinite += 1
            return False
        # The decay of the step that completes this interval (warmup counts from step 0).
        decays = self.current_decays(self.steps - self.every)
        weights = [1.0 - d for d in decays]
        if len(weights) == 1:
            torch._foreach_lerp_(plan["lerp_self"], plan["lerp_end"], weights[0])
        else:
            torch._foreach_lerp_(plan["lerp_self"], plan["lerp_end"],
                                 weights * (len(plan["lerp_self"]) // len(weights)))
        if plan["ints"]:
            for shadow_ints in self._shadow_ints:
                torch._foreach_copy_(shadow_ints, plan["ints"], non_blocking=True)
        self.num_updates += 1
        return True

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy the model's weights into every shadow (the update count is kept)."""
        floats, ints = _float_and_int_tensors(unwrap_model(model))
        for shadow_floats, shadow_ints in zip(self._shadow_floats, self._shadow_ints):
            torch._foreach_copy_(shadow_floats, floats)
            if ints:
                torch._foreach_copy_(shadow_ints, ints)

    # ----------------------------------------------------------------------------- evaluation
    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module, index: int = 0) -> Iterator[nn.Module]:
        """Temporarily load shadow ``index`` into ``model``; restore the raw weights bit for bit.

        The raw weights are stashed in host memory, so no second copy of the model is held on
        the model's device. Optimizer state is untouched: only tensor values are copied.
        """
        source = unwrap_model(model)
        floats, ints = _float_and_int_tensors(source)
        stash = [t.detach().to("cpu", copy=True) for t in floats + ints]
        try:
            with torch.no_grad():
                torch._foreach_copy_(floats, self._shadow_floats[index])
                if ints:
                    torch._foreach_copy_(ints, self._shadow_ints[index])
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(floats + ints, stash)

    # ----------------------------------------------------------------------------- state
    def shadow_state_dict(self, index: int = 0) -> dict[str, torch.Tensor]:
        """Weights of shadow ``index`` under the model's own names (detached, on its device)."""
        return self.modules[index].state_dict()

    def state_dict(self) -> dict:
        """Everything needed to resume: decays, schedule settings, counters and all shadows."""
        return {
            "decays": list(self.decays),
            "every": self.every,
            "warmup": self.warmup,
            "warmup_power": self.warmup_power,
            "warmup_gamma": self.warmup_gamma,
            "steps": self.steps,
            "num_updates": self.num_updates,
            "skipped_nonfinite": self.skipped_nonfinite,
            "shadows": [m.state_dict() for m in self.modules],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadows"]) != len(self.modules):
            raise ValueError(f"EMA state holds {len(state['shadows'])} shadows, "
                             f"this run has {len(self.modules)}")
        for module, shadow in zip(self.modules, state["shadows"]):
            module.load_state_dict(shadow)
        self.decays = [float(d) for d in state["decays"]]
        self.every = int(state["every"])
        self.warmup = bool(state["warmup"])
        self.warmup_power = float(state["warmup_power"])
        self.warmup_gamma = float(state["warmup_gamma"])
        self.steps = int(state["steps"])
        self.num_updates = int(state["num_updates"])
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds NaN or Inf: one sum per tensor, one host sync in all.

    A sum is the cheapest full read that propagates NaN and Inf (an overflow to Inf also counts
    as bad, which is the safe side).
    """
    if not tensors:
        return True
    if tensors[0].device.type == "cuda":
        total = torch.stack(torch._foreach_norm(tensors, 2)).sum()
    else:
        total = torch.stack([t.sum() for t in tensors]).sum()
    return bool(torch.isfinite(total))
