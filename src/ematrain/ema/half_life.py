"""Half-lives: the horizon of an EMA in the units a run counts (optimizer steps, epochs, images),
and the per-update decay that has it (``--model-ema-half-life 2ep``, ``500it``, ``1.2Mimg``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .schedules import DECAY_RANGE, OutOfRange, check_decay


def half_life_from_decay(decay: float) -> float:
    """Updates after which an old weight's share has halved: ln 0.5 / ln decay."""
    return math.log(0.5) / math.log(check_decay(decay))


def decay_from_half_life(half_life_updates: float, every: int = 1) -> float:
    """Per-update decay whose half-life is ``half_life_updates`` updates (in optimizer steps with
    an update every `every` of them); OutOfRange when no decay in (0, 1) has it (a half-life so
    short or so long that the decay rounds to 0 or 1)."""
    if half_life_updates <= 0:
        raise ValueError(f"half-life must be positive, got {half_life_updates}")
    decay = 0.5 ** (every / half_life_updates)
    if not 0.0 < decay < 1.0:
        raise OutOfRange(f"the decay of a half-life of {half_life_updates:.3g} steps",
                         DECAY_RANGE, decay)
    return decay


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
