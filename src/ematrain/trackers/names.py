"""What the trackers show, under which names: the same values to TensorBoard and W&B.

Every value is logged at a *step*, the number of optimizer updates the run has made (it never
repeats or goes back, across resumes and changes of batch size): every log interval the training
loss, learning rate, images per second and the share of time spent waiting for data
(``train/...``); every epoch the row timm's
train.py logs to W&B (``epoch``, ``train_loss``, ``eval_loss``, ``eval_top1``, ``eval_top5``,
``lr``: the primary weight set's, as in summary.csv), then every weight set's numbers under a
name that says which (``val/top1/raw``, ``val/top1/ema_0.99``, ``val/top1/ema_hl2ep``,
``val/top1/power_sr0.05``), the epoch's time and each EMA's effective half-life in epochs; at the
end the best epoch of each weight set (``best/<set>/<metric>``, ``best/<set>/epoch``).
"""
from __future__ import annotations

import json
import math
from typing import Iterable

# The keys of timm's own W&B epoch log (its summary.csv row), so dashboards of timm runs and
# ours share them.
TIMM_KEYS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")
METRICS = ("loss", "top1", "top5")


def set_tag(weight_set) -> str:
    """A weight set's name as a tag part: ``raw``, ``ema_0.99``, ``ema_hl2ep``, ``power_sr0.05``."""
    return weight_set.name.replace(" ", "_")


def _finite(values: dict) -> dict:
    """Values as floats, without the non-finite ones (a half-life longer than the run so far is
    infinite: nothing to draw)."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out


def interval_values(loss: float, lr: float, images_per_s: float | None = None,
                    data_wait: float | None = None) -> dict:
    """The log interval's values: `data_wait` is the share (0 to 1) of the interval's time
    spent waiting for the loader."""
    return _finite({"train/loss": loss, "train/lr": lr, "train/images_per_s": images_per_s,
                    "train/data_wait": data_wait})


def epoch_values(row: dict, results: dict[str, dict], sets: Iterable,
                 seconds: float | None = None,
                 half_lives: dict[str, float] | None = None) -> dict:
    """One epoch's values: `row` its summary.csv row, `results` each weight set's validation
    (by `WeightSet.name`), `half_lives` each EMA's effective half-life in epochs (by name)."""
    values = {key: row[key] for key in TIMM_KEYS if key in row}
    for s in sets:
        values.update({f"val/{m}/{set_tag(s)}": results[s.name][m] for m in METRICS})
    values["epoch/seconds"] = seconds
    by_name = {s.name: s for s in sets}
    for name, epochs in (half_lives or {}).items():
        tag = set_tag(by_name[name]) if name in by_name else name.replace(" ", "_")
        values[f"ema/half_life_epochs/{tag}"] = epochs
    return _finite(values)


def best_values(best: dict[str, dict], sets: Iterable, metric: str) -> dict:
    """Each weight set's best epoch by --eval-metric (the keeper's records, by set name)."""
    values = {}
    for s in sets:
        record = best.get(s.name) or {}
        if record.get("epoch") is None:
            continue
        values[f"best/{set_tag(s)}/{metric}"] = record["metric"]
        values[f"best/{set_tag(s)}/epoch"] = record["epoch"]
    return _finite(values)


def best_tags(sets: Iterable, metric: str) -> list[str]:
    """The tags `best_values` fills: the metrics TensorBoard's HParams view shows per run."""
    return [f"best/{set_tag(s)}/{metric}" for s in sets]


def flat_hparams(settings: dict) -> dict:
    """The run's settings as TensorBoard's HParams view takes them: numbers, strings and
    booleans as they are, lists and mappings as JSON text, unset ones left out."""
    out = {}
    for key, value in sorted(settings.items()):
        if value is None:
            continue
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value, sort_keys=True, default=str)
    return out


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A table as markdown text (TensorBoard renders it): numbers with 6 significant digits,
    None as -."""
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.6g}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
