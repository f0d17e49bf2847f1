"""How validate.py --posthoc chooses its best weight set, and on which images it reports it.

Choosing the best of a dozen weight sets on a split and reporting the chosen one's score on the
same images publishes an optimistic figure (with a few hundred images, top-1 ties and flips by
an image or two). Three protocols (`Protocol.mode`):

* ``same``: chosen and scored on the same images (the table says so in its heading);
* ``split`` (``--select-split SPLIT``): chosen on SPLIT, reported on ``--split``;
* ``fraction`` (``--select-fraction F``): a fixed, stratified, seeded part F of ``--split``
  chooses (`stratified_parts`), the rest reports.

The report part scores the pick, the raw weights and every tracked EMA: the comparison a user
publishes. The choice is by ``--select-metric`` (default: the run's ``--eval-metric``), ties
broken by the lower loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..util.errors import UserError

METRICS = ("top1", "top5", "loss")


@dataclass(frozen=True)
class Protocol:
    """Where the choice is made and where its figure comes from."""
    mode: str                 # same, split, fraction
    report_split: str
    select_split: str         # the report split itself for `same` and `fraction`
    fraction: float | None
    seed: int
    metric: str

    @property
    def separate(self) -> bool:
        """The figure to report comes from images the choice never saw."""
        return self.mode != "same"

    def describe(self) -> str:
        """The protocol in a few words, as the csv and the log say it."""
        if self.mode == "split":
            return f"chosen on split {self.select_split}, reported on split {self.report_split}"
        if self.mode == "fraction":
            return (f"chosen on a stratified {self.fraction:g} of split {self.report_split} "
                    f"(seed {self.seed}), reported on the rest")
        return f"chosen and scored on the same images (split {self.report_split})"

    def rule(self) -> str:
        lower = "lowest" if self.metric == "loss" else "highest"
        return f"{lower} {self.metric}" + ("" if self.metric == "loss" else ", ties: lower loss")

    def record(self) -> dict:
        """What the best file and posthoc.csv keep of it."""
        return {"mode": self.mode, "select_split": self.select_split,
                "report_split": self.report_split, "fraction": self.fraction, "seed": self.seed,
                "metric": self.metric, "tie_break": None if self.metric == "loss" else "loss",
                "describe": self.describe()}


def protocol_for(select_split: str | None, fraction: float | None, seed: int,
                 metric: str | None, report_split: str, run_args: dict) -> Protocol:
    """The protocol of validate.py's --select-* flags (checked by its settings); the metric
    defaults to the run's --eval-metric (top1 when it is none of `METRICS`)."""
    if metric is None:
        metric = run_args.get("eval_metric") or "top1"
        metric = metric if metric in METRICS else "top1"
    if select_split is not None:
        return Protocol("split", report_split, select_split, None, seed, metric)
    if fraction is not None:
        return Protocol("fraction", report_split, report_split, fraction, seed, metric)
    return Protocol("same", report_split, report_split, None, seed, metric)


def stratified_parts(targets, fraction: float, seed: int,
                     classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(selection, report): sorted image indices of a split, disjoint, covering it. From each
    class, ``round(fraction * n)`` images chosen by a generator seeded by `seed` (the same split
    and seed give the same parts on any machine); one line, exit 2, where a part of a class
    would be empty."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    select, report = [], []
    for cls in np.unique(targets):
        members = np.flatnonzero(targets == cls)
        take = round(fraction * len(members))
        if take == 0 or take == len(members):
            name = classes[cls] if classes is not None else str(cls)
            part = "selection" if take == 0 else "report"
            raise UserError(f"--select-fraction {fraction:g} leaves class {name} "
                            f"({len(members)} image(s)) with no image in the {part} part: a "
                            f"fraction nearer 0.5, or --select-split")
        chosen = rng.permutation(members)
        select.append(chosen[:take])
        report.append(chosen[take:])
    return np.sort(np.concatenate(select)), np.sort(np.concatenate(report))


def best_index(results: list[dict], candidates: list[int], metric: str) -> int:
    """The index (among `candidates`) of the best result by `metric`: the lowest loss, or the
    highest top-1/top-5 with ties broken by the lower loss (then by the earlier row)."""
    if metric == "loss":
        return min(candidates, key=lambda i: (results[i]["loss"], i))
    return min(candidates, key=lambda i: (-results[i][metric], results[i]["loss"], i))
