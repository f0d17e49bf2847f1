"""timm's newer recipe flags where the epoch loop meets them: --val-interval (which epochs
validate, and the line of one that does not), --start-epoch (a new run placed at an epoch),
--save-images (the step's input as timm writes it) and --variable-batch-loss-scale."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.sized_batches import loss_scale
from ..util.clock import duration
from ..util.logs import log
from .loop import current_lr
from .naflex_parts import naflex_loss_scale
from .parts import Run


def validates(run: Run, epoch: int) -> bool:
    """--val-interval K: timm validates after every K-th epoch and after the last."""
    interval = run.settings.loop.val_interval
    return (epoch + 1) % interval == 0 or epoch + 1 == run.num_epochs


def skipped_line(run: Run, epoch: int, lr: float, train_loss: float, took: float) -> str:
    return (f"epoch {epoch} ({epoch + 1}/{run.num_epochs}) {duration(took)}: lr {lr:.3g} "
            f"train_loss {train_loss:.4f}; not validated (--val-interval "
            f"{run.settings.loop.val_interval})")


def save_batch_image(run_dir: Path | None, batch: int, images: torch.Tensor) -> None:
    """--save-images: the step's input as timm writes it, train-batch-<i>.jpg in the run
    folder (a grid, each image's range stretched to the full scale)."""
    if run_dir is None:
        return
    from torchvision.utils import save_image
    save_image(images.detach().float().cpu(), run_dir / f"train-batch-{batch}.jpg", padding=0,
               normalize=True)


def batch_loss_scale(run: Run):
    """--variable-batch-loss-scale sqrt|linear: each batch's loss times (its size / timm's
    policy-average batch), to the power 1/2 or 1; None when off (--naflex-loss-scale:
    `naflex_parts.naflex_loss_scale`)."""
    if run.settings.naflex.enabled:  # --naflex-loss-scale
        return naflex_loss_scale(run.settings, run.dist, run.device)
    mode = run.settings.sizes.variable_batch_loss_scale
    sampler = getattr(run.data, "batch_sampler", None)  # a stream has none
    if sampler is None or mode == "none":
        return None
    reference = sampler.average_batch_size
    return lambda size: loss_scale(size, reference, mode)


def start_at_epoch(run: Run, epoch: int) -> None:
    """--start-epoch N on a new run, as timm: the loop starts at epoch N with the LR schedule at
    its position (per epoch, or per update with --sched-on-updates); the EMAs start from the
    start weights, as at any start."""
    c = run.counters
    c.epoch, c.epoch_step, c.num_updates = epoch, 0, epoch * run.data.steps_per_epoch
    if run.scheduler is not None:
        if run.settings.schedule.sched_on_updates:
            run.scheduler.step_update(num_updates=c.num_updates)
        else:
            run.scheduler.step(epoch)
    log.info(f"--start-epoch {epoch}: starting at epoch {epoch} (update {c.num_updates}), "
             f"LR {current_lr(run.optimizer):.3g}")
