"""The package's logger: plain lines on stderr, progress and notices alike."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("ematrain")


def setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
