"""The package's logger: plain lines on stderr, progress and notices alike."""
from __future__ import annotations

import logging
import sys

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


def plural(count: int | float, word: str) -> str:
    """``1 epoch``, ``3 epochs``, ``0.5 epochs``."""
    return f"{count:g} {word}" + ("" if count == 1 else "s")
