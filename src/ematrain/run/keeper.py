"""The run folder's checkpoint files, in the spirit of timm's CheckpointSaver.

`last.pth.tar` every epoch; for each weight set with a best file, that file at its best epoch;
`checkpoint-<epoch>.pth.tar` for the `history` best epochs of the primary weight set (timm's
`model_best.pth.tar` set: the first EMA with an EMA on, see `weight_sets`); `recovery.pth.tar`
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

from ..checkpoint.files import write_file
from ..checkpoint.schema import peek
from ..util.atomic import WriteFailed, atomic_copy, fsync_dir, writing
from ..util.errors import RunFailure
from ..util.logs import log
from .weight_sets import WeightSet, primary_set

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
        self._check_next_save = False
        self._newest: str | None = None  # the newest complete checkpoint, described

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
        path = self.path(name)
        try:
            write_file(path, ckpt)
        except WriteFailed as exc:
            raise RunFailure(f"{exc}; {self._kept()}") from None
        if name in (LAST, RECOVERY):
            self._newest = _describe(path, ckpt.get("counters"))
        return path

    def on_disk_now(self) -> str:
        """What quitting at once leaves, for the message of a second Ctrl-C (any thread)."""
        newest = self._newest
        text = (f"the newest complete checkpoint is {newest}" if newest
                else "no checkpoint of this run is complete yet")
        return text + ("; the write in progress is abandoned" if self.writer.busy() else "")

    def _kept(self) -> str:
        """What a failed write leaves on disk: every earlier file is whole (written atomically),
        but there may be no checkpoint yet."""
        found = [p for p in (self.path(LAST), self.path(RECOVERY)) if p.is_file()]
        if not found:
            return "no checkpoint of this run was saved before it"
        newest = max(found, key=lambda p: p.stat().st_mtime_ns)
        return f"the previous checkpoint is intact ({newest})"

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

    def _prune_history(self, keep: set[str] | None = None) -> None:
        """Remove the history files that the records (by default this keeper's) do not name."""
        keep = {history_name(e) for _, e in self.history} if keep is None else keep
        for path in self.run_dir.glob("checkpoint-*.pth.tar"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

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
        self._newest = _describe(self.path(LAST), last.get("counters"))
        recovery = peek(self.path(RECOVERY)) if self.path(RECOVERY).is_file() else None
        if recovery is not None and _position(recovery) <= _position(last):
            self.path(RECOVERY).unlink()
            fixed.append(f"{RECOVERY} removed (older than {LAST})")
        elif recovery is not None:
            self._newest = _describe(self.path(RECOVERY), recovery.get("counters"))
        self._say_fixed(fixed)
        return fixed

    def _say_fixed(self, fixed: list[str]) -> None:
        if fixed:
            log.info(f"repaired to agree with the records in {self.path(LAST)}: "
                     f"{', '.join(fixed)}")

    def _agree_with(self, last: dict) -> list[str]:
        """Put every best and history file that `last`'s records name at its epoch; returns
        what was put right. An epoch's checkpoint is told from the same epoch of another run
        (a resume from an older checkpoint) by its summary row."""
        records = last["keeper"]
        rows = _rows(last)
        wanted = {s.best_file: records["best"][s.name]["epoch"] for s in self.sets
                  if s.best_file and (records.get("best") or {}).get(s.name, {}).get("epoch")
                  is not None}
        wanted.update({history_name(int(e)): int(e) for _, e in records.get("history", [])})
        seen: dict[Path, dict | None] = {}

        def holds(path: Path, epoch: int) -> bool:
            if path not in seen:
                seen[path] = peek(path) if path.is_file() else None
            found = seen[path]
            if found is None or found["epoch"] != epoch or _position(found)[1]:
                return False
            mine, theirs = _rows(found).get(epoch), rows.get(epoch)
            return mine is None or theirs is None or mine == theirs

        fixed = []
        for name, epoch in wanted.items():
            if holds(self.path(name), epoch):
                continue
            source = next((p for p in self._checkpoint_files() if holds(p, epoch)), None)
            if source is None:
                log.warning(f"warning: {self.path(name)} should hold epoch {epoch}, and no file "
                            f"of the run holds that epoch's checkpoint; it is left as it is")
                continue
            self._place(source, name)
            seen.pop(self.path(name), None)
            fixed.append(f"{name} (epoch {epoch}, from {source.name})")
        self._prune_history({n for n in wanted if n.startswith("checkpoint-")})
        return fixed

    def on_disk(self) -> dict[str, dict]:
        """The run's checkpoint files (last, recovery, history, best), peeked, by name."""
        files = self._checkpoint_files() + [self.path(RECOVERY)]
        peeked = {p.name: peek(p) for p in files if p.is_file()}
        return {name: p for name, p in peeked.items() if p is not None}

    def _checkpoint_files(self) -> list[Path]:
        """The run's epoch checkpoints: last, the history, the best files."""
        names = [LAST] + sorted(p.name for p in self.run_dir.glob("checkpoint-*.pth.tar"))
        names += [s.best_file for s in self.sets if s.best_file]
        return [self.path(n) for n in names if self.path(n).is_file()]


def _describe(path: Path, counters: dict | None) -> str:
    """A checkpoint as the quit message names it: where, and which position it holds."""
    c = counters or {}
    if c.get("epoch_step"):
        return f"{path} (epoch {c.get('epoch')}, step {c['epoch_step']})"
    return f"{path} (end of epoch {int(c.get('epoch', 0)) - 1})"


def _rows(peeked: dict) -> dict[int, dict]:
    """A checkpoint's summary rows by epoch."""
    summary = peeked.get("summary") or {}
    rows = summary.get("rows", []) if isinstance(summary, dict) else []
    return {int(r["epoch"]): r for r in rows if isinstance(r, dict) and "epoch" in r}


def _position(peeked: dict) -> tuple[int, int]:
    counters = peeked.get("counters") or {}
    return int(counters.get("epoch", 0)), int(counters.get("epoch_step", 0))
