"""The training and validation loops.

The hot loop keeps running sums on the device and reads them back only every `log_interval`
steps and at the end of the epoch: on a GPU each `.item()` stalls the pipeline.
"""
from __future__ import annotations

import contextlib
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from timm.models import model_parameters
from timm.utils import dispatch_clip_grad
from torch import nn
from tqdm import tqdm

from .ema import ModelEma, WeightSwapper, unwrap_model
from .errors import UserError


def show_bars() -> bool:
    """Progress bars only on a terminal, so CI logs stay readable."""
    return sys.stderr.isatty()


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, step: int):
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


class Interrupted(Exception):
    """Raised between steps when a stop was requested (SIGINT/SIGTERM)."""


@dataclass
class TrainState:
    """Counters that run across epochs (saved in checkpoints for resume)."""
    epoch: int = 0
    num_updates: int = 0
    # Within the current epoch: steps done and the running loss sum, so that a run resumed
    # mid-epoch reports the same train_loss as the uninterrupted one.
    epoch_step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    skipped_nonfinite: int = 0


def current_lr(optimizer) -> float:
    lrs = [group["lr"] for group in optimizer.param_groups]
    return sum(lrs) / len(lrs)


@dataclass
class StepConfig:
    """How one training step runs: loss, precision, accumulation, clipping, mixing."""
    loss_fn: nn.Module
    clip_grad: float | None = None
    clip_mode: str = "norm"
    accum_steps: int = 1
    amp_dtype: torch.dtype | None = None
    # Inputs are cast to this (--model-dtype); None keeps the loader's float32.
    input_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False
    mixup_fn: object | None = None
    log_interval: int = 50
    skip_nonfinite: int = 0
    seed: int = 0
    rank: int = 0
    recovery_interval: int = 0
    # Under DDP a stop request is agreed across ranks (a collective), so it is polled only every
    # `stop_every` steps; a single process polls its flag after every step for free.
    stop_every: int = 1


def seed_step(seed: int, epoch: int, batch: int, rank: int) -> None:
    """Seed the main process's generators for one step (dropout, drop-path, mixup).

    The step's randomness then depends only on (seed, epoch, step, rank): a run resumed at any
    step, or run with another number of data workers, draws exactly the same numbers.
    """
    step_seed = hash((seed, epoch, batch, rank, 1)) % 2**32
    random.seed(step_seed)
    np.random.seed(step_seed)
    torch.default_generator.manual_seed(step_seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed(step_seed)


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, state: TrainState,
                    device: torch.device, cfg: StepConfig, ema: ModelEma | None = None,
                    epochs: int = 0, should_stop=lambda: False, save_recovery=lambda: None,
                    any_rank=lambda flag: flag, show: bool = True, log=print) -> dict:
    """Train from batch `state.epoch_step` to the end of the epoch.

    With gradient accumulation, `cfg.accum_steps` batches make one optimizer step and the EMA
    is updated once per optimizer step. A stop request is honoured only right after an optimizer
    step, so no accumulated gradient is lost. Returns {'loss': mean loss, 'lr': mean LR}.

    A non-finite loss raises NonFiniteLoss. Without `cfg.skip_nonfinite` it is read back at the
    log interval (no per-step sync) with the exact step recorded on the device; with it, every
    step is checked before its update so the bad step can be skipped.
    """
    model.train()
    batches = state.epoch_step + len(loader)
    accum = cfg.accum_steps
    loss_sum = torch.tensor(state.loss_sum, dtype=torch.float64, device=device)
    first_bad = torch.tensor(-1, device=device)
    bar = tqdm(total=batches, initial=state.epoch_step, desc=f"train {state.epoch}", leave=False,
               disable=not (show and show_bars()), unit="step", dynamic_ncols=True)
    interval_start, interval_images = time.perf_counter(), 0
    amp = torch.autocast(device.type, dtype=cfg.amp_dtype, enabled=cfg.amp_dtype is not None)

    def raise_if_bad_loss():
        bad = int(first_bad)
        if any_rank(bad >= 0):
            bar.close()
            raise NonFiniteLoss(state.epoch, bad)

    for batch, (images, targets) in enumerate(loader, start=state.epoch_step):
        seed_step(cfg.seed, state.epoch, batch, cfg.rank)
        images = images.to(device, dtype=cfg.input_dtype, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if cfg.mixup_fn is not None:
            images, targets = cfg.mixup_fn(images, targets)
        # The last batches of an epoch may form a shorter accumulation group.
        group_end = (batch + 1) % accum == 0 or batch + 1 == batches
        # A skipped step must not leave its batch's statistics in BatchNorm's running buffers.
        saved_buffers = _float_buffers(model, clone=True) if cfg.skip_nonfinite else None
        with amp, _no_grad_sync(model, group_end):
            output = model(images)
            # The loss of a 16-bit model's output is computed in float32, as autocast does.
            loss = cfg.loss_fn(output.float(), targets)
        finite = torch.isfinite(loss.detach())
        # Under DDP every rank must agree to skip, or the gradient all-reduce would hang.
        if cfg.skip_nonfinite and any_rank(not bool(finite)):
            state.skipped_nonfinite += 1
            log(f"  non-finite loss at epoch {state.epoch}, step {batch}: skipped "
                f"({state.skipped_nonfinite}/{cfg.skip_nonfinite})")
            if state.skipped_nonfinite > cfg.skip_nonfinite:
                bar.close()
                raise NonFiniteLoss(state.epoch, batch)
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_copy_(_float_buffers(model), saved_buffers)
            state.epoch_step = batch + 1
            bar.update(1)
            continue
        first_bad = torch.where((first_bad < 0) & ~finite, batch, first_bad)
        # Divide by the real size of this group: the epoch's last group may be shorter.
        group_start = batch - batch % accum
        group_size = min(accum, batches - group_start)
        scaled = loss / group_size if group_size > 1 else loss
        # Second-order optimizers (AdaHessian) need the graph of the gradients.
        create_graph = getattr(optimizer, "is_second_order", False)
        with _no_grad_sync(model, group_end):
            if cfg.scaler is not None:
                cfg.scaler.scale(scaled).backward(create_graph=create_graph)
            else:
                scaled.backward(create_graph=create_graph)
        if group_end:
            _optimizer_step(model, optimizer, cfg)
            state.num_updates += 1
            if ema is not None:
                ema.update(model)
            if scheduler is not None:
                scheduler.step_update(num_updates=state.num_updates)
        loss_sum += loss.detach().double() * images.size(0)
        state.loss_count += images.size(0)
        interval_images += images.size(0)
        state.epoch_step = batch + 1
        bar.update(1)

        last = batch + 1 == batches
        if (batch + 1) % cfg.log_interval == 0 or last:
            raise_if_bad_loss()
            loss_now = float(loss.detach())
            rate = interval_images / max(time.perf_counter() - interval_start, 1e-9)
            lr = current_lr(optimizer)
            if bar.disable and show:
                log(f"  train {state.epoch}/{epochs} [{batch + 1}/{batches}] loss {loss_now:.4f} "
                    f"lr {lr:.3g} {rate:.0f} img/s")
            else:
                bar.set_postfix(loss=f"{loss_now:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
            interval_start, interval_images = time.perf_counter(), 0
        if group_end and not last:
            recover = cfg.recovery_interval and state.num_updates % cfg.recovery_interval == 0
            stop = (batch + 1) % cfg.stop_every == 0 and any_rank(should_stop())
            if recover or stop:
                # Never save weights a bad step may already have spoiled.
                raise_if_bad_loss()
                state.loss_sum = float(loss_sum)
                if recover:
                    save_recovery()
                if stop:
                    bar.close()
                    raise Interrupted()
    bar.close()
    state.loss_sum = float(loss_sum)
    return {"loss": state.loss_sum / max(state.loss_count, 1), "lr": current_lr(optimizer)}


def _float_buffers(model: nn.Module, clone: bool = False) -> list[torch.Tensor]:
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return [b.detach().clone() for b in buffers] if clone else buffers


def _no_grad_sync(model: nn.Module, group_end: bool):
    """DDP's no_sync for the micro-batches of an accumulation group before its last one."""
    if not group_end and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def _optimizer_step(model: nn.Module, optimizer, cfg: StepConfig) -> None:
    if cfg.clip_grad is not None:
        if cfg.scaler is not None:
            cfg.scaler.unscale_(optimizer)
        # AGC leaves the classifier alone, as timm does.
        params = model_parameters(model, exclude_head="agc" in cfg.clip_mode)
        dispatch_clip_grad(params, value=cfg.clip_grad, mode=cfg.clip_mode)
    if cfg.scaler is not None:
        cfg.scaler.step(optimizer)
        cfg.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, ema: ModelEma | None = None,
             epoch: int | None = None, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, reduce=lambda t: t, show: bool = True) -> list[dict]:
    """Evaluate the raw weights and every EMA shadow in one pass over `loader`.

    Each batch is decoded and augmented once and fed to every weight set, so K EMAs cost K extra
    forward passes, not K extra passes over the data. `reduce` sums the per-set totals across
    ranks (each rank sees a disjoint share of the images). Returns one dict per weight set (raw
    first) with 'loss', 'top1', 'top5' and 'count'.
    """
    # Per-sample losses summed in float64 and integer hit counts: the numbers do not depend on
    # how the images are split into batches or ranks, so validate.py and a distributed run
    # reproduce the training log.
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    # DDP's forward would broadcast buffers (a collective) while ranks hold different numbers of
    # validation batches: evaluate the plain module under DDP.
    if isinstance(getattr(model, "_orig_mod", model), nn.parallel.DistributedDataParallel):
        model = unwrap_model(model)
    model.eval()
    shadows = ema.modules if ema is not None else []
    first = next(unwrap_model(model).parameters())
    swapper = None
    if shadows and ema.device != first.device:
        swapper = WeightSwapper(model, shadows)
    nets = [model] + ([model] * len(shadows) if swapper else list(shadows))
    # Each weight set computes in its own dtype (--model-dtype, --model-ema-dtype); a swapped-in
    # shadow takes the live model's.
    dtypes = [first.dtype] + [first.dtype if swapper else next(shadow.parameters()).dtype
                              for shadow in shadows]
    sums = torch.zeros(len(nets), 4, dtype=torch.float64, device=device)
    order = list(range(len(nets)))
    desc = "validate" if epoch is None else f"val {epoch}"
    try:
        for images, targets in tqdm(loader, desc=desc, leave=False, disable=not (show and show_bars()),
                                    unit="batch", dynamic_ncols=True):
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            n = images.size(0)
            for index in order:
                if swapper is not None:
                    swapper.load(index)
                x = images
                if amp_dtype is None and images.dtype != dtypes[index]:
                    x = images.to(dtypes[index])
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    output = nets[index](x)
                top1, top5 = topk_correct(output, targets, (1, 5))
                loss = loss_fn(output.float(), targets).double().sum()
                sums[index] += torch.stack([loss, top1, top5, torch.tensor(float(n), dtype=torch.float64, device=device)])
            # Walking the sets back and forth saves one weight swap per batch.
            order.reverse()
    finally:
        if swapper is not None:
            swapper.restore()
    sums = reduce(sums)
    count = int(sums[0, 3])
    if count == 0:
        raise UserError("validation split produced no batches")
    results = []
    for loss_sum, top1, top5, _ in sums.tolist():
        results.append({"loss": loss_sum / count, "top1": 100.0 * top1 / count,
                        "top5": 100.0 * top5 / count, "count": count})
    return results


def topk_correct(output: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """How many targets are among the top-k predictions, for each k (k capped at the classes)."""
    maxk = min(max(ks), output.size(1))
    top = output.topk(maxk, dim=1).indices
    hits = top.eq(targets.unsqueeze(1))
    return [hits[:, :min(k, maxk)].any(dim=1).sum().double() for k in ks]
