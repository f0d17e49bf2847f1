"""The train step, the epoch loop around it, and validation.

`train_step` is torchvision's recipe: forward, loss, backward (through the AMP scaler), and on the
last batch of an accumulation group clip, step and the EMA update. `EpochLoop.run` walks an epoch's
batches around it (seeding, progress, the non-finite bookkeeping, skipped-step rollback) and
hands control back to its caller after every optimizer update, where recovery saves and stop
requests are handled.

The loop keeps running sums on the device and reads them back only every `log_interval` steps
and when its caller asks (before a save): on a GPU each `.item()` stalls the pipeline.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch
from timm.models import model_parameters
from timm.utils import dispatch_clip_grad
from torch import nn
from tqdm import tqdm

from .clock import RunClock, StepTimer, duration
from .data import batches
from .ema import ModelEma, WeightSwapper
from .errors import UserError
from .models import unwrap_model
from .seeding import seed_step


def show_bars() -> bool:
    """Progress bars only on a terminal, so CI logs stay readable."""
    return sys.stderr.isatty()


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


class SkippedStep(Exception):
    """Raised by `train_step` before the backward of a loss that --skip-nonfinite skips."""


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


# ----------------------------------------------------------------------------- the step
@dataclass
class Recipe:
    """How one training step runs: loss, precision, clipping; `skip` for --skip-nonfinite."""
    loss_fn: nn.Module
    autocast: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    clip_grad: float | None = None
    clip_mode: str = "norm"
    # --skip-nonfinite: given the loss, whether to skip this step (every rank must agree).
    skip: Callable[[torch.Tensor], bool] | None = None


def _no_sync(model: nn.Module, update: bool):
    """DDP's no_sync for the micro-batches of an accumulation group before its last one."""
    if not update and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(model: nn.Module, optimizer, images: torch.Tensor, targets: torch.Tensor,
               recipe: Recipe, ema: ModelEma | None, update: bool = True,
               group_size: int = 1) -> torch.Tensor:
    """Forward, loss, backward; when `update`: clip, optimizer step, EMA update.

    `group_size` batches make one update (gradient accumulation): each one's loss is divided by
    it. Returns the batch's loss (detached, on the device).
    """
    device = images.device.type
    with _no_sync(model, update):
        with torch.autocast(device, dtype=recipe.autocast, enabled=recipe.autocast is not None):
            # The loss of a 16-bit model's output is computed in float32, as autocast does.
            loss = recipe.loss_fn(model(images).float(), targets)
        if recipe.skip is not None and recipe.skip(loss):
            raise SkippedStep
        scaled = loss / group_size if group_size > 1 else loss
        # Second-order optimizers (AdaHessian) need the graph of the gradients.
        create_graph = getattr(optimizer, "is_second_order", False)
        if recipe.scaler is not None:
            recipe.scaler.scale(scaled).backward(create_graph=create_graph)
        else:
            scaled.backward(create_graph=create_graph)
    if update:
        if recipe.clip_grad is not None:
            if recipe.scaler is not None:
                recipe.scaler.unscale_(optimizer)
            # AGC leaves the classifier alone, as timm does.
            params = model_parameters(model, exclude_head="agc" in recipe.clip_mode)
            dispatch_clip_grad(params, value=recipe.clip_grad, mode=recipe.clip_mode)
        if recipe.scaler is not None:
            recipe.scaler.step(optimizer)
            recipe.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
    return loss.detach()


# ----------------------------------------------------------------------------- the epoch loop
@dataclass
class Batches:
    """What happens to a loader batch before the step: device, normalization (the loader gives
    uint8), random erasing, mixing, dtype, layout."""
    device: torch.device
    dtype: torch.dtype | None = None  # --model-dtype; None keeps float32
    channels_last: bool = False
    mixup_fn: Callable | None = None
    normalize: Callable | None = None
    erase: Callable | None = None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor):
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.normalize is not None:
            images = self.normalize(images)
        if self.erase is not None:
            images = self.erase(images)
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        if self.dtype is not None:
            images = images.to(self.dtype)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets


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

    def __init__(self, model, optimizer, scheduler, ema, recipe: Recipe, batches: Batches,
                 counters: Counters, config: LoopConfig, any_rank=lambda flag: flag,
                 show: bool = True, log=print, power_ema: ModelEma | None = None):
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        # The power-function EMAs of post-hoc EMA, updated after each optimizer step as `ema`.
        self.power_ema = power_ema
        self.recipe, self.batches, self.counters, self.config = recipe, batches, counters, config
        self.any_rank, self.show, self.log = any_rank, show, log
        self.tally: _Tally | None = None
        self.clock: RunClock | None = None  # the run's, for the remaining time in progress lines
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
            progress.update(batch, self._last_loss, images.size(0))
            if update and batch + 1 < total:
                yield c.num_updates

    def _step(self, batch: int, images, targets, update: bool, group_size: int) -> bool:
        rollback = _float_buffers(self.model, clone=True) if self.config.skip_nonfinite else None
        try:
            loss = train_step(self.model, self.optimizer, images, targets, self.recipe, self.ema,
                              update, group_size)
        except SkippedStep:
            self._skip(batch, rollback)
            return False
        if update and self.power_ema is not None:
            self.power_ema.update(self.model)
        self.tally.add(loss, images.size(0), batch)
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
            self.fields.update(loss=f"{float(loss):.4f}", lr=f"{current_lr(self.loop.optimizer):.3g}")
            self._timing(batch)
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

    def _timing(self, batch: int) -> None:
        timed = self.timer.interval()
        if timed is None:
            return
        rate, wait = timed
        self.fields.update({"img/s": f"{rate:.0f}", "data": f"{100 * wait:.0f}%"})
        clock = self.loop.clock
        left = None if clock is None else clock.remaining(
            self.loop.counters.epoch, self.batches - batch - 1, self.timer.step_seconds)
        if left is not None:
            self.fields["eta"] = duration(left)

    def close(self) -> None:
        self.bar.close()


def _float_buffers(model: nn.Module, clone: bool = False) -> list[torch.Tensor]:
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return [b.detach().clone() for b in buffers] if clone else buffers


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, ema: ModelEma | None = None,
             epoch: int | None = None, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, reduce=lambda t: t, show: bool = True,
             normalize: Callable | None = None, emas: Sequence[ModelEma] = ()) -> list[dict]:
    """Evaluate the raw weights and every EMA shadow (of `ema`, or of each of `emas`, which
    live in one place) in one pass over `loader`.

    Each batch is decoded and augmented once and fed to every weight set, so K EMAs cost K extra
    forward passes, not K extra passes over the data. `reduce` sums the per-set totals across
    ranks (each rank sees a disjoint share of the images). `normalize` turns the loader's uint8
    batches into the model's input (`data.Normalize`). Returns one dict per weight set (raw first,
    then the shadows in order) with 'loss', 'top1', 'top5' and 'count'.
    """
    sets = _EvalSets(model, [ema] if ema is not None else list(emas))
    sums = torch.zeros(len(sets.nets), 4, dtype=torch.float64, device=device)
    bar = tqdm(total=len(loader), desc="validate" if epoch is None else f"val {epoch}",
               leave=False, disable=not (show and show_bars()), unit="batch", dynamic_ncols=True)
    try:
        with batches(loader) as stream:
            for images, targets in stream:
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                if normalize is not None:
                    images = normalize(images)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                sets.score(images, targets, sums, amp_dtype)
                bar.update(1)
    finally:
        bar.close()
        sets.restore()
    return _results(reduce(sums))


class _EvalSets:
    """The weight sets of one validation pass, each computing in its own dtype (--model-dtype,
    --model-ema-dtype). A shadow on another device than the model (--model-ema-force-cpu) is
    swapped into the live model, and computes in its dtype."""

    def __init__(self, model: nn.Module, emas: list[ModelEma]):
        for ema in emas:
            ema.wait()
        # DDP's forward would broadcast buffers (a collective) while ranks hold different numbers
        # of validation batches: evaluate the plain module under DDP.
        if isinstance(getattr(model, "_orig_mod", model), nn.parallel.DistributedDataParallel):
            model = unwrap_model(model)
        model.eval()
        shadows = [shadow for ema in emas for shadow in ema.shadows]
        first = next(unwrap_model(model).parameters())
        self.swapper = (WeightSwapper(model, shadows)
                        if shadows and emas[0].device != first.device else None)
        self.nets = [model] + ([model] * len(shadows) if self.swapper else list(shadows))
        self.dtypes = [first.dtype] + [first.dtype if self.swapper else next(s.parameters()).dtype
                                       for s in shadows]
        self.order = list(range(len(self.nets)))

    def score(self, images, targets, sums: torch.Tensor, amp_dtype) -> None:
        for index in self.order:
            if self.swapper is not None:
                self.swapper.load(index)
            x = images if amp_dtype is not None else images.to(self.dtypes[index])
            with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = self.nets[index](x)
            sums[index] += _batch_sums(output, targets)
        # Walking the sets back and forth saves one weight swap per batch.
        self.order.reverse()

    def restore(self) -> None:
        if self.swapper is not None:
            self.swapper.restore()


def _batch_sums(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, images] of one batch, in float64.

    Per-sample losses summed in float64 and integer hit counts: the numbers do not depend on how
    the images are split into batches or ranks, so validate.py and a distributed run reproduce
    the training log.
    """
    loss = nn.functional.cross_entropy(output.float(), targets, reduction="none").double().sum()
    top1, top5 = topk_correct(output, targets, (1, 5))
    count = torch.tensor(float(targets.size(0)), dtype=torch.float64, device=output.device)
    return torch.stack([loss, top1, top5, count])


def _results(sums: torch.Tensor) -> list[dict]:
    count = int(sums[0, 3])
    if count == 0:
        raise UserError("validation split produced no batches")
    return [{"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
             "count": count} for loss, top1, top5, _ in sums.tolist()]


def topk_correct(output: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """How many targets are among the top-k predictions, for each k (k capped at the classes)."""
    maxk = min(max(ks), output.size(1))
    top = output.topk(maxk, dim=1).indices
    hits = top.eq(targets.unsqueeze(1))
    return [hits[:, :min(k, maxk)].any(dim=1).sum().double() for k in ks]
