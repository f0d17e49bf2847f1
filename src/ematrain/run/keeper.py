"""The run folder's checkpoint files, in the spirit of timm's CheckpointSaver.

`last.pth.tar` every epoch; for each weight set with a best file, that file at its best epoch;
`checkpoint-<epoch>.pth.tar` for the `history` best epochs of the primary weight set (timm's
`model_best.pth.tar` set: the first EMA with an EMA on, see `weight_sets`); `recovery.pth.tar`
in the middle of an epoch. The records of which epoch was best are the keeper's state and travel
in every checkpoint, so the files (`checkpoint_files`) can always be checked against them
(`repair`).

Writing happens off the training path (`Writer`): the checkpoint is copied to host memory, then
written, fsynced, renamed and linked by a thread of its own while training goes on.
"""
from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint.schema import peek
from ..util.atomic import WriteFailed
from ..util.errors import RunFailure
from ..util.logs import log
from .checkpoint_files import (LAST, RECOVERY, CheckpointFiles, agree_with_records, describe,
                               history_name, position)
from .weight_sets import WeightSet, primary_set

__all__ = ["LAST", "RECOVERY", "CheckpointKeeper", "Writer", "history_name", "host_copy"]


def host_copy(obj):
    """`obj` with every tensor copied to host memory (and every container rebuilt): a snapshot
    that training can go on changing the originals of."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class Writer:
    """Runs file jobs in a thread of its own, one at a time and in order.

    `submit` first waits for the job in flight (so at most one is), and `wait` raises, on the
    calling thread, the error a job met (a full disk is one line, as when writing in line).
    """

    def __init__(self, background: bool = True):
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, "ematrain-writer")
                      if background else None)
        self._pending: concurrent.futures.Future | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        if self._pool is None:
            job()
        else:
            self._pending = self._pool.submit(job)

    def wait(self) -> None:
        pending = self._pending
        if pending is not None:
            try:
                pending.result()
            finally:  # `busy` sees the job until it is over
                self._pending = None

    def busy(self) -> bool:
        """A job is running or waiting (safe to ask from any thread)."""
        pending = self._pending
        return pending is not None and not pending.done()


class CheckpointKeeper:
    """Best epochs per weight set, the history, and when their files are written.

    Args:
        sets: the run's weight sets (the raw weights first, one of them the primary set).
        metric: the --eval-metric key of a validation result; `lower_is_better` for loss.
        history_size: how many best epochs of the primary set keep a checkpoint-<epoch> file.
        primary: only the primary process writes files; the others keep the records only.
        background: write in a thread of its own (see `Writer`).
    """

    def __init__(self, sets: tuple[WeightSet, ...], metric: str, history_size: int,
                 primary: bool = True, background: bool = True):
        self.sets = sets
        self.metric = metric
        self.lower_is_better = metric == "loss"
        self.history_size = history_size
        self.primary = primary
        self.files = CheckpointFiles(tuple(s.best_file for s in sets if s.best_file))
        self.best: dict[str, dict] = {}
        self.history: list[list] = []  # [metric, epoch] pairs, best first
        self.writer = Writer(background)
        self._check_next_save = False
        self._newest: str | None = None  # the newest complete checkpoint, described

    @property
    def run_dir(self) -> Path | None:
        return self.files.dir

    @run_dir.setter
    def run_dir(self, folder: Path) -> None:
        self.files.dir = folder

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
        value = results[primary_set(self.sets).name][self.metric]
        entries = [e for e in self.history if e[1] != epoch] + [[value, epoch]]
        entries.sort(key=lambda e: e[0], reverse=not self.lower_is_better)
        self.history = entries[: self.history_size]
        return improved

    def state_dict(self) -> dict:
        return {"best": {k: dict(v) for k, v in self.best.items()},
                "history": [list(e) for e in self.history]}

    def load_state_dict(self, state: dict) -> None:
        # Runs saved before the shadows were named as asked named them by their decay.
        names = {s.name for s in self.sets}
        renamed = {s.legacy_name: s.name for s in self.sets
                   if s.legacy_name and s.legacy_name not in names}
        self.best = {renamed.get(str(k), str(k)): {"metric": v.get("metric"),
                                                   "epoch": v.get("epoch")}
                     for k, v in state["best"].items()}
        self.history = [[float(m), int(e)] for m, e in state["history"]]

    def wanted(self, records: dict) -> dict[str, int]:
        """The epoch each best and history file must hold by `records` (a keeper state)."""
        best = records.get("best") or {}
        wanted = {s.best_file: best[s.name]["epoch"] for s in self.sets
                  if s.best_file and best.get(s.name, {}).get("epoch") is not None}
        wanted.update({history_name(int(e)): int(e) for _, e in records.get("history", [])})
        return wanted

    # ----------------------------------------------------------------------------- saving
    def path(self, name: str) -> Path:
        return self.files.path(name)

    def save_epoch(self, epoch: int, ckpt: dict, improved: list[WeightSet],
                   then: Callable[[], None] | None = None) -> None:
        """Write last.pth.tar and the best and history files this epoch earned, then `then`
        (more files of the epoch), in the background."""
        if not self.primary:
            return
        names = [s.best_file for s in improved if s.best_file]
        if any(e == epoch for _, e in self.history):
            names.append(history_name(epoch))
        snapshot = host_copy(ckpt)

        def job():
            last = self._write(LAST, snapshot)
            for name in names:
                self._guarded(self.files.place, last, name)
            self.files.prune_history({history_name(e) for _, e in self.history})
            if self._check_next_save:
                self._check_next_save = False
                self._say_fixed(self._agree_with(snapshot))
            # An epoch-end checkpoint supersedes any mid-epoch recovery file.
            self.path(RECOVERY).unlink(missing_ok=True)
            if then is not None:
                then()
        self.writer.submit(job)

    def save_mid_epoch(self, ckpt: dict, name: str = RECOVERY,
                       then: Callable[[], None] | None = None) -> None:
        """A checkpoint to resume from in the middle of an epoch (recovery, or a stop), then
        `then`, in the background."""
        if self.primary:
            snapshot = host_copy(ckpt)

            def job():
                self._write(name, snapshot)
                if then is not None:
                    then()
            self.writer.submit(job)

    def save_file(self, name: str, obj: dict) -> None:
        """Another file of the run (`name` relative to its folder, e.g. a post-hoc snapshot),
        already in host memory: written by the same writer, in order with the checkpoints."""
        if self.primary:
            self.writer.submit(lambda: self._write(name, obj))

    def wait(self) -> None:
        """Finish the write in flight; a failed write is raised here."""
        self.writer.wait()

    def _write(self, name: str, ckpt: dict) -> Path:
        path = self._guarded(self.files.write, name, ckpt)
        if name in (LAST, RECOVERY):
            self._newest = describe(path, ckpt.get("counters"))
        return path

    def _guarded(self, operation, *args):
        """`operation(*args)`, a failed write one line that says what is still on disk."""
        try:
            return operation(*args)
        except WriteFailed as exc:
            raise RunFailure(f"{exc}; {self.files.kept()}") from None

    def on_disk_now(self) -> str:
        """What quitting at once leaves, for the message of a second Ctrl-C (any thread)."""
        newest = self._newest
        text = (f"the newest complete checkpoint is {newest}" if newest
                else "no checkpoint of this run is complete yet")
        return text + ("; the write in progress is abandoned" if self.writer.busy() else "")

    def on_disk(self) -> dict[str, dict]:
        """The run's checkpoint files (last, recovery, history, best), peeked, by name."""
        return self.files.on_disk()

    # ----------------------------------------------------------------------------- repair
    def repair(self) -> list[str]:
        """On resume: make the best and history files agree with the records in last.pth.tar,
        in one line; returns what was put right.

        A kill after last.pth.tar was renamed into place but before its best and history files
        were made leaves those at an older epoch (or missing), and the mid-epoch recovery file
        in place; a file may also have been replaced or removed by hand. Whether the run is
        finished or not, last.pth.tar's records name the epoch each file must hold, and the
        checkpoint of that epoch is taken from whichever file of the folder holds it.
        """
        # A resume from an older checkpoint goes on differently from the run that wrote the
        # files: its first epoch's save checks them against its own records.
        self._check_next_save = True
        if not self.primary or not self.path(LAST).is_file():
            return []
        last = peek(self.path(LAST))
        if last is None or not isinstance(last.get("keeper"), dict):
            return []
        fixed = self._agree_with(last)
        self._newest = describe(self.path(LAST), last.get("counters"))
        recovery = peek(self.path(RECOVERY)) if self.path(RECOVERY).is_file() else None
        if recovery is not None and position(recovery) <= position(last):
            self.path(RECOVERY).unlink()
            fixed.append(f"{RECOVERY} removed (older than {LAST})")
        elif recovery is not None:
            self._newest = describe(self.path(RECOVERY), recovery.get("counters"))
        self._say_fixed(fixed)
        return fixed

    def _agree_with(self, last: dict) -> list[str]:
        return self._guarded(agree_with_records, self.files, self.wanted(last["keeper"]), last)

    def _say_fixed(self, fixed: list[str]) -> None:
        if fixed:
            log.info(f"repaired to agree with the records in {self.path(LAST)}: "
                     f"{', '.join(fixed)}")
