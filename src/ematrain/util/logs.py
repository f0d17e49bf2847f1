"""The package's logger: plain lines on stderr, progress and notices alike."""
from __future__ import annotations

import logging
import os
import sys
import warnings

log = logging.getLogger("ematrain")


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is logged, not to the stream it was when
    the handler was made (a caller may replace sys.stderr between two runs in one process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if not is_rank_zero():
        quiet()


def is_rank_zero() -> bool:
    """This process is torchrun's rank 0, or no torchrun worker at all (as torchrun tells its
    workers from their start, before the process group exists)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def quiet() -> None:
    """Another rank than 0: its notices and warnings (ours, and Python warnings such as
    timm's) would repeat rank 0's, so only errors are printed."""
    log.setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def plural(count: int | float, word: str) -> str:
    """``1 epoch``, ``3 epochs``, ``0.5 epochs``."""
    return f"{count:g} {word}" + ("" if count == 1 else "s")


def show_bars() -> bool:
    """Progress bars only on a terminal, so CI logs stay readable."""
    return sys.stderr.isatty()
