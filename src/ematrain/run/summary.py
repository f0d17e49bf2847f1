"""summary.csv: one row per epoch in timm's columns, then each other weight set's, rewritten whole
from the rows the checkpoints carry."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..util.atomic import atomic_write_text
from .weight_sets import WeightSet

METRICS = ("loss", "top1", "top5")


# ----------------------------------------------------------------------------- summary.csv
class Summary:
    """summary.csv: one row per epoch in timm's columns, ``epoch, train_loss, eval_loss,
    eval_top1, eval_top5, lr`` (``eval_*``: the primary weight set, see `weight_sets`), then each
    other weight set's ``<prefix>eval_*``.

    The rows also travel in every checkpoint (`state_dict`), so a kill between writing a
    checkpoint and writing summary.csv loses no row: a resumed run rewrites the file from them.
    """

    def __init__(self, sets: tuple[WeightSet, ...]):
        self.sets = sets
        others = [s for s in sets if not s.primary]
        self.columns = (["epoch", "train_loss"] + [f"eval_{m}" for m in METRICS] + ["lr"]
                        + [f"{s.column_prefix}eval_{m}" for s in others for m in METRICS])
        self.rows: list[dict] = []

    def add(self, epoch: int, lr: float, train_loss: float, results: dict[str, dict]) -> dict:
        row = {"epoch": epoch, "train_loss": train_loss, "lr": lr}
        for s in self.sets:
            row.update({f"{s.column_prefix}eval_{m}": results[s.name][m] for m in METRICS})
        self.rows.append(row)
        return row

    def write(self, run_dir: Path, rows: list[dict] | None = None) -> None:
        """Rewrite summary.csv whole (with `rows`, a snapshot, or the rows now): a resumed run
        never duplicates or loses a row."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows if rows is None else rows:
            writer.writerow({k: row.get(k, "") for k in self.columns})
        atomic_write_text(run_dir / "summary.csv", buf.getvalue())

    def state_dict(self) -> dict:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [self._current_names(dict(r)) for r in state["rows"]]

    def _current_names(self, row: dict) -> dict:
        """A row of a run saved before its shadows were named as asked, in today's columns."""
        for s in self.sets:
            old, new = s.legacy_prefix, s.column_prefix
            if old and old != new and f"{new}eval_top1" not in row:
                for m in METRICS:
                    if f"{old}eval_{m}" in row:
                        row[f"{new}eval_{m}"] = row.pop(f"{old}eval_{m}")
        return row


def read_summary(run_dir: Path) -> list[dict]:
    path = run_dir / "summary.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
