"""How long a run has taken, how long it will still take, and how long it waits for data.

Rates count training only: an epoch's clock starts when its first step has finished, so model
building, a resume, the loader workers' start and the first batch (often a compile) never make a
step look slow. The run's remaining time comes from the epochs this process has timed, whole
(training, validation, the save), or, before the first one ends, from the step rate.
"""
from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """``7.3s``, ``4m05s``, ``2h07m``, ``3d04h``: two units at most, wide enough to compare."""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours == 0:
        return f"{minutes}m{sec:02d}s"
    days, hours = divmod(hours, 24)
    return f"{hours}h{minutes:02d}m" if days == 0 else f"{days}d{hours:02d}h"


class StepTimer:
    """Steps per second and the share of time spent waiting for batches, per log interval.

    `waiting()` wraps the batch iterator: the time inside its ``next()`` is data wait. The first
    step of the timer is not counted (start-up), so a rate exists from the second step on.
    """

    def __init__(self, now=time.perf_counter):
        self.now = now
        self.mark: float | None = None      # start of the current interval
        self.steps = self.images = 0        # in the current interval
        self.waited = 0.0                   # data wait in the current interval
        self.step_seconds: float | None = None  # the latest interval's time per step

    def waiting(self, stream):
        """Yield from `stream`, timing each wait for the next batch."""
        it = iter(stream)
        while True:
            t0 = self.now()
            try:
                item = next(it)
            except StopIteration:
                return
            if self.mark is not None:
                self.waited += self.now() - t0
            yield item

    def step_done(self, images: int) -> None:
        if self.mark is None:
            now = self.now()
            self.mark = now  # the first step's end: start-up stays out of the rate
            return
        self.steps += 1
        self.images += images

    def elapsed(self) -> float:
        """Seconds since the current interval began (0 before the first step ended)."""
        return 0.0 if self.mark is None else self.now() - self.mark

    def interval(self) -> tuple[float, float] | None:
        """(images per second, data-wait share) since the last call, or None before any
        counted step; starts the next interval."""
        if not self.steps:
            return None
        now = self.now()
        spent = max(now - self.mark, 1e-9)
        rate, wait = self.images / spent, min(self.waited / spent, 1.0)
        self.step_seconds = spent / self.steps
        self.mark, self.steps, self.images, self.waited = now, 0, 0, 0.0
        return rate, wait


class RunClock:
    """Elapsed time and the estimate of what remains, for the epochs of one process."""

    def __init__(self, num_epochs: int, steps_per_epoch: int, now=time.perf_counter):
        self.num_epochs, self.steps_per_epoch, self.now = num_epochs, steps_per_epoch, now
        self.start = now()
        self.epoch_start = self.start
        self.epoch_seconds: list[float] = []   # whole epochs timed by this process

    def start_epoch(self) -> None:
        self.epoch_start = self.now()

    def end_epoch(self) -> float:
        """Record the epoch that just ended; return its duration."""
        took = self.now() - self.epoch_start
        self.epoch_seconds.append(took)
        return took

    def elapsed(self) -> float:
        return self.now() - self.start

    def per_epoch(self) -> float | None:
        """Typical epoch duration: the mean of the timed epochs after the first (which carries
        the start-up) when there are later ones."""
        times = self.epoch_seconds[1:] or self.epoch_seconds
        return sum(times) / len(times) if times else None

    def remaining(self, epoch: int, steps_left: int = 0, step_seconds: float | None = None
                  ) -> float | None:
        """Time left after epoch `epoch`'s remaining `steps_left` steps: those at `step_seconds`,
        then the later epochs at the typical epoch duration (or at the step rate)."""
        later = self.num_epochs - 1 - epoch
        per_epoch = self.per_epoch()
        if per_epoch is None and step_seconds is None:
            return None
        if per_epoch is None:
            per_epoch = step_seconds * self.steps_per_epoch
        now = steps_left * step_seconds if step_seconds is not None else 0.0
        return now + later * per_epoch
