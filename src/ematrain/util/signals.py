"""Ctrl-C and SIGTERM while training: the first asks for a graceful stop, the second quits at once.

The first signal sets a flag that the epoch loop reads after each optimizer update: the run then
saves `last.pth.tar` and exits 130 (SIGINT) or 143 (SIGTERM). The second ends the process at once,
even while the main thread is inside a long native operation. A Python signal handler could not
do that: it runs only when the main thread gets back to the interpreter. So the signals are seen
by a watcher thread instead: Python's low-level handler, in whichever thread the signal lands,
writes its number to a wakeup pipe (`signal.set_wakeup_fd`), and the watcher reads it at once.
Every file is written atomically, so quitting at once leaves the previous version of each whole;
the temporary file of a write in progress is removed.

While a `StopRequest` is active the signals are also blocked in the main thread, so every thread
and loader process started meanwhile inherits the block: loader workers never react to the
terminal's Ctrl-C, and the stop message is printed once, not once per worker.
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable

from .atomic import remove_writes_in_flight

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# File descriptors a forked loader worker must not keep open (the run folder's lock: a worker
# that outlives a killed main process would hold it).
_WORKERS_CLOSE: set[int] = set()


def close_in_loader_workers(fd: int | None, keep: bool = True) -> None:
    """Have loader workers forked from now on close `fd` (or, `keep=False`, stop doing so)."""
    if fd is not None:
        (_WORKERS_CLOSE.add if keep else _WORKERS_CLOSE.discard)(fd)
_STOP_WATCHING = 0  # the byte that ends the watcher (no signal has number 0)


class StopRequest:
    """While active (a context manager, in the main thread), SIGINT and SIGTERM are watched.

    Calling the instance tells whether a stop was requested; `exit_code` is 128 + the signal.
    """

    def __init__(self, prog: str = "train.py", quiet: bool = False,
                 files: Callable[[], str] | None = None):
        self.prog, self.quiet = prog, quiet  # quiet: no message (torchrun ranks other than 0)
        # What quitting at once leaves on disk, for its message (called from the watcher).
        self.files = files
        self.signum: int | None = None
        self._saved: dict = {}

    def __enter__(self) -> "StopRequest":
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        # Started before the signals are blocked, so that the watcher itself may receive them.
        self._watcher = threading.Thread(target=self._watch, name="ematrain-signals", daemon=True)
        self._watcher.start()
        self._saved = {sig: signal.signal(sig, _ignore) for sig in _SIGNALS}
        self._saved_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        return self

    def __exit__(self, *exc) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        signal.set_wakeup_fd(self._saved_fd)
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        os.write(self._write, bytes([_STOP_WATCHING]))
        self._watcher.join()
        os.close(self._read)
        os.close(self._write)

    def _watch(self) -> None:
        while True:
            for signum in os.read(self._read, 64):
                if signum == _STOP_WATCHING:
                    return
                # The pipe carries every signal with a Python handler (torch's SIGCHLD too).
                if signum in _SIGNALS:
                    self._received(signum)

    def _received(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            if not self.quiet:
                _say(f"\n{signal.Signals(signum).name} received: finishing the current step "
                     f"and saving a checkpoint (press Ctrl-C again to quit at once)")
        else:
            self.quit_now(signum)

    def quit_now(self, signum: int) -> None:
        try:
            remove_writes_in_flight()
            for child in multiprocessing.active_children():  # loader workers would linger
                child.kill()
            left = "the files on disk are the last complete ones"
            if self.files is not None:
                with contextlib.suppress(Exception):  # the message must not stop the quit
                    left = self.files()
            _say(f"{self.prog}: {signal.Signals(signum).name} again: quitting at once; {left}")
        finally:
            os._exit(128 + signum)

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


def _say(text: str) -> None:
    """A message on stderr, if there still is one: with the terminal gone (its window closed,
    an ssh session dropped) a write fails, and the signal must still be acted on."""
    try:
        sys.stdout.flush()
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def in_loader_worker() -> None:
    """In a DataLoader worker process: ignore SIGINT and SIGTERM. A terminal sends Ctrl-C to the
    whole process group, and a batch system its SIGTERM to every process of a job; the main
    process handles them (it may still need a batch to finish its step), and ends the workers
    itself (`_end_loader_workers`)."""
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    for fd in _WORKERS_CLOSE:
        try:
            os.close(fd)
        except OSError:
            pass


@atexit.register
def _end_loader_workers() -> None:
    """At exit, before multiprocessing's own exit handler would wait for daemonic workers that
    ignore its SIGTERM: kill them (their work is over). Loaders normally end their workers
    themselves (`data.loaders.batches`); this is the last resort."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler would report the killed workers as a failure.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()


def _ignore(signum, frame) -> None:
    """The Python-level handler: the watcher has already acted on the signal."""
