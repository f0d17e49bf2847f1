"""The weight sets a run validates: the raw weights and each EMA shadow, named once."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightSet:
    """One set of weights the run validates, reports and keeps a best file of.

    Attributes:
        name: how logs and the keeper name it: ``raw``, ``ema 0.99`` (``ema sr0.1``: the power
            schedule's sigma_rel 0.1).
        label: how plots name it (``EMA 0.99``, or the half-life the user asked for).
        column_prefix: its summary.csv columns: timm's ``eval_*`` for the raw weights, ``ema_``
            for the first EMA, ``ema<decay>_`` for the others.
        best_file: the file that keeps its best epoch (timm's names), or None.
        shadow: its index among the EMA shadows; None for the raw weights.
    """
    name: str
    label: str
    column_prefix: str
    best_file: str | None
    shadow: int | None = None
    decay: float | None = None


RAW = WeightSet("raw", "raw", "", "model_best.pth.tar")


def weight_sets(decays: list[float], labels: list[str] | None = None,
                tag: str = "") -> tuple[WeightSet, ...]:
    """The raw weights, then one set per EMA decay (`labels`: how the user gave each; `tag`
    goes before the value in names and columns: ``sr`` for the power schedule's sigma_rels)."""
    labels = labels or [f"EMA {d:g}" for d in decays]
    sets = [RAW]
    for i, (decay, label) in enumerate(zip(decays, labels)):
        sets.append(WeightSet(f"ema {tag}{decay:g}", label,
                              "ema_" if i == 0 else f"ema{tag}{decay:g}_",
                              "model_best_ema.pth.tar" if i == 0 else None, i, decay))
    return tuple(sets)
