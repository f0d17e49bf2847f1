"""train.py: train a timm model on an ImageFolder data set, validating raw and EMA weights.

`main` resolves the settings (`settings.resolve_train`), builds the run (`build.build_run`) and
hands it to `Training`, the epoch loop: train an epoch, validate every weight set, record, save,
report. Stop requests and recovery saves are handled between optimizer updates.
"""
from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from . import distributed, ema_horizons, outputs, resume, snapshots, timm_resume
from .build import Run, build_run, posthoc_plan_line
from .cli import command_name, exit_process, launcher, run_main
from .clock import RunClock, duration
from .engine import (
    Batches,
    EpochLoop,
    LoopConfig,
    NonFinite,
    NonFiniteShadows,
    Recipe,
    current_lr,
    validate,
)
from .keeper import LAST
from .logs import log, plural
from .resume import ResumeSource
from .seeding import seed_everything
from .settings import resolve_train
from .signals import StopRequest
from .weightsets import primary_set, regular_emas


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM) and honoured after an optimizer update."""


class Training:
    """The epoch loop of one run."""

    def __init__(self, run: Run, source: ResumeSource | None = None, prog: str | None = None):
        self.run, self.source, self.prog = run, source, prog or command_name("train.py")
        s = run.settings
        recipe = Recipe(run.loss_fn, run.precision.autocast, run.scaler, s.optim.clip_grad,
                        s.optim.clip_mode)
        batches = Batches(run.device, run.precision.model_dtype, run.precision.channels_last,
                          run.mixup_fn, run.data.normalize, run.data.erase)
        config = LoopConfig(s.optim.grad_accum_steps, s.loop.log_interval, s.loop.skip_nonfinite,
                            s.loop.seed, run.dist.rank)
        self.loop = EpochLoop(run.model, run.optimizer, run.scheduler, run.ema, recipe, batches,
                              run.counters, config, any_rank=self.any_rank,
                              show=run.dist.is_primary, log=log.info,
                              power_ema=run.posthoc.ema if run.posthoc is not None else None)
        self.run_dir: Path | None = None
        self.folder: outputs.RunFolder | None = None
        self.curves = outputs.CurveRenderer()
        self.clock = self.loop.clock = RunClock(run.num_epochs, run.data.steps_per_epoch)

    @property
    def primary(self) -> bool:
        return self.run.dist.is_primary

    def any_rank(self, flag: bool) -> bool:
        return distributed.any_rank(flag, self.run.dist, self.run.device)

    # ----------------------------------------------------------------------------- the run
    def fit(self) -> int:
        if self.source is not None:
            resume.restore(self.run, self.source)
        done = False
        try:
            self.open_folder()  # a refusal here (no room for the post-hoc series) leaves no folder
            rc = self.epochs()
            self.run.keeper.wait()  # the last write; its failure is this run's
            done = rc == 0
            return rc
        finally:
            if not done:
                with contextlib.suppress(Exception):  # an error already on its way wins
                    self.run.keeper.wait()
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
        log_end(self.run, self.run_dir, self.clock.elapsed())
        return 0

    def open_folder(self) -> None:
        """The run's folder (its lock held), its args.yaml, and what a resume must repair."""
        run = self.run
        self.folder = open_run_folder(run, self.source) if self.primary else None
        path = str(self.folder.path) if self.folder is not None else None
        # Rank 0's run id (a fresh run's is drawn on every rank).
        path, run.run_id = distributed.broadcast_object((path, run.run_id), run.dist)
        self.run_dir = Path(path)
        run.keeper.run_dir = self.run_dir
        if self.source is not None and not ckpt_io.is_ours(self.source.ckpt):
            timm_resume.adopt_folder(run, self.source, self.run_dir)
        if self.source is not None:
            run.keeper.repair()
        if self.primary and run.posthoc is not None:
            warning = run.posthoc.check_disk(self.run_dir, run.counters.num_updates)
            if warning:
                log.warning(warning)
            run.posthoc.open_folder(self.run_dir, resumed=self.source is not None,
                                    step=run.counters.num_updates, on_disk=run.keeper.on_disk())
        if self.primary:
            outputs.write_args(self.run_dir, run.record())
            if run.summary.rows:
                # The checkpoint's rows are the record: a kill after the last epoch's checkpoint
                # but before its summary.csv line has no later epoch to repair the file.
                self.write_summary()

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
        ema, tracker = self.run.ema, self.run.posthoc
        bad = ema.nonfinite_shadows() if ema is not None else []
        names = [s.name for s in regular_emas(self.run.weight_sets) if s.shadow in bad]
        if tracker is not None:
            names += [f"power sr{tracker.sigma_rels[i]:g}" for i in tracker.ema.nonfinite_shadows()]
        if self.any_rank(bool(names)):
            raise NonFiniteShadows(self.run.counters.epoch, names or ["shadows"])

    def stop_mid_epoch(self, epoch: int, stop) -> int:
        """Save where the epoch stands (a resumed run continues at the next step) and stop."""
        run = self.run
        ckpt = self.checkpoint()
        if self.primary:
            run.keeper.save_mid_epoch(ckpt, LAST, then=self.settle_series())
            run.keeper.wait()
        distributed.barrier(run.dist)
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

    def finish_epoch(self, epoch: int, val_loader) -> None:
        """Validate every weight set, record the epoch, save, report."""
        run, metric = self.run, self.run.settings.loop.eval_metric
        lr, train_loss = current_lr(run.optimizer), run.counters.train_loss
        sync_replicas(run)
        self.run.take_snapshot()  # the epoch's last update (the loop yields only the others)
        run.shadow_policy.apply(run.ema, run.model, epoch, lambda images: calibration_input(
            run, images))
        scores = validate(run.model, val_loader, run.device, emas=run.validated_emas(), epoch=epoch,
                          amp_dtype=run.precision.autocast,
                          channels_last=run.precision.channels_last,
                          reduce=lambda t: distributed.all_reduce_sum(t, run.dist),
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
        ckpt = self.checkpoint(metric=value)
        if self.primary:
            rows = [dict(r) for r in run.summary.rows]
            settle = self.settle_series()
            run.keeper.save_epoch(epoch, ckpt, improved,
                                  then=lambda: (settle and settle(), self.write_summary(rows)))
            skipped = run.ema.skipped_nonfinite if run.ema is not None else 0
            took = self.clock.end_epoch()
            print(outputs.epoch_line(epoch, run.num_epochs, lr, train_loss, results,
                                     run.weight_sets, [s.name for s in improved], skipped,
                                     timing=(took, self.clock.remaining(epoch))), flush=True)
        distributed.barrier(run.dist)

    def checkpoint(self, metric: float | None = None) -> dict | None:
        """The run's checkpoint now, on the primary process (None on the others, which would
        build it for nothing). Under torchrun every process must call it: it gathers each
        one's BatchNorm statistics, which only a reduction makes agree, so that a resumed
        process continues from its own."""
        run = self.run
        ranks = (distributed.gather_to_primary(distributed.local_buffers(run.replica_modules()),
                                               run.dist) if run.dist.enabled else None)
        return ckpt_io.save(run, metric=metric, rank_buffers=ranks) if self.primary else None

    def settle_series(self):
        """For a checkpoint about to become last.pth.tar: the job that makes the post-hoc
        series its own once it is on disk (None when there is nothing to do)."""
        return self.run.posthoc.settle() if self.run.posthoc is not None else None

    def write_summary(self, rows: list[dict] | None = None) -> None:
        """summary.csv (in the background writer after an epoch's checkpoint), then curves.png
        (in the low-priority renderer)."""
        rows = self.run.summary.rows if rows is None else rows
        self.run.summary.write(self.run_dir, rows)
        self.curves.submit(self.run_dir, self.run.weight_sets, title=self.run_dir.name,
                           chance=100.0 / self.run.num_classes)

    def print_stop(self, what: str) -> None:
        if self.primary:
            last = self.run_dir / LAST
            # Quoted for the shell: a path with spaces or non-ASCII letters pastes as it is.
            print(f"{self.prog}: {what}; saved {last}. Resume with: "
                  f"{resume_launcher(self.run, self.prog)} --resume {shlex.quote(str(last))}",
                  file=sys.stderr, flush=True)


def open_run_folder(run: Run, source: ResumeSource | None) -> outputs.RunFolder:
    """The run's folder: a resumed run of ours continues in its checkpoint's folder."""
    loop = run.settings.loop
    if source is not None and ckpt_io.is_ours(source.ckpt):
        folder = outputs.RunFolder.open(source.path.parent, resuming=True)
    else:
        base = outputs.run_folder_base(loop.output, loop.experiment, run.settings.model.model,
                                       run.data.data_config["input_size"][-1])
        folder = outputs.RunFolder.open(base, resuming=source is not None or loop.resume == "auto")
    outputs.check_writable(folder.path)
    return folder


def log_start(run: Run, run_dir: Path) -> None:
    """What the run will do, and the settings that would quietly waste it."""
    s = run.settings
    dist = run.dist
    where = (f"{dist.world_size} processes ({run.device.type}, "
             f"{torch.distributed.get_backend()})" if dist.enabled else str(run.device))
    params = sum(p.numel() for p in run.module.parameters()) / 1e6
    log.info(f"training {s.model.model} ({params:.2f}M params) on {where}: "
             f"{len(run.data.train_set)} train / {len(run.data.val_set)} val images, "
             f"{run.num_classes} classes, {plural(run.num_epochs, 'epoch')}")
    log.info(f"lr {run.lr:.4g} for a global batch of {run.images_per_step()}"
             + ("" if s.optim.lr is not None else f" (--lr-base {s.optim.lr_base:g} per "
                                                  f"{s.optim.lr_base_size} images)"))
    log.info(f"output: {run_dir}")
    for warning in run.data.warnings + [s.schedule.warmup_warning(run.num_epochs)]:
        if warning:
            log.warning(warning)
    if run.ema is not None:
        for warning, line in ema_horizons.startup_lines(run.ema, run.ema_labels(),
                                                        run.length()):
            (log.warning if warning else log.info)(line)
    if run.posthoc is not None:
        log.info(posthoc_plan_line(run.posthoc, run.data.steps_per_epoch,
                                   run_dir / snapshots.FOLDER))
        if run.posthoc.plan()[0] < 2:
            log.warning(f"warning: post-hoc EMA: fewer than two snapshots at new EMA update "
                        f"counts (--model-ema-every {run.posthoc.ema.every}); validate.py "
                        f"--posthoc needs at least two")


def sync_replicas(run: Run) -> None:
    """Under torchrun: make BatchNorm statistics agree, then check the EMA shadows agree."""
    s = run.settings
    if not run.dist.enabled:
        return
    if run.ema is not None:
        run.ema.wait()
    shadows = run.ema.shadows if run.ema is not None else []
    if run.posthoc is not None:
        run.posthoc.ema.wait()
        shadows = shadows + run.posthoc.ema.shadows
    if not s.dist.sync_bn:
        for module in [run.module] + shadows:
            distributed.distribute_bn(module, run.dist, s.dist.dist_bn, run.device)
    if shadows:
        # Without any BatchNorm sync each rank's shadow keeps its own running statistics:
        # only the parameters can be compared then.
        buffers = bool(s.dist.sync_bn or s.dist.dist_bn)
        sums = distributed.check_replicas_agree(shadows, run.dist, run.device,
                                                include_buffers=buffers)
        regular = len(run.ema.shadows) if run.ema is not None else 0
        for what, part in (("EMA", sums[:regular]), ("post-hoc EMA", sums[regular:])):
            if part:
                log.info(f"{what} checksums (equal on all ranks): "
                         + ", ".join(f"{x:.10g}" for x in part))


def resume_launcher(run: Run, prog: str) -> str:
    """How this run was started: `python train.py`, or torchrun with its process counts."""
    if not run.dist.enabled:
        return launcher(prog)
    local = run.dist.local_processes
    nodes = run.dist.world_size // max(local, 1)
    return (f"torchrun {f'--nnodes {nodes} ' if nodes > 1 else ''}--nproc_per_node {local} "
            f"{prog}")


def log_end(run: Run, run_dir: Path, seconds: float) -> None:
    """The final report: each weight set's best epoch, advice for EMAs that ended behind."""
    for line in outputs.final_report(run.keeper.best, run.weight_sets,
                                     run.settings.loop.eval_metric) + ema_advice(run):
        log.info(line)
    log.info(f"done in {duration(seconds)}: {run_dir}")


def ema_advice(run: Run) -> list[str]:
    """The final report's line for each EMA that ended worse than the raw weights."""
    metric = run.settings.loop.eval_metric
    if run.ema is None or not run.summary.rows:
        return []
    last = run.summary.rows[-1]
    raw, *emas = (last[f"{s.column_prefix}eval_{metric}"]
                  for s in run.weight_sets if s.shadow is None or not s.posthoc)
    return ema_horizons.advice(run.ema, run.ema_labels(), run.length(), raw, emas, metric)


def calibration_input(run: Run, images: torch.Tensor) -> torch.Tensor:
    """A loader batch as the model's input (--model-ema-bn recalibrate): no mixing or erasing,
    as at validation."""
    prepare = Batches(run.device, run.precision.model_dtype, run.precision.channels_last,
                      normalize=run.data.normalize)
    return prepare(images, torch.zeros(images.size(0), dtype=torch.long))[0]


def _main(argv: list[str]) -> int:
    try:
        settings, source = resolve_train(argv)
        return Training(build_run(settings, resuming=source is not None), source).fit()
    finally:
        distributed.shutdown()


def main(argv=None) -> int:
    return run_main(command_name("train.py"), _main, argv)


def entry() -> None:
    """The command (`python train.py`, `ematrain-train`): main, then a quick exit."""
    exit_process(main())


if __name__ == "__main__":
    entry()
