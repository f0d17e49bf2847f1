"""The run folder's checkpoint files, in the spirit of timm's CheckpointSaver.

`last.pth.tar` every epoch; for each weight set with a best file, that file at its best epoch;
`checkpoint-<epoch>.pth.tar` for the `history` best epochs of the raw weights; `recovery.pth.tar`
in the middle of an epoch. The records of which epoch was best are the keeper's state and travel
in every checkpoint, so the files can always be checked against them.
"""
from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt_io
from .atomic import WriteFailed, atomic_copy
from .errors import RunFailure
from .logs import log
from .weightsets import WeightSet

LAST = "last.pth.tar"
RECOVERY = "recovery.pth.tar"


def history_name(epoch: int) -> str:
    return f"checkpoint-{epoch}.pth.tar"


class CheckpointKeeper:
    """Best epochs per weight set, the history, and the files that keep them.

    Args:
        sets: the run's weight sets (the raw weights first).
        metric: the --eval-metric key of a validation result; `lower_is_better` for loss.
        history_size: how many best raw epochs keep a checkpoint-<epoch> file.
        primary: only the primary process writes files; the others keep the records only.
    """

    def __init__(self, sets: tuple[WeightSet, ...], metric: str, history_size: int,
                 primary: bool = True):
        self.sets = sets
        self.metric = metric
        self.lower_is_better = metric == "loss"
        self.history_size = history_size
        self.primary = primary
        self.run_dir: Path | None = None
        self.best: dict[str, dict] = {}
        self.history: list[list] = []  # [metric, epoch] pairs, best first

    # ----------------------------------------------------------------------------- records
    def _improves(self, name: str, value: float) -> bool:
        record = self.best.get(name)
        if record is None or record.get("metric") is None:
            return True
        return value < record["metric"] if self.lower_is_better else value > record["metric"]

    def record(self, epoch: int, results: dict[str, dict]) -> list[WeightSet]:
        """Note this epoch's results; returns the weight sets whose best it is."""
        improved = [s for s in self.sets if self._improves(s.name, results[s.name][self.metric])]
        for s in improved:
            self.best[s.name] = {"metric": results[s.name][self.metric], "epoch": epoch}
        value = results[self.sets[0].name][self.metric]
        entries = [e for e in self.history if e[1] != epoch] + [[value, epoch]]
        entries.sort(key=lambda e: e[0], reverse=not self.lower_is_better)
        self.history = entries[: self.history_size]
        return improved

    def state_dict(self) -> dict:
        return {"best": {k: dict(v) for k, v in self.best.items()},
                "history": [list(e) for e in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.best = {str(k): {"metric": v.get("metric"), "epoch": v.get("epoch")}
                     for k, v in state["best"].items()}
        self.history = [[float(m), int(e)] for m, e in state["history"]]

    # ----------------------------------------------------------------------------- files
    def path(self, name: str) -> Path:
        return self.run_dir / name

    def _write(self, name: str, ckpt: dict) -> Path:
        path = self.path(name)
        try:
            ckpt_io.write_file(path, ckpt)
        except WriteFailed as exc:
            raise RunFailure(f"{exc}; the previous checkpoint is intact") from None
        return path

    def save_epoch(self, epoch: int, ckpt: dict, improved: list[WeightSet]) -> list[str]:
        """last.pth.tar, then the best and history files this epoch earned; returns their names."""
        if not self.primary:
            return []
        last = self._write(LAST, ckpt)
        copies = [s.best_file for s in improved if s.best_file]
        if any(e == epoch for _, e in self.history):
            copies.append(history_name(epoch))
        for name in copies:
            atomic_copy(last, self.path(name))
        self._prune_history()
        # An epoch-end checkpoint supersedes any mid-epoch recovery file.
        self.path(RECOVERY).unlink(missing_ok=True)
        return [LAST] + copies

    def save_mid_epoch(self, ckpt: dict, name: str = RECOVERY) -> Path:
        """A checkpoint to resume from in the middle of an epoch (recovery, or a stop)."""
        return self._write(name, ckpt) if self.primary else self.path(name)

    def _prune_history(self) -> None:
        keep = {history_name(e) for _, e in self.history}
        for path in self.run_dir.glob("checkpoint-*.pth.tar"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def repair(self) -> list[str]:
        """Make the files agree with the records; returns the names rewritten.

        A kill after last.pth.tar was renamed into place but before its best and history
        copies were made leaves those files at an older epoch (or missing), and the mid-epoch
        recovery file in place: the records in last.pth.tar say what they should be, and last
        itself is the missing epoch's checkpoint.
        """
        if not self.primary or not self.path(LAST).is_file():
            return []
        last = ckpt_io.peek(self.path(LAST))
        if last is None or last["counters"] is None or last["counters"].get("epoch_step"):
            return []  # no complete epoch-end checkpoint to copy from
        wanted = {s.best_file: self.best[s.name]["epoch"] for s in self.sets
                  if s.best_file and self.best.get(s.name, {}).get("epoch") is not None}
        wanted.update({history_name(e): e for _, e in self.history})
        fixed = []
        for name, epoch in wanted.items():
            current = ckpt_io.peek(self.path(name)) if self.path(name).is_file() else None
            if current is not None and current["epoch"] == epoch:
                continue
            if epoch == last["epoch"]:
                atomic_copy(self.path(LAST), self.path(name))
                fixed.append(name)
            else:
                log.warning(f"warning: {self.path(name)} should hold epoch {epoch}, whose "
                            f"checkpoint is gone; it is left as it is")
        self._prune_history()
        recovery = ckpt_io.peek(self.path(RECOVERY)) if self.path(RECOVERY).is_file() else None
        if recovery is not None and _position(recovery) <= _position(last):
            self.path(RECOVERY).unlink()
            fixed.append(RECOVERY)
        if fixed:
            log.info(f"repaired after an interrupted save: {', '.join(fixed)}")
        return fixed


def _position(peeked: dict) -> tuple[int, int]:
    counters = peeked.get("counters") or {}
    return int(counters.get("epoch", 0)), int(counters.get("epoch_step", 0))

