"""The end of an epoch: every weight set validated (or not, under --val-interval), the epoch
recorded, checkpointed, saved and reported; and the checkpoint any save of the run takes.

`Training` (the epoch loop) calls it after the epoch's last update; the files are `keeper`'s.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.schema import save
from ..util.clock import RunClock
from ..util.distributed import (
    all_reduce_sum,
    barrier,
    check_replicas_agree,
    distribute_bn,
    gather_to_primary,
    local_buffers,
)
from ..util.logs import log
from . import tracking
from .curves import CurveRenderer
from .evaluation import validate
from .loop import current_lr
from .parts import Run
from .recipe_hooks import skipped_line, validates
from .report import epoch_line
from .step import Batches
from .weight_sets import primary_set


class EpochEnd:
    """Validate, record, checkpoint, save and report one epoch of `run`; its clock says the
    epoch's time, `curves` draws curves.png after each summary.csv. `run_dir`: the run's
    folder, set once it is open."""

    def __init__(self, run: Run, clock: RunClock, curves: CurveRenderer):
        self.run, self.clock, self.curves = run, clock, curves
        self.run_dir: Path | None = None

    @property
    def primary(self) -> bool:
        return self.run.dist.is_primary

    def skip(self, epoch: int) -> None:
        """An epoch --val-interval does not validate: as timm, the scheduler steps without a
        metric and summary.csv gets no row; last.pth.tar is still written (resume stays exact)."""
        run = self.run
        lr, train_loss = end_of_epoch(run, epoch)
        if run.scheduler is not None:
            run.scheduler.step(epoch + 1, None)
        run.counters.finish_epoch()
        ckpt = self.checkpoint()
        if self.primary:
            run.keeper.save_epoch(epoch, ckpt, [], then=self.settle_series())
            print(skipped_line(run, epoch, lr, train_loss, self.clock.end_epoch()), flush=True)
        barrier(run.dist)

    def finish(self, epoch: int, val_loader) -> None:
        """Validate every weight set, record the epoch, save, report."""
        if not validates(self.run, epoch):
            return self.skip(epoch)
        run, metric = self.run, self.run.settings.loop.eval_metric
        lr, train_loss = end_of_epoch(run, epoch)
        scores = validate(run.eval_model, val_loader, run.device, emas=list(run.emas), epoch=epoch,
                          amp_dtype=run.precision.autocast,
                          channels_last=run.precision.channels_last,
                          reduce=lambda t: all_reduce_sum(t, run.dist),
                          show=self.primary, normalize=run.data.normalize)
        results = {s.name: r for s, r in zip(run.weight_sets, scores)}
        # As timm's train.py: the primary set's metric (the EMA's, with one on) is the one the
        # plateau scheduler and the checkpoint's `metric` see.
        value = results[primary_set(run.weight_sets).name][metric]
        if run.scheduler is not None:
            run.scheduler.step(epoch + 1, value)
        run.summary.add(epoch, lr, train_loss, results)
        improved = run.keeper.record(epoch, results)
        run.counters.finish_epoch()
        took = self.clock.end_epoch() if self.primary else None
        tracking.log_epoch(run, epoch, results, took)  # before the checkpoint that covers it
        ckpt = self.checkpoint(metric=value)
        if self.primary:
            rows = [dict(r) for r in run.summary.rows]
            settle = self.settle_series()
            run.keeper.save_epoch(epoch, ckpt, improved,
                                  then=lambda: (settle and settle(), self.write_summary(rows)))
            skipped = run.emas.regular.skipped_nonfinite if run.emas.regular is not None else 0
            print(epoch_line(epoch, run.num_epochs, lr, train_loss, results,
                                     run.weight_sets, [s.name for s in improved], skipped,
                                     timing=(took, self.clock.remaining(epoch))), flush=True)
        barrier(run.dist)

    def checkpoint(self, metric: float | None = None) -> dict | None:
        """The run's checkpoint now, on the primary process (None on the others, which would
        build it for nothing). Under torchrun every process must call it: it gathers each
        one's BatchNorm statistics, which only a reduction makes agree, so that a resumed
        process continues from its own."""
        run = self.run
        ranks = (gather_to_primary(local_buffers(run.replica_modules()),
                                               run.dist) if run.dist.enabled else None)
        return save(run, metric=metric, rank_buffers=ranks) if self.primary else None

    def settle_series(self):
        """For a checkpoint about to become last.pth.tar: the job that makes the post-hoc
        series its own once it is on disk (None when there is nothing to do)."""
        return self.run.snapshots.settle() if self.run.snapshots is not None else None

    def write_summary(self, rows: list[dict] | None = None) -> None:
        """summary.csv (in the background writer after an epoch's checkpoint), then curves.png
        (in the low-priority renderer)."""
        rows = self.run.summary.rows if rows is None else rows
        self.run.summary.write(self.run_dir, rows)
        self.curves.submit(self.run_dir, self.run.weight_sets, title=self.run_dir.name,
                           chance=100.0 / self.run.num_classes)


def sync_replicas(run: Run) -> None:
    """Under torchrun: make BatchNorm statistics agree, then check the EMA shadows agree."""
    s = run.settings
    if not run.dist.enabled:
        return
    run.emas.wait()
    shadows = run.emas.shadows
    if not s.dist.sync_bn:
        for module in [run.module] + shadows:
            distribute_bn(module, run.dist, s.dist.dist_bn, run.device)
    if shadows:
        # Without any BatchNorm sync each rank's shadow keeps its own running statistics:
        # only the parameters can be compared then.
        buffers = bool(s.dist.sync_bn or s.dist.dist_bn)
        sums = check_replicas_agree(shadows, run.dist, run.device, include_buffers=buffers)
        for role, span in run.emas.spans().items():
            what = "EMA" if role == "regular" else "post-hoc EMA"
            log.info(f"{what} checksums (equal on all ranks): "
                     + ", ".join(f"{sums[i]:.10g}" for i in span))


def calibration_input(run: Run, images: torch.Tensor) -> torch.Tensor:
    """A loader batch as the model's input (--model-ema-bn recalibrate): no mixing or erasing,
    as at validation."""
    prepare = Batches(run.device, run.precision.model_dtype, run.precision.channels_last,
                      normalize=run.data.normalize)
    return prepare(images, torch.zeros(images.size(0), dtype=torch.long))[0]


def end_of_epoch(run: Run, epoch: int) -> tuple[float, float]:
    """What every epoch's end does before validation: BatchNorm statistics agreed, the last
    update's snapshot, the shadows' policy. The epoch's LR and training loss."""
    lr, train_loss = current_lr(run.optimizer), run.counters.train_loss
    sync_replicas(run)
    run.take_snapshot()  # the epoch's last update (the loop yields only the others)
    run.shadow_policy.apply(run.emas.regular, run.eval_model, epoch,
                            lambda images: calibration_input(run, images))
    return lr, train_loss
