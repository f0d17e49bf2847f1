"""Graceful stop on SIGINT/SIGTERM: finish the current step, save, exit non-zero."""
from __future__ import annotations

import signal
import sys


class StopRequest:
    """Installs handlers that ask the training loop to stop after the current step.

    A second SIGINT raises KeyboardInterrupt at once; atomic writes still leave the previous
    good checkpoint in place.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name} received: finishing the current step and saving a checkpoint "
              f"(press Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)
