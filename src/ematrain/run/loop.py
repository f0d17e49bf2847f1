"""The epoch loop around the train step (`step.train_step`), and where the run is (`Counters`).

`EpochLoop.run` walks an epoch's batches around the step (seeding, progress, the non-finite
bookkeeping, skipped-step rollback) and hands control back to its caller after every optimizer
update, where recovery saves and stop requests are handled.

The loop keeps running sums on the device and reads them back only every `log_interval` steps
and when its caller asks (before a save): on a GPU each `.item()` stalls the pipeline.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..data.loaders import batches
from ..data.naflex import batch_images
from ..ema.collection import EmaCollection
from ..util.clock import RunClock, StepTimer, duration
from ..util.logs import show_bars
from ..util.seeding import seed_step
from .step import Batches, Recipe, SkippedStep, train_step


class NonFinite(RuntimeError):
    """The run produced NaN/Inf and must stop; `hint` says what a user can do about it."""
    hint = ""


class NonFiniteLoss(NonFinite):
    hint = "--skip-nonfinite N tolerates N bad steps"

    def __init__(self, epoch: int, step: int):
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


class NonFiniteShadows(NonFinite):
    hint = "--model-ema-precheck skips the updates of non-finite weights"

    def __init__(self, epoch: int, names: list[str]):
        super().__init__(f"EMA {', '.join(names)} holds NaN/Inf at epoch {epoch}: the model's "
                         f"weights went non-finite")
        self.epoch = epoch


@dataclass
class Counters:
    """Where the run is; saved in every checkpoint, so a resumed run goes on at the same step."""
    epoch: int = 0          # the epoch in progress, or the next one to start
    epoch_step: int = 0     # batches of it done
    num_updates: int = 0    # optimizer updates in all
    # This epoch's running loss (summed over samples): a run resumed mid-epoch reports the same
    # train_loss as the uninterrupted one.
    loss_sum: float = 0.0
    loss_count: int = 0
    skipped_nonfinite: int = 0
    world_size: int = 1

    @property
    def mid_epoch(self) -> bool:
        return self.epoch_step > 0

    def finish_epoch(self) -> None:
        self.epoch, self.epoch_step, self.loss_sum, self.loss_count = self.epoch + 1, 0, 0.0, 0

    @property
    def train_loss(self) -> float:
        return self.loss_sum / max(self.loss_count, 1)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "epoch" not in state:
            raise TypeError(f"expected the counters as a mapping with an epoch, got {state!r:.60}")
        for name, value in asdict(self).items():
            if name in state:
                setattr(self, name, type(value)(state[name]))


def current_lr(optimizer) -> float:
    lrs = [group["lr"] for group in optimizer.param_groups]
    return sum(lrs) / len(lrs)


@dataclass
class LoopConfig:
    accum_steps: int = 1
    log_interval: int = 50
    skip_nonfinite: int = 0  # steps that may be skipped in the whole run
    seed: int = 0
    rank: int = 0


class _Tally:
    """The epoch's loss sum and the first non-finite step, kept on the device."""

    def __init__(self, counters: Counters, device: torch.device):
        self.counters = counters
        self.loss_sum = torch.tensor(counters.loss_sum, dtype=torch.float64, device=device)
        self.first_bad = torch.tensor(-1, device=device)

    def add(self, loss: torch.Tensor, count: int, batch: int) -> None:
        finite = torch.isfinite(loss)
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, batch, self.first_bad)
        self.loss_sum += loss.double() * count
        self.counters.loss_count += count

    def flush(self) -> None:
        self.counters.loss_sum = float(self.loss_sum)


class EpochLoop:
    """Runs epochs of `train_step` and yields to its caller after every optimizer update.

    A non-finite loss raises NonFiniteLoss: without --skip-nonfinite it is found at the next
    log interval (or `check`) from a marker kept on the device, with the exact step; with it,
    every loss is checked before its backward, and a bad step is skipped: its gradients dropped
    and the BatchNorm statistics its forward changed restored.
    """

    def __init__(self, model, optimizer, scheduler, emas: EmaCollection, recipe: Recipe,
                 batches: Batches, counters: Counters, config: LoopConfig,
                 any_rank=lambda flag: flag, show: bool = True, log=print):
        self.model, self.optimizer, self.scheduler, self.emas = model, optimizer, scheduler, emas
        self.recipe, self.batches, self.counters, self.config = recipe, batches, counters, config
        self.any_rank, self.show, self.log = any_rank, show, log
        self.tally: _Tally | None = None
        # --save-images: given (batch index, the step's input), writes it (primary process).
        self.save_images = None
        self.clock: RunClock | None = None  # the run's, for the remaining time in progress lines
        # Called at each log interval with the values read then: (loss, lr, images/s of this
        # process or None, data-wait share or None). No other read of the device.
        self.on_interval: Callable[[float, float, float | None, float | None], None] | None = None
        self._last_loss: torch.Tensor | None = None
        if config.skip_nonfinite:
            recipe.skip = lambda loss: any_rank(not bool(torch.isfinite(loss)))

    def run(self, loader) -> Iterator[int]:
        """Train from batch `counters.epoch_step` to the end of the epoch."""
        self.model.train()
        self.tally = _Tally(self.counters, self.batches.device)
        progress = _Progress(self, self.counters.epoch_step + len(loader))
        try:
            with batches(loader) as stream:
                yield from self._batches(progress.timer.waiting(stream), progress)
        finally:
            progress.close()
        self.tally.flush()

    def _batches(self, stream, progress: "_Progress") -> Iterator[int]:
        c, accum, total = self.counters, self.config.accum_steps, progress.batches
        for batch, (images, targets) in enumerate(stream, start=c.epoch_step):
            seed_step(self.config.seed, c.epoch, batch, self.config.rank)
            images, targets = self.batches(images, targets)
            if self.save_images is not None and (
                    batch % self.config.log_interval == 0 or batch + 1 == total):
                self.save_images(batch, images)  # timm's: at each log interval and the last
            # The last batches of an epoch may form a shorter accumulation group.
            update = (batch + 1) % accum == 0 or batch + 1 == total
            group_size = min(accum, total - (batch - batch % accum))
            if not self._step(batch, images, targets, update, group_size):
                progress.update(batch, None, 0)
                continue
            if update:
                c.num_updates += 1
                if self.scheduler is not None:
                    self.scheduler.step_update(num_updates=c.num_updates)
            progress.update(batch, self._last_loss, batch_images(images))
            if update and batch + 1 < total:
                yield c.num_updates

    def _step(self, batch: int, images, targets, update: bool, group_size: int) -> bool:
        rollback = _float_buffers(self.model, clone=True) if self.config.skip_nonfinite else None
        try:
            loss = train_step(self.model, self.optimizer, images, targets, self.recipe, self.emas,
                              update, group_size)
        except SkippedStep:
            self._skip(batch, rollback)
            return False
        self.tally.add(loss, batch_images(images), batch)
        self.counters.epoch_step = batch + 1
        self._last_loss = loss
        return True

    def _skip(self, batch: int, rollback: list[torch.Tensor]) -> None:
        c = self.counters
        c.skipped_nonfinite += 1
        self.log(f"  non-finite loss at epoch {c.epoch}, step {batch}: skipped "
                 f"({c.skipped_nonfinite}/{self.config.skip_nonfinite})")
        if c.skipped_nonfinite > self.config.skip_nonfinite:
            raise NonFiniteLoss(c.epoch, batch)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(_float_buffers(self.model), rollback)
        c.epoch_step = batch + 1

    def check(self) -> None:
        """Raise NonFiniteLoss if any step so far had a non-finite loss (one host read), and
        bring the counters' loss sum up to date: call before saving weights."""
        bad = int(self.tally.first_bad)
        if self.any_rank(bad >= 0):
            raise NonFiniteLoss(self.counters.epoch, bad)
        self.tally.flush()


class _Progress:
    """The bar on a terminal, a plain line every `log_interval` steps elsewhere: loss, LR, the
    training rate (start-up excluded), the share of time spent waiting for data, and the run's
    remaining time when the loop has a `RunClock`. On a terminal the timing fields also refresh
    every few seconds between log intervals (host clocks only: no read of the device)."""

    REFRESH_S = 2.0

    def __init__(self, loop: EpochLoop, batches: int):
        self.loop, self.batches = loop, batches
        c = loop.counters
        self.bar = tqdm(total=batches, initial=c.epoch_step, desc=f"train {c.epoch}", leave=False,
                        disable=not (loop.show and show_bars()), unit="step", dynamic_ncols=True)
        self.timer = StepTimer()
        self.fields: dict[str, str] = {}

    def update(self, batch: int, loss: torch.Tensor | None, images: int) -> None:
        self.bar.update(1)
        self.timer.step_done(images)
        last = batch + 1 == self.batches
        if loss is not None and ((batch + 1) % self.loop.config.log_interval == 0 or last):
            self.loop.check()
            value, lr = float(loss), current_lr(self.loop.optimizer)
            self.fields.update(loss=f"{value:.4f}", lr=f"{lr:.3g}")
            rate, wait = self._timing(batch) or (None, None)
            if self.loop.on_interval is not None:
                self.loop.on_interval(value, lr, rate, wait)
            if self.bar.disable and self.loop.show:
                text = " ".join(f"{v} {k}" if k == "img/s" else f"{k} {v}"
                                for k, v in self.fields.items())
                self.loop.log(f"  train {self.loop.counters.epoch} [{batch + 1}/{self.batches}] "
                              f"{text}")
                return
        elif self.bar.disable or self.timer.elapsed() < self.REFRESH_S:
            return
        else:
            self._timing(batch)
        self.bar.set_postfix(self.fields)

    def _timing(self, batch: int) -> tuple[float, float] | None:
        """The interval's (images/s, data-wait share) into the fields, and returned."""
        timed = self.timer.interval()
        if timed is None:
            return None
        rate, wait = timed
        self.fields.update({"img/s": f"{rate:.0f}", "data": f"{100 * wait:.0f}%"})
        clock = self.loop.clock
        left = None if clock is None else clock.remaining(
            self.loop.counters.epoch, self.batches - batch - 1, self.timer.step_seconds)
        if left is not None:
            self.fields["eta"] = duration(left)
        return timed

    def close(self) -> None:
        self.bar.close()


def _float_buffers(model: nn.Module, clone: bool = False) -> list[torch.Tensor]:
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return [b.detach().clone() for b in buffers] if clone else buffers
