"""What a training run shows in its trackers (W&B, TensorBoard), and when.

The run's `Trackers` (`Run.trackers`, built from --log-wandb / --log-tensorboard) are a stateful
part like any other: their state (the W&B run id, the last TensorBoard step) is in every
checkpoint, so a resumed run continues the same tracker runs. Values are logged at the run's
optimizer-update count, the step that never repeats or goes back, across resumes and changes of
batch size: every log interval (the loss, LR, images/s and data-wait share the progress line
reads then: no other read of the device), every epoch (each weight set's validation, the
epoch's time, each EMA's effective half-life), and at the end each set's best epoch.

Everything is logged *before* the checkpoint of its step is built, so that a checkpoint's tracker
state covers what was logged: a resumed run purges (TensorBoard) or skips (W&B) the steps after
it and logs them again, and each step shows exactly once.
"""
from __future__ import annotations

import math

from ..checkpoint.schema import args_dict
from ..ema.horizons import effective_half_lives
from ..settings.tracker_specs import tracker_spec
from ..trackers import Trackers, names
from ..util.logs import log


def build_trackers(spec, primary: bool) -> Trackers:
    """The run's trackers (only the primary process logs)."""
    return Trackers(spec, primary=primary, warn=log.warning)


def start(run, run_dir, resumed: bool) -> None:
    """Open the trackers in the run folder; the settings as hyperparameters."""
    trackers = run.trackers
    if not trackers.spec.any:
        return
    trackers.start(run_dir, run_dir.name,
                   resume_at=run.counters.num_updates if resumed else None)
    trackers.log_hparams(run.record(), names.best_tags(run.weight_sets,
                                                        run.settings.loop.eval_metric))


def interval_logger(run):
    """The loop's `on_interval`: the log interval's values at the run's step (None when no
    tracker is on, so the loop does nothing more)."""
    if not run.trackers.spec.any or not run.dist.is_primary:
        return None
    world = run.dist.world_size

    def on_interval(loss: float, lr: float, rate: float | None, wait: float | None) -> None:
        step = run.counters.num_updates
        if run.trackers.step is not None and step <= run.trackers.step:
            return  # more log intervals than updates (--grad-accum-steps): one value per step
        images = None if rate is None else rate * world  # every process trains at that rate
        run.trackers.log_interval(step, names.interval_values(loss, lr, images, wait))
    return on_interval


def log_epoch(run, epoch: int, results: dict, seconds: float | None) -> None:
    """Epoch `epoch`'s row: every weight set's validation under its own name, at the step the
    epoch ended."""
    if not run.trackers.active:
        return
    values = names.epoch_values(run.summary.rows[-1], results, run.weight_sets,
                                seconds=seconds, half_lives=half_lives_in_epochs(run))
    run.trackers.log_epoch(epoch, values, step=run.counters.num_updates)


def half_lives_in_epochs(run) -> dict[str, float]:
    """Each EMA's effective half-life now, in epochs, by weight set name (infinite while the
    start weights still hold half of it)."""
    steps, per_epoch = run.counters.num_updates, run.data.steps_per_epoch
    found = {}
    for ema, start in ((run.emas.regular, 0), (run.emas.posthoc, len(run.decays))):
        if ema is None:
            continue
        lives = effective_half_lives(ema.schedule, steps, ema.every)
        for s in run.weight_sets:
            if s.shadow is not None and start <= s.shadow < start + len(lives):
                life = lives[s.shadow - start]
                found[s.name] = life / per_epoch if math.isfinite(life) else math.inf
    return found


def finish(run) -> None:
    """The end of a complete run: each weight set's best epoch, then the trackers closed."""
    metric = run.settings.loop.eval_metric
    run.trackers.finish(names.best_values(run.keeper.best, run.weight_sets, metric))


# ----------------------------------------------------------------------------- after training
POSTHOC_TABLE = "posthoc/table"
POSTHOC_COLUMNS = ["weights", "kind", "sigma_rel", "half_life_epochs", "top1", "top5", "loss",
                   "fit_error"]


def log_posthoc(run_dir, ckpt: dict | None, rows: list, best: int, metric: str) -> None:
    """validate.py --posthoc's table (`posthoc.sweep.Row`s) and its best row, in the trackers
    of the run whose last checkpoint is `ckpt`, after its last step; nothing when it had none."""
    args = args_dict(ckpt or {})
    spec = tracker_spec({**args, "wandb_resume_id": ""}, resuming=True, check=False)
    state = (ckpt or {}).get("trackers")
    if not spec.any:
        return
    trackers = Trackers(spec, warn=log.warning)
    if isinstance(state, dict):
        trackers.load_state_dict(state)
    counters = (ckpt or {}).get("counters") or {}
    trackers.start(run_dir, run_dir.name, resume_at=int(counters.get("num_updates", 0)))
    table = [[r.label, r.kind, r.sigma_rel, r.half_life_ep, r.result["top1"], r.result["top5"],
              r.result["loss"], r.fit_error] for r in rows]
    chosen = rows[best]
    headline = {f"posthoc/best_{metric}": chosen.result[metric],
                "posthoc/best_sigma_rel": chosen.sigma_rel,
                "posthoc/best_half_life_epochs": chosen.half_life_ep}
    trackers.log_table(POSTHOC_TABLE, POSTHOC_COLUMNS, table,
                       {k: v for k, v in headline.items() if v is not None})
    trackers.close()
