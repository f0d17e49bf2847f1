"""Files that are either the old version or the new one, never half of each.

Every file a run writes goes through `atomic_write`: a temporary file in the same folder, flushed,
fsynced and renamed over the target. A crash, a kill or a full disk at any moment leaves the
previous file whole.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import RunFailure


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
# Temporary files of the writes in progress (any thread), so that quitting at once can remove them.
_IN_FLIGHT: set[str] = set()


class WriteFailed(RunFailure):
    """A file could not be written (a full disk, a lost mount); the previous version is whole."""


@contextlib.contextmanager
def writing(tmp: str | Path):
    """Mark `tmp` as a write in progress: quitting at once removes it."""
    _IN_FLIGHT.add(str(tmp))
    try:
        yield
    finally:
        _IN_FLIGHT.discard(str(tmp))


def atomic_write(path: str | Path, write: Callable, by_path: bool = False) -> None:
    """Write `path` through a temporary file in its folder; `write` receives a binary file (or,
    `by_path`, the temporary file's path: torch.save writes a path without Python in between).

    Raises WriteFailed (one line) when the disk refuses; torch's zip writer reports a failing
    write as a RuntimeError, so that counts as one too.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WriteFailed(f"cannot write {path}: {exc.strerror or exc}") from None
    with writing(tmp):
        try:
            # mkstemp creates 0600; give the file the permissions a plain open() would.
            os.fchmod(fd, 0o666 & ~_UMASK)
            if by_path:
                os.close(fd)
                write(tmp)
                fd = os.open(tmp, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            else:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            _unlink_quietly(tmp)
            raise WriteFailed(f"cannot write {path}: {_reason(exc)}") from None
        except BaseException:
            _unlink_quietly(tmp)
            raise
    fsync_dir(path.parent)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    def write(f):
        with open(src, "rb") as s:
            while chunk := s.read(1 << 22):
                f.write(chunk)
    atomic_write(dst, write)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable: the folder entry itself must reach the disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_writes_in_flight() -> None:
    """Remove the temporary files of unfinished writes (before quitting at once)."""
    for tmp in list(_IN_FLIGHT):
        _unlink_quietly(tmp)


def remove_stale_temporaries(folder: Path) -> None:
    """A run killed during a write leaves its temporary file behind; the real file is whole."""
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
