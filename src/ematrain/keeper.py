"""The run folder's checkpoint files, in the spirit of timm's CheckpointSaver.

`last.pth.tar` every epoch; for each weight set with a best file, that file at its best epoch;
`checkpoint-<epoch>.pth.tar` for the `history` best epochs of the primary weight set (timm's
`model_best.pth.tar` set: the first EMA with an EMA on, see `weightsets`); `recovery.pth.tar`
in the middle of an epoch. The best and history files are hard links of the `last.pth.tar` they
were (one physical file per epoch, as timm does), made under a temporary name and renamed into
place. The records of which epoch was best are the keeper's state and travel in every
checkpoint, so the files can always be checked against them (`repair`).

Writing happens off the training path (`Writer`): the checkpoint is copied to host memory, then
written, fsynced, renamed and linked by a thread of its own while training goes on.
"""
from __future__ import annotations

import concurrent.futures
import errno
import os
import uuid
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ckpt_io
from .atomic import WriteFailed, atomic_copy, fsync_dir, writing
from .errors import RunFailure
from .logs import log
from .weightsets import WeightSet, primary_set

LAST = "last.pth.tar"
RECOVERY = "recovery.pth.tar"
# What a file system says when it cannot hard-link: then the files are copies.
_NO_LINKS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP,
             errno.ENOSYS, errno.EACCES}


def history_name(epoch: int) -> str:
    return f"checkpoint-{epoch}.pth.tar"


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
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


class CheckpointKeeper:
    """Best epochs per weight set, the history, and the files that keep them.

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
        self.run_dir: Path | None = None
        self.best: dict[str, dict] = {}
        self.history: list[list] = []  # [metric, epoch] pairs, best first
        self.writer = Writer(background)
        self._links = True

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

    # ----------------------------------------------------------------------------- saving
    def path(self, name: str) -> Path:
        return self.run_dir / name

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
                self._place(last, name)
            self._prune_history()
            # An epoch-end checkpoint supersedes any mid-epoch recovery file.
            self.path(RECOVERY).unlink(missing_ok=True)
            if then is not None:
                then()
        self.writer.submit(job)

    def save_mid_epoch(self, ckpt: dict, name: str = RECOVERY) -> None:
        """A checkpoint to resume from in the middle of an epoch (recovery, or a stop)."""
        if self.primary:
            snapshot = host_copy(ckpt)
            self.writer.submit(lambda: self._write(name, snapshot))

    def save_file(self, name: str, obj: dict) -> None:
        """Another file of the run (`name` relative to its folder, e.g. a post-hoc snapshot),
        already in host memory: written by the same writer, in order with the checkpoints."""
        if self.primary:
            self.writer.submit(lambda: self._write(name, obj))

    def wait(self) -> None:
        """Finish the write in flight; a failed write is raised here."""
        self.writer.wait()

    def _write(self, name: str, ckpt: dict) -> Path:
        path = self.path(name)
        try:
            ckpt_io.write_file(path, ckpt)
        except WriteFailed as exc:
            raise RunFailure(f"{exc}; the previous checkpoint is intact") from None
        return path

    def _place(self, source: Path, name: str) -> None:
        """`name` as a hard link of `source`, renamed into place (a copy where links fail)."""
        target = self.path(name)
        if self._links:
            tmp = self.path(f".{name}.{uuid.uuid4().hex[:8]}.tmp")
            with writing(tmp):
                try:
                    os.link(source, tmp)
                    os.replace(tmp, target)
                    fsync_dir(self.run_dir)
                    return
                except OSError as exc:
                    tmp.unlink(missing_ok=True)
                    if exc.errno not in _NO_LINKS:
                        raise WriteFailed(f"cannot write {target}: {exc.strerror}") from None
            self._links = False
            log.info(f"{self.run_dir}: the file system refuses hard links; the best and history "
                     f"files are copies")
        atomic_copy(source, target)

    def _prune_history(self) -> None:
        keep = {history_name(e) for _, e in self.history}
        for path in self.run_dir.glob("checkpoint-*.pth.tar"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    # ----------------------------------------------------------------------------- repair
    def repair(self) -> list[str]:
        """Make the files agree with the records; returns the names rewritten.

        A kill after last.pth.tar was renamed into place but before its best and history files
        were made leaves those at an older epoch (or missing), and the mid-epoch recovery file
        in place: the records in last.pth.tar say what they should be, and last itself is the
        missing epoch's checkpoint.
        """
        if not self.primary or not self.path(LAST).is_file():
            return []
        last = ckpt_io.peek(self.path(LAST))
        if last is None or last["counters"] is None or last["counters"].get("epoch_step"):
            return []  # no complete epoch-end checkpoint to copy from
        fixed = [name for name, epoch in self._wanted().items() if self._repaired(name, epoch, last)]
        self._prune_history()
        recovery = ckpt_io.peek(self.path(RECOVERY)) if self.path(RECOVERY).is_file() else None
        if recovery is not None and _position(recovery) <= _position(last):
            self.path(RECOVERY).unlink()
            fixed.append(RECOVERY)
        if fixed:
            log.info(f"repaired after an interrupted save: {', '.join(fixed)}")
        return fixed

    def _wanted(self) -> dict[str, int]:
        wanted = {s.best_file: self.best[s.name]["epoch"] for s in self.sets
                  if s.best_file and self.best.get(s.name, {}).get("epoch") is not None}
        wanted.update({history_name(e): e for _, e in self.history})
        return wanted

    def _repaired(self, name: str, epoch: int, last: dict) -> bool:
        current = ckpt_io.peek(self.path(name)) if self.path(name).is_file() else None
        if current is not None and current["epoch"] == epoch:
            return False
        if epoch != last["epoch"]:
            log.warning(f"warning: {self.path(name)} should hold epoch {epoch}, whose checkpoint "
                        f"is gone; it is left as it is")
            return False
        self._place(self.path(LAST), name)
        return True


def _position(peeked: dict) -> tuple[int, int]:
    counters = peeked.get("counters") or {}
    return int(counters.get("epoch", 0)), int(counters.get("epoch_step", 0))
