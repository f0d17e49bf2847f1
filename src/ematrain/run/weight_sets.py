"""The weight sets a run validates: the raw weights and each EMA shadow, named once.

One of them is the run's *primary* set, the one timm's names describe: summary.csv's ``eval_*``
columns, the checkpoint's ``metric``, ``model_best.pth.tar`` and the ``checkpoint-<epoch>``
history. With an EMA on that is the first EMA, as in timm's train.py (``--primary-weights ema``,
the default), or the raw weights (``--primary-weights raw``, and runs saved before the setting
existed). Every other set has columns and a best file of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not imported: the curves renderer's process reads this module, light
    from ..settings.ema_specs import EmaSpec

PRIMARY_CHOICES = ("ema", "raw")
BEST = "model_best.pth.tar"


@dataclass(frozen=True)
class WeightSet:
    """One set of weights the run validates, reports and keeps a best file of.

    Attributes:
        name: how logs and the keeper name it: ``raw``, ``ema 0.99``, ``ema hl2ep`` (asked for
            as a half-life), ``ema sr0.1`` (the power schedule's sigma_rel 0.1).
        label: how plots name it (``EMA 0.99``, ``EMA half-life 2ep``).
        column_prefix: its summary.csv columns: timm's ``eval_*`` for the primary set,
            ``raw_eval_*`` for raw weights that are not, ``ema_eval_*`` for a first EMA that is
            not, ``ema<name>_eval_*`` for the others.
        best_file: the file that keeps its best epoch (timm's ``model_best.pth.tar`` for the
            primary set), or None.
        shadow: its number among the run's EMA shadows (`EmaCollection.shadows`: the regular
            ones, then the post-hoc power EMAs'); None for the raw weights.
        decay: the shadow's decay (sigma_rel under the power schedule).
        legacy_name, legacy_prefix: its name and column prefix in runs saved before the shadows
            were named as asked (by their per-step decay; the raw weights never changed).
        posthoc: a power EMA tracked for post-hoc EMA; validated and drawn, kept in the
            checkpoint's `posthoc_ema`.
    """
    name: str
    label: str
    column_prefix: str
    best_file: str | None
    shadow: int | None = None
    decay: float | None = None
    legacy_name: str | None = None
    legacy_prefix: str | None = None
    posthoc: bool = False

    @property
    def primary(self) -> bool:
        return self.column_prefix == ""


RAW = WeightSet("raw", "raw", "", BEST)


def weight_sets(decays: list[float], labels: list[str] | None = None, tag: str = "",
                names: list[str] | None = None, primary: str = "ema") -> tuple[WeightSet, ...]:
    """The raw weights, then one set per EMA decay.

    `labels`: how plots name each EMA; `names`: how logs and columns do (default: by its
    value, after `tag`: ``sr`` for the power schedule's sigma_rels; a half-life as asked, e.g.
    ``hl2ep``); `primary`: which set timm's names describe (`PRIMARY_CHOICES`; the raw weights
    when there is no EMA).
    """
    labels = labels or [f"EMA {d:g}" for d in decays]
    names = names or [f"{tag}{d:g}" for d in decays]
    ema_first = primary == "ema" and bool(decays)
    sets = [WeightSet("raw", "raw", "raw_" if ema_first else "",
                      "model_best_raw.pth.tar" if ema_first else BEST)]
    for i, (decay, label, name) in enumerate(zip(decays, labels, names)):
        legacy = "ema_" if i == 0 else f"ema{tag}{decay:g}_"
        if i == 0:
            prefix, best = ("", BEST) if ema_first else ("ema_", "model_best_ema.pth.tar")
        else:
            # The layout of --primary-weights raw is the one runs had before: no best file for
            # the further EMAs.
            prefix = f"ema{name}_"
            best = f"model_best_ema{name}.pth.tar" if ema_first else None
        sets.append(WeightSet(f"ema {name}", label, prefix, best, i, decay,
                              f"ema {tag}{decay:g}", legacy))
    return tuple(sets)


def tracked_sets(sigma_rels: list[float], first: int = 0) -> tuple[WeightSet, ...]:
    """The power EMAs --model-ema-posthoc tracks, as weight sets: validated and drawn like any
    EMA (``power sr0.05``, columns ``powersr0.05_eval_*``). They have no best file: their
    weights are the snapshots' and ``posthoc_ema``'s, and validate.py --posthoc scores them.
    Their shadows are numbered after the `first` regular ones."""
    return tuple(WeightSet(f"power sr{s:g}", f"power EMA sigma_rel {s:g} (post-hoc, tracked)",
                           f"powersr{s:g}_", None, first + i, s, posthoc=True)
                 for i, s in enumerate(sigma_rels))


def regular_emas(sets: tuple[WeightSet, ...]) -> list[WeightSet]:
    """The sets of the regular EMA's shadows (`ModelEma`), in its order."""
    return [s for s in sets if s.shadow is not None and not s.posthoc]


def primary_set(sets: tuple[WeightSet, ...]) -> WeightSet:
    """The set timm's names (eval_*, metric, model_best.pth.tar) describe."""
    return next(s for s in sets if s.primary)


def ema_labels(spec: EmaSpec, decays: list[float]) -> list[str]:
    """How plots name each EMA: as the user gave it (a half-life), or by its decay."""
    if spec.schedule == "power":
        return [f"EMA sigma_rel {d:.3g}" for d in decays]
    if spec.half_lives:
        return [f"EMA half-life {h}" for h in spec.half_lives]
    return [f"EMA {d:g}" for d in decays]


def ema_names(spec: EmaSpec, decays: list[float]) -> list[str]:
    """How logs, summary.csv and validate.py name each EMA: as the user asked for it (a
    half-life ``hl2ep``, a sigma_rel ``sr0.1``), or by its decay (``0.99``)."""
    if spec.schedule == "power":
        return [f"sr{d:g}" for d in decays]
    if spec.half_lives:
        return [f"hl{''.join(str(h).split())}" for h in spec.half_lives]
    return [f"{d:g}" for d in decays]
