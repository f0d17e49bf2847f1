"""A run restored from its checkpoint, once the run is built: the rules for what the checkpoint
records beyond flags (its classes, its EMAs), then every part loaded through the checkpoint schema
(`checkpoint.schema.restore`). Which checkpoint, and what becomes of each recorded setting, was
decided while the settings resolved (`settings.resume_policy`).

A run that timm's train.py saved continues too. Its checkpoint holds the EMA's weights
(`state_dict_ema`, `model_ema` in older ones) and its decay in `args`, but no EMA step count, no
LR scheduler state and none of ematrain's records. What it holds carries over; the rest is taken
as timm's train.py takes it, and said:

* The EMA continues from `state_dict_ema` at the decay timm recorded (another decay is refused,
  as for a run of ours). timm counts the EMA's steps as ``epoch * updates_per_epoch``
  (train.py's ``num_updates``), and so does the resumed run, for its optimizer updates too.
* The LR schedule is rebuilt from this run's settings and set to the resumed epoch, as timm's
  train.py does (`restore` steps it).
* Continuing in timm's own run folder (``--output``/``--experiment`` naming it, as timm's
  ``--experiment`` does), nothing there is lost: summary.csv's rows are kept, and the best
  epoch and checkpoint-<epoch> history are read from timm's files, which mean what ours mean
  when the primary weights are the same (`weight_sets`).
"""
from __future__ import annotations

import csv
from pathlib import Path

from ..checkpoint import schema
from ..checkpoint.schema import args_dict, is_ours, peek
from ..checkpoint.timm_checkpoints import continued, is_timm_ema
from ..settings.resume_policy import RULES, SCHEDULE_SETTINGS, ResumeSource, decide
from ..util.errors import UserError
from ..util.logs import log
from .weight_sets import primary_set


def restore(run, source: ResumeSource) -> None:
    """Load the run's parts from the checkpoint, as the policy decided."""
    other_decays = check_run(run, source)
    skip = {"optimizer", "scheduler"} if run.settings.loop.no_resume_opt else set()
    rebuilt = bool(source.changed & SCHEDULE_SETTINGS)
    if rebuilt:
        skip.add("scheduler")  # its saved state would bring the old settings back
    ckpt, ours = source.ckpt, is_ours(source.ckpt)
    if not ours:
        skip |= {"keeper", "summary"}
        ckpt = take_over_counters(run, ckpt, source.path)
    fresh = [(g["lr"], g.get("initial_lr")) for g in run.optimizer.param_groups]
    for name in schema.restore(run, ckpt, source.path, skip=frozenset(skip),
                               other_decays=other_decays):
        if ours or name not in ("scheduler", "keeper", "summary"):  # timm's: said above
            log.info(f"resume: {source.path} holds no {name} state; this run's starts fresh")
    run.counters.world_size = run.dist.world_size
    if ours:  # the same run, going on (a timm checkpoint starts one)
        run.run_id = source.ckpt.get("run_id")
    if rebuilt and "optimizer" not in skip:
        for group, (lr, initial) in zip(run.optimizer.param_groups, fresh):
            group["lr"] = lr
            if initial is not None:
                group["initial_lr"] = initial
    # As timm does: put the schedule where the run left it (this matters with --no-resume-opt,
    # whose fresh scheduler would otherwise start at the warmup LR).
    if run.scheduler is not None:
        run.scheduler.step(run.counters.epoch)
        if run.settings.schedule.sched_on_updates:
            run.scheduler.step_update(run.counters.num_updates)
    c = run.counters
    log.info(f"resumed from {source.path} at epoch {c.epoch}"
             + (f", step {c.epoch_step}" if c.epoch_step else ""))


def check_run(run, source: ResumeSource) -> bool:
    """The rules for what the checkpoint records beyond flags, against the built run. Returns
    whether the regular EMA's saved decays may differ from the run's (`_check_decays`)."""
    ckpt, regular, posthoc = source.ckpt, run.emas.regular, run.emas.posthoc
    names = ckpt.get("class_names")
    if names and list(names) != list(run.data.class_names):
        raise UserError(f"cannot resume from {source.path}: the class folders of "
                        f"{run.settings.data.data_dir} differ from the ones it was trained on "
                        f"({RULES['class_names'].why})")
    if (regular is not None) != ("ema" in ckpt):
        state = "holds EMA state" if "ema" in ckpt else "holds no EMA state"
        hint = ""
        if is_timm_ema(ckpt):
            decays = ckpt["ema"]["decays"]
            hint = (f"; add --model-ema --model-ema-decay {decays[0]:g} to continue timm's EMA"
                    if decays else "; add --model-ema and its --model-ema-decay to continue "
                    "timm's EMA")
        raise UserError(f"cannot resume from {source.path}: it {state} but the EMA is "
                        f"{'on' if regular is not None else 'off'} ({RULES['model_ema'].why})"
                        + hint)
    if (posthoc is not None) != ("posthoc_ema" in ckpt):
        state = "holds post-hoc EMA state" if "posthoc_ema" in ckpt else "holds none"
        raise UserError(f"cannot resume from {source.path}: it {state} but --model-ema-posthoc "
                        f"is {'on' if posthoc is not None else 'off'} "
                        f"({RULES['model_ema_posthoc'].why})")
    world = ckpt.get("counters", {}).get("world_size", run.dist.world_size)
    if world != run.dist.world_size:
        decide(RULES["world_size"], source, world, run.dist.world_size, "processes", True)
        source.changed.add("world_size")
    return _check_decays(run, source) if regular is not None else False


def _check_decays(run, source: ResumeSource) -> bool:
    """The same shadows: the same decays (False), or shadows the EMA takes at this run's decays
    (True): for half-lives the same number of shadows, whose per-step decays follow the new
    images per step, and a timm checkpoint that does not record its decay."""
    ckpt = source.ckpt
    saved = [float(d) for d in ckpt["ema"].get("decays", [])]
    if not saved and is_timm_ema(ckpt) and len(run.decays) == 1:
        log.info(f"resume: {source.path} does not record its EMA's decay; it continues at "
                 f"{run.decays[0]:g}")
        return True
    if len(saved) == len(run.decays) and all(abs(a - b) <= 1e-12
                                             for a, b in zip(saved, run.decays)):
        return False
    show = (lambda ds: ", ".join(f"{d:g}" for d in ds))  # noqa: E731
    if run.settings.ema.half_lives and len(saved) == len(run.decays):
        log.info(f"resume: EMA decays {show(run.decays)} per step (the checkpoint's run had "
                 f"{show(saved)}): the same half-lives over other images per step")
        return True
    raise UserError(f"cannot resume the EMA from {source.path}: it averages decays {show(saved)}, "
                    f"this run asks for {show(run.decays)}")


# ----------------------------------------------------------------------------- timm's runs
def take_over_counters(run, ckpt: dict, path) -> dict:
    """timm's checkpoint at the optimizer step timm's train.py counts at the start of the
    resumed epoch (epochs x updates per epoch, for the EMA's steps too), said in one line with
    what does not carry over."""
    epoch = int(ckpt["counters"]["epoch"])
    steps = epoch * run.data.steps_per_epoch
    regular = run.emas.regular
    if regular is not None and is_timm_ema(ckpt):
        shown = ", ".join(f"{d:g}" for d in run.decays)
        log.info(f"resume: the EMA (decay {shown}) continues from timm's {ckpt['ema']['keys'][0]} "
                 f"in {path}; timm keeps no EMA step count, so it is taken as timm's train.py "
                 f"counts it: {epoch} epochs x {run.data.steps_per_epoch} steps = {steps}")
    log.info(f"resume: {path} is timm's: it holds no LR scheduler state (the schedule is rebuilt "
             f"from this run's settings and set to epoch {epoch}, as timm's train.py does) and "
             f"no ematrain records (best epochs, summary rows: read from its folder when this "
             f"run continues there)")
    return continued(ckpt, steps, regular.every if regular is not None else 1)


def adopt_folder(run, source, run_dir: Path) -> None:
    """A run continuing a timm run in timm's folder keeps what is there: summary.csv's earlier
    rows, and the best epoch and checkpoint history of timm's files as the keeper's records.
    Elsewhere, one line says where it writes instead."""
    if run_dir.resolve() != source.path.parent.resolve():
        log.info(f"resume: writing to {run_dir}, not to the timm run's folder "
                 f"{source.path.parent} (--output and --experiment naming it continue there)")
        return
    args = args_dict(source.ckpt)
    timm_primary = "ema" if args.get("model_ema") and not args.get("model_ema_force_cpu") else "raw"
    ours = primary_set(run.weight_sets)
    if (ours.shadow is not None) != (timm_primary == "ema"):
        raise UserError(f"cannot continue timm's run in {run_dir}: its summary.csv and "
                        f"model_best.pth.tar describe the {timm_primary} weights, this run's "
                        f"the {'EMA' if ours.shadow is not None else 'raw'} weights; give "
                        f"--primary-weights {timm_primary}, or another --experiment")
    start = run.counters.epoch
    run.summary.rows = [r for r in _rows(run_dir / "summary.csv") if r["epoch"] < start]
    best = peek(run_dir / "model_best.pth.tar")
    if best is not None and best.get("metric") is not None:
        run.keeper.best[ours.name] = {"metric": float(best["metric"]), "epoch": best["epoch"]}
    history = [peek(p) for p in sorted(run_dir.glob("checkpoint-*.pth.tar"))]
    entries = [[float(h["metric"]), int(h["epoch"])] for h in history
               if h is not None and h.get("metric") is not None]
    entries.sort(key=lambda e: e[0], reverse=not run.keeper.lower_is_better)
    run.keeper.history = entries[: run.keeper.history_size]
    log.info(f"resume: continuing in timm's folder {run_dir}: {len(run.summary.rows)} summary "
             f"rows, best epoch {run.keeper.best.get(ours.name, {}).get('epoch')} and "
             f"{len(run.keeper.history)} history checkpoints kept")


def _rows(path: Path) -> list[dict]:
    """timm's summary.csv rows, numbers as numbers (a header line timm repeats is skipped)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("epoch") not in (None, "", "epoch")]
    out = []
    for row in rows:
        try:
            out.append({k: (int(float(v)) if k == "epoch" else float(v)) for k, v in row.items()
                        if k and v not in (None, "")})
        except ValueError:
            continue  # a line that is not a row of numbers is not kept
    return out
