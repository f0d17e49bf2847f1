"""What a run says: the start-up lines (what it will do, settings that would waste it, each EMA's
horizon, the post-hoc plan), the epoch line, and the final report with its EMA advice."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..ema import horizons
from ..posthoc.schedule import SnapshotSchedule
from ..posthoc.snapshots import FOLDER
from ..util.clock import duration
from ..util.logs import log, plural
from .weight_sets import WeightSet


# ----------------------------------------------------------------------------- console lines
def epoch_line(epoch: int, num_epochs: int, lr: float, train_loss: float,
               results: dict[str, dict], sets: tuple[WeightSet, ...],
               improved: Sequence[str] = (), skipped_ema_updates: int = 0,
               timing: tuple[float, float | None] | None = None) -> str:
    """What each epoch prints: its position, time and the run's remaining time (`timing`:
    seconds taken, seconds left), then every weight set's numbers, ``<- new best`` on each set
    whose best epoch this is (`improved`: their names; its best file, if it has one, is this
    epoch's). One line for the raw weights alone; with EMAs a header and one aligned row per set."""
    head = f"epoch {epoch} ({epoch + 1}/{num_epochs})"
    if timing is not None:
        took, left = timing
        head += f" {duration(took)}" + (f", eta {duration(left)}"
                                        if left is not None and epoch + 1 < num_epochs else "")
    head += f" | lr {lr:.3g} train_loss {train_loss:.4f}"
    if skipped_ema_updates:
        head += f" | EMA updates skipped (NaN/Inf weights): {skipped_ema_updates}"
    width = max(len(s.name) for s in sets)

    def scores(s: WeightSet) -> str:
        r = results[s.name]
        mark = "  <- new best" if s.name in improved else ""
        return f"top1 {r['top1']:6.2f}  top5 {r['top5']:6.2f}  loss {r['loss']:.4f}{mark}"

    if len(sets) == 1:
        return f"{head} | {sets[0].name}: {scores(sets[0])}"
    return "\n".join([head] + [f"  {s.name:<{width}}  {scores(s)}" for s in sets])


def final_report(best: dict[str, dict], sets: tuple[WeightSet, ...], metric: str) -> list[str]:
    """One line per weight set: its best epoch by the eval metric."""
    lines = []
    for s in sets:
        record = best.get(s.name)
        if record and record.get("epoch") is not None:
            lines.append(f"best {s.name}: {metric} {record['metric']:.4f} at epoch {record['epoch']}")
    return lines


def _counted(counts: tuple) -> str:
    train, val = counts
    return f"{train} train / {'?' if val is None else val} val images"


def log_start(run, run_dir: Path) -> None:
    """What the `Run` will do, and the settings that would quietly waste it."""
    s = run.settings
    dist = run.dist
    where = (f"{dist.world_size} processes ({run.device.type}, "
             f"{torch.distributed.get_backend()})" if dist.enabled else str(run.device))
    params = sum(p.numel() for p in run.module.parameters()) / 1e6
    log.info(f"training {s.model.model} ({params:.2f}M params) on {where}: "
             f"{_counted(run.data.counts())}, "
             f"{run.num_classes} classes, {plural(run.num_epochs, 'epoch')}")
    log.info(f"lr {run.lr:.4g} for a global batch of {s.global_batch(dist.world_size)}"
             + ("" if s.optim.lr is not None else f" (--lr-base {s.optim.lr_base:g} per "
                                                  f"{s.optim.lr_base_size} images)"))
    log.info(f"output: {run_dir}")
    for line in run.data.start_lines():
        log.info(line)
    for warning in run.data.warnings + [s.schedule.warmup_warning(run.num_epochs)]:
        if warning:
            log.warning(warning)
    if run.emas.regular is not None:
        for warning, line in horizons.startup_lines(run.emas.regular, run.ema_labels(),
                                                    run.length()):
            (log.warning if warning else log.info)(line)
    if run.snapshots is not None:
        log.info(posthoc_plan_line(run.snapshots, run.data.steps_per_epoch, run_dir / FOLDER))
        if run.snapshots.plan()[0] < 2:
            log.warning(f"warning: post-hoc EMA: fewer than two snapshots at new EMA update "
                        f"counts (--model-ema-every {run.emas.posthoc.every}); validate.py "
                        f"--posthoc needs at least two")


def log_end(run, run_dir: Path, seconds: float) -> None:
    """The final report: each weight set's best epoch, advice for EMAs that ended behind."""
    for line in final_report(run.keeper.best, run.weight_sets,
                                     run.settings.loop.eval_metric) + ema_advice(run):
        log.info(line)
    log.info(f"done in {duration(seconds)}: {run_dir}")


def ema_advice(run) -> list[str]:
    """The final report's line for each regular EMA that ended worse than the raw weights."""
    metric = run.settings.loop.eval_metric
    if run.emas.regular is None or not run.summary.rows:
        return []
    last = run.summary.rows[-1]
    raw, *emas = (last[f"{s.column_prefix}eval_{metric}"]
                  for s in run.weight_sets if s.shadow is None or not s.posthoc)
    return horizons.advice(run.emas.regular, run.ema_labels(), run.length(), raw, emas, metric)


def posthoc_plan_line(snapshots: SnapshotSchedule, steps_per_epoch: int, folder) -> str:
    """The start-up line of post-hoc EMA: what is tracked, how many snapshots, their size."""
    count, size = snapshots.plan()
    every = snapshots.every_steps
    return (f"post-hoc EMA: power EMAs sigma_rel {' '.join(f'{s:g}' for s in snapshots.sigma_rels)}"
            f", a snapshot every {every} optimizer steps ({every / steps_per_epoch:.3g} epochs) "
            f"and at the end: {count} snapshots of {size / 1e6:.3g} MB "
            f"({str(snapshots.dtype).removeprefix('torch.')}) = {count * size / 1e6:.4g} MB in "
            f"{folder}")
