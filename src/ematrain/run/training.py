"""`Training`: the epoch loop of one run. Train an epoch, then its end (`epoch_end`: validate
every weight set, record, save, report); stop requests and recovery saves are handled between
optimizer updates.

The command around it (settings, then `build.build_run`, then `Training(run).fit()`) is
`cli.train`; the step and the epoch's batches are `loop`'s; the files are `keeper`'s.
"""
from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path

from ..checkpoint.schema import is_ours
from ..settings.resume_policy import ResumeSource
from ..util.clock import RunClock
from ..util.distributed import any_rank, barrier, broadcast_object
from ..util.invocation import command_name, launcher
from ..util.logs import log
from ..util.runtime import step_synchronizer
from ..util.seeding import seed_everything
from ..util.signals import StopRequest
from . import tracking
from .curves import CurveRenderer
from .epoch_end import EpochEnd
from .folder import RunFolder, open_run_folder, write_args
from .keeper import LAST
from .loop import EpochLoop, LoopConfig, NonFinite, NonFiniteShadows
from .parts import Run
from .recipe_hooks import batch_loss_scale, save_batch_image, start_at_epoch
from .report import log_end, log_start
from .restore import adopt_folder, restore
from .step import Batches, Recipe


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM) and honoured after an optimizer update."""


class Training:
    """The epoch loop of one run."""

    def __init__(self, run: Run, source: ResumeSource | None = None, prog: str | None = None):
        self.run, self.source, self.prog = run, source, prog or command_name("train.py")
        s = run.settings
        recipe = Recipe(run.loss_fn, run.precision.autocast, run.scaler, s.optim.clip_grad,
                        s.optim.clip_mode, objective=run.distill,
                        synchronize=step_synchronizer(run.device, s.dist.synchronize_step),
                        loss_scale=batch_loss_scale(run), averaged=run.module)
        batches = Batches(run.device, run.precision.model_dtype, run.precision.channels_last,
                          run.mixup_fn, run.data.normalize, run.data.erase)
        config = LoopConfig(s.optim.grad_accum_steps, s.loop.log_interval, s.loop.skip_nonfinite,
                            s.loop.seed, run.dist.rank)
        self.loop = EpochLoop(run.model, run.optimizer, run.scheduler, run.emas, recipe, batches,
                              run.counters, config, any_rank=self.any_rank,
                              show=run.dist.is_primary, log=log.info)
        self.folder: RunFolder | None = None
        self.curves = CurveRenderer()
        self.clock = self.loop.clock = RunClock(run.num_epochs, run.data.steps_per_epoch)
        self.end = EpochEnd(run, self.clock, self.curves)
        self.loop.on_interval = tracking.interval_logger(run)
        if s.loop.save_images and run.dist.is_primary:
            self.loop.save_images = lambda batch, images: save_batch_image(self.run_dir, batch,
                                                                           images)

    @property
    def primary(self) -> bool:
        return self.run.dist.is_primary

    @property
    def run_dir(self) -> Path | None:
        return self.end.run_dir

    @run_dir.setter
    def run_dir(self, folder: Path) -> None:
        self.end.run_dir = folder

    def finish_epoch(self, epoch: int, val_loader) -> None:
        self.end.finish(epoch, val_loader)

    def checkpoint(self, metric: float | None = None) -> dict | None:
        return self.end.checkpoint(metric)

    def any_rank(self, flag: bool) -> bool:
        return any_rank(flag, self.run.dist, self.run.device)

    # ----------------------------------------------------------------------------- the run
    def fit(self) -> int:
        start = self.run.settings.loop.start_epoch
        if self.source is not None:
            restore(self.run, self.source)
        if start is not None and (self.source is None or not is_ours(self.source.ckpt)):
            # timm: a given start epoch places a new run, and overrides a timm checkpoint's
            # epoch (our own checkpoints go on where they are: the resume policy).
            start_at_epoch(self.run, start)
        done = False
        try:
            self.open_folder()  # a refusal here (no room for the post-hoc series) leaves no folder
            tracking.start(self.run, self.run_dir, resumed=self.source is not None)
            rc = self.epochs()
            self.run.keeper.wait()  # the last write; its failure is this run's
            done = rc == 0
            return rc
        finally:
            if not done:
                with contextlib.suppress(Exception):  # an error already on its way wins
                    self.run.keeper.wait()
            self.run.trackers.close(0 if done else 1)  # a finished run's are closed already
            self.run.data.close()
            self.curves.close()
            if self.folder is not None:
                if not done:
                    self.folder.discard_if_unused()
                self.folder.close()

    def epochs(self) -> int:
        log_start(self.run, self.run_dir)
        with StopRequest(self.prog, quiet=not self.primary,
                         files=self.run.keeper.on_disk_now) as stop:
            for epoch in range(self.run.counters.epoch, self.run.num_epochs):
                rc = self.run_epoch(epoch, stop)
                if rc is not None:
                    return rc
                if stop():
                    self.run.keeper.wait()
                    self.print_stop(f"stopped after epoch {epoch}")
                    return stop.exit_code
        tracking.finish(self.run)
        log_end(self.run, self.run_dir, self.clock.elapsed())
        return 0

    def open_folder(self) -> None:
        """The run's folder (its lock held), its args.yaml, and what a resume must repair."""
        run = self.run
        self.folder = open_run_folder(run, self.source) if self.primary else None
        path = str(self.folder.path) if self.folder is not None else None
        # Rank 0's run id (a fresh run's is drawn on every rank).
        path, run.run_id = broadcast_object((path, run.run_id), run.dist)
        self.run_dir = Path(path)
        run.keeper.run_dir = self.run_dir
        if self.source is not None and not is_ours(self.source.ckpt):
            adopt_folder(run, self.source, self.run_dir)
        if self.source is not None:
            run.keeper.repair()
        if self.primary and run.snapshots is not None:
            warning = run.snapshots.check_disk(self.run_dir, run.counters.num_updates)
            if warning:
                log.warning(warning)
            run.snapshots.open_folder(self.run_dir, resumed=self.source is not None,
                                      step=run.counters.num_updates, on_disk=run.keeper.on_disk())
        if self.primary:
            write_args(self.run_dir, run.record())
            if run.summary.rows:
                # The checkpoint's rows are the record: a kill after the last epoch's checkpoint
                # but before its summary.csv line has no later epoch to repair the file.
                self.end.write_summary()

    # ----------------------------------------------------------------------------- one epoch
    def run_epoch(self, epoch: int, stop) -> int | None:
        """Train and validate one epoch; returns an exit code when the run must end."""
        run, s = self.run, self.run.settings
        run.counters.epoch = epoch
        self.clock.start_epoch()
        # Seeding per epoch from (seed, epoch) makes the epoch independent of what ran before.
        seed_everything(s.loop.seed + epoch)
        train_loader, val_loader = run.data.loaders(epoch, run.counters.epoch_step, s.loop.seed)
        if run.mixup_fn is not None and s.labels.mixup_off_epoch and epoch >= s.labels.mixup_off_epoch:
            run.mixup_fn.mixup_enabled = False
        try:
            self.train(train_loader, stop)
            if self.any_rank(stop()):  # a stop request never starts a validation pass
                self.check_weights()
                return self.stop_mid_epoch(epoch, stop)
            self.check_weights()
            self.finish_epoch(epoch, val_loader)
        except Interrupted:
            return self.stop_mid_epoch(epoch, stop)
        except NonFinite as exc:
            run.keeper.wait()
            if self.primary:
                last = self.run_dir / LAST
                kept = (f"the last good checkpoint is {last}" if last.is_file()
                        else "no checkpoint was saved before it")
                print(f"{self.prog}: error: {exc}; stopped: {kept} ({exc.hint})", file=sys.stderr)
            return 1
        return None

    def check_weights(self) -> None:
        """Before weights leave memory (validation, a save): no loss so far was NaN/Inf (one
        read of a device flag), and no EMA shadow holds NaN/Inf (one read of the shadows)."""
        self.loop.check()
        bad = self.run.emas.nonfinite()
        names = [s.name for s in self.run.weight_sets if s.shadow in bad]
        if self.any_rank(bool(names)):
            raise NonFiniteShadows(self.run.counters.epoch, names or ["shadows"])

    def stop_mid_epoch(self, epoch: int, stop) -> int:
        """Save where the epoch stands (a resumed run continues at the next step) and stop."""
        run = self.run
        ckpt = self.checkpoint()
        if self.primary:
            run.keeper.save_mid_epoch(ckpt, LAST, then=self.end.settle_series())
            run.keeper.wait()
        barrier(run.dist)
        self.print_stop(f"stopped at epoch {epoch}, step {run.counters.epoch_step}")
        return stop.exit_code

    def train(self, loader, stop) -> None:
        """The epoch's training steps; recovery saves and stop requests between updates."""
        run, s = self.run, self.run.settings
        c, interval = run.counters, s.loop.recovery_interval
        # Under DDP a stop request is agreed across ranks (a collective), so it is polled only
        # every log interval; a single process polls its flag after every update for free.
        stop_every = s.loop.log_interval if run.dist.enabled else 1
        with contextlib.closing(self.loop.run(loader)) as updates:
            for _ in updates:
                self.run.take_snapshot()  # before a checkpoint of this step, in the same writer
                recover = interval and c.num_updates % interval == 0
                halt = c.epoch_step % stop_every == 0 and self.any_rank(stop())
                if recover or halt:
                    self.check_weights()  # never save weights a bad step has already spoiled
                    if recover:
                        ckpt = self.checkpoint()
                        if self.primary:
                            run.keeper.save_mid_epoch(ckpt)
                    if halt:
                        raise Interrupted

    def print_stop(self, what: str) -> None:
        if self.primary:
            last = self.run_dir / LAST
            # Quoted for the shell: a path with spaces or non-ASCII letters pastes as it is.
            print(f"{self.prog}: {what}; saved {last}. Resume with: "
                  f"{resume_launcher(self.run, self.prog)} --resume {shlex.quote(str(last))}",
                  file=sys.stderr, flush=True)


def resume_launcher(run: Run, prog: str) -> str:
    """How this run was started: `python train.py`, or torchrun with its process counts."""
    if not run.dist.enabled:
        return launcher(prog)
    local = run.dist.local_processes
    nodes = run.dist.world_size // max(local, 1)
    return (f"torchrun {f'--nnodes {nodes} ' if nodes > 1 else ''}--nproc_per_node {local} "
            f"{prog}")
