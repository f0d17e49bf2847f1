"""The checkpoint files of a run folder as the file system holds them, apart from the records
that say which epoch each must hold (`CheckpointKeeper`).

A best or history file is a hard link of the `last.pth.tar` it was (one physical file per epoch,
as timm does), made under a temporary name and renamed into place; where the file system
refuses links, it is a copy. `agree_with_records` puts every file at the epoch a checkpoint's
records name, taking that epoch's checkpoint from whichever file of the folder holds it.
"""
from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from ..checkpoint.files import write_file
from ..checkpoint.schema import peek
from ..util.atomic import WriteFailed, atomic_copy, fsync_dir, writing
from ..util.logs import log

LAST = "last.pth.tar"
RECOVERY = "recovery.pth.tar"
# What a file system says when it cannot hard-link: then the files are copies.
_NO_LINKS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP,
             errno.ENOSYS, errno.EACCES}


def history_name(epoch: int) -> str:
    return f"checkpoint-{epoch}.pth.tar"


class CheckpointFiles:
    """last, recovery, history and best files in one folder: atomic writes, links, listing.

    Args:
        best_files: the names of the weight sets' best files (`model_best.pth.tar`, ...).
    """

    def __init__(self, best_files: tuple[str, ...]):
        self.best_files = best_files
        self.dir: Path | None = None
        self._links = True

    def path(self, name: str) -> Path:
        return self.dir / name

    def write(self, name: str, obj: dict) -> Path:
        """`obj` as `name`, atomically (raises `WriteFailed`)."""
        path = self.path(name)
        write_file(path, obj)
        return path

    def place(self, source: Path, name: str) -> None:
        """`name` as a hard link of `source`, renamed into place (a copy where links fail)."""
        target = self.path(name)
        if self._links:
            tmp = self.path(f".{name}.{uuid.uuid4().hex[:8]}.tmp")
            with writing(tmp):
                try:
                    os.link(source, tmp)
                    os.replace(tmp, target)
                    fsync_dir(self.dir)
                    return
                except OSError as exc:
                    tmp.unlink(missing_ok=True)
                    if exc.errno not in _NO_LINKS:
                        raise WriteFailed(f"cannot write {target}: {exc.strerror}") from None
            self._links = False
            log.info(f"{self.dir}: the file system refuses hard links; the best and history "
                     f"files are copies")
        atomic_copy(source, target)

    def prune_history(self, keep: set[str]) -> None:
        """Remove the history files not named in `keep`."""
        for path in self.dir.glob("checkpoint-*.pth.tar"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def epoch_files(self) -> list[Path]:
        """The epoch checkpoints present: last, the history, the best files."""
        names = [LAST] + sorted(p.name for p in self.dir.glob("checkpoint-*.pth.tar"))
        names += list(self.best_files)
        return [self.path(n) for n in names if self.path(n).is_file()]

    def on_disk(self) -> dict[str, dict]:
        """The checkpoint files (last, recovery, history, best), peeked, by name."""
        files = self.epoch_files() + [self.path(RECOVERY)]
        peeked = {p.name: peek(p) for p in files if p.is_file()}
        return {name: p for name, p in peeked.items() if p is not None}

    def kept(self) -> str:
        """What a failed write leaves on disk: every earlier file is whole (written atomically),
        but there may be no checkpoint yet."""
        found = [p for p in (self.path(LAST), self.path(RECOVERY)) if p.is_file()]
        if not found:
            return "no checkpoint of this run was saved before it"
        newest = max(found, key=lambda p: p.stat().st_mtime_ns)
        return f"the previous checkpoint is intact ({newest})"


def agree_with_records(files: CheckpointFiles, wanted: dict[str, int], last: dict) -> list[str]:
    """Put every file of `wanted` (name -> epoch, from `last`'s records) at its epoch and drop
    the history files it does not name; returns what was put right. An epoch's checkpoint is
    told from the same epoch of another run (a resume from an older checkpoint) by its summary
    row."""
    rows = summary_rows(last)
    seen: dict[Path, dict | None] = {}

    def holds(path: Path, epoch: int) -> bool:
        if path not in seen:
            seen[path] = peek(path) if path.is_file() else None
        found = seen[path]
        if found is None or found["epoch"] != epoch or position(found)[1]:
            return False
        mine, theirs = summary_rows(found).get(epoch), rows.get(epoch)
        return mine is None or theirs is None or mine == theirs

    fixed = []
    for name, epoch in wanted.items():
        if holds(files.path(name), epoch):
            continue
        source = next((p for p in files.epoch_files() if holds(p, epoch)), None)
        if source is None:
            log.warning(f"warning: {files.path(name)} should hold epoch {epoch}, and no file "
                        f"of the run holds that epoch's checkpoint; it is left as it is")
            continue
        files.place(source, name)
        seen.pop(files.path(name), None)
        fixed.append(f"{name} (epoch {epoch}, from {source.name})")
    files.prune_history({n for n in wanted if n.startswith("checkpoint-")})
    return fixed


def describe(path: Path, counters: dict | None) -> str:
    """A checkpoint as the quit message names it: where, and which position it holds."""
    c = counters or {}
    if c.get("epoch_step"):
        return f"{path} (epoch {c.get('epoch')}, step {c['epoch_step']})"
    return f"{path} (end of epoch {int(c.get('epoch', 0)) - 1})"


def summary_rows(peeked: dict) -> dict[int, dict]:
    """A checkpoint's summary rows by epoch."""
    summary = peeked.get("summary") or {}
    rows = summary.get("rows", []) if isinstance(summary, dict) else []
    return {int(r["epoch"]): r for r in rows if isinstance(r, dict) and "epoch" in r}


def position(peeked: dict) -> tuple[int, int]:
    """(epoch, step into it) of a peeked checkpoint."""
    counters = peeked.get("counters") or {}
    return int(counters.get("epoch", 0)), int(counters.get("epoch_step", 0))
