"""Continuing a run that timm's train.py saved: its EMA, its counters, and its run folder.

A timm checkpoint holds the EMA's weights (`state_dict_ema`, `model_ema` in older ones) and its
decay in `args`, but no EMA step count, no LR scheduler state and none of ematrain's records.
What it holds carries over; the rest is taken as timm's train.py takes it, and said:

* The EMA continues from `state_dict_ema` at the decay timm recorded (another decay is refused,
  as for a run of ours). timm counts the EMA's steps as ``epoch * updates_per_epoch``
  (train.py's ``num_updates``), and so does the resumed run, for its optimizer updates too.
* The LR schedule is rebuilt from this run's settings and set to the resumed epoch, as timm's
  train.py does (`resume.restore` steps it).
* Continuing in timm's own run folder (``--output``/``--experiment`` naming it, as timm's
  ``--experiment`` does), nothing there is lost: summary.csv's rows are kept, and the best
  epoch and checkpoint-<epoch> history are read from timm's files, which mean what ours mean
  when the primary weights are the same (`weightsets`).
"""
from __future__ import annotations

import csv
from pathlib import Path

from . import checkpoint as ckpt_io
from .errors import UserError
from .logs import log
from .weightsets import primary_set

_EMA_KEYS = ("state_dict_ema", "model_ema")  # the second: timm's checkpoints before 0.4


def ema_key(ckpt: dict) -> str | None:
    """Where a checkpoint that is not ours keeps timm's EMA weights, if it has them."""
    if ckpt_io.is_ours(ckpt):
        return None
    return next((k for k in _EMA_KEYS if ckpt_io.is_state_dict(ckpt.get(k))), None)


def upgrade(ckpt: dict) -> dict:
    """A timm checkpoint with an EMA, its EMA described as ours describes it (``ema``: the decay
    timm recorded, where the weights are), so the resume rules treat both alike."""
    key = ema_key(ckpt)
    if key is None or "ema" in ckpt:
        return ckpt
    args = ckpt_io.args_dict(ckpt)
    decay = args.get("model_ema_decay")
    meta = {"keys": [key], "timm": True,
            "decays": [float(decay)] if isinstance(decay, (int, float)) else [],
            "schedule": {"name": "timm" if args.get("model_ema_warmup") else "constant"}}
    return dict(ckpt, ema=meta, **{key: ckpt_io.strip_prefixes(ckpt[key])})


def is_timm_ema(ckpt: dict) -> bool:
    return bool((ckpt.get("ema") or {}).get("timm"))


def take_over_counters(run, ckpt: dict, path) -> None:
    """The EMA's step count and the optimizer updates as timm's train.py has them at the start
    of the resumed epoch, said in one line with what does not carry over."""
    epoch = int(ckpt["counters"]["epoch"])
    steps = epoch * run.data.steps_per_epoch
    ckpt["counters"]["num_updates"] = steps
    if run.ema is not None and is_timm_ema(ckpt):
        meta = ckpt["ema"]
        meta.update(decays=list(run.decays), steps=steps, num_updates=steps // run.ema.every,
                    skipped_nonfinite=0)
        shown = ", ".join(f"{d:g}" for d in run.decays)
        log.info(f"resume: the EMA (decay {shown}) continues from timm's {meta['keys'][0]} in "
                 f"{path}; timm keeps no EMA step count, so it is taken as timm's train.py "
                 f"counts it: {epoch} epochs x {run.data.steps_per_epoch} steps = {steps}")
    log.info(f"resume: {path} is timm's: it holds no LR scheduler state (the schedule is rebuilt "
             f"from this run's settings and set to epoch {epoch}, as timm's train.py does) and "
             f"no ematrain records (best epochs, summary rows: read from its folder when this "
             f"run continues there)")


def adopt_folder(run, source, run_dir: Path) -> None:
    """A run continuing a timm run in timm's folder keeps what is there: summary.csv's earlier
    rows, and the best epoch and checkpoint history of timm's files as the keeper's records.
    Elsewhere, one line says where it writes instead."""
    if run_dir.resolve() != source.path.parent.resolve():
        log.info(f"resume: writing to {run_dir}, not to the timm run's folder "
                 f"{source.path.parent} (--output and --experiment naming it continue there)")
        return
    args = ckpt_io.args_dict(source.ckpt)
    timm_primary = "ema" if args.get("model_ema") and not args.get("model_ema_force_cpu") else "raw"
    ours = primary_set(run.weight_sets)
    if (ours.shadow is not None) != (timm_primary == "ema"):
        raise UserError(f"cannot continue timm's run in {run_dir}: its summary.csv and "
                        f"model_best.pth.tar describe the {timm_primary} weights, this run's "
                        f"the {'EMA' if ours.shadow is not None else 'raw'} weights; give "
                        f"--primary-weights {timm_primary}, or another --experiment")
    start = run.counters.epoch
    run.summary.rows = [r for r in _rows(run_dir / "summary.csv") if r["epoch"] < start]
    best = ckpt_io.peek(run_dir / "model_best.pth.tar")
    if best is not None and best.get("metric") is not None:
        run.keeper.best[ours.name] = {"metric": float(best["metric"]), "epoch": best["epoch"]}
    history = [ckpt_io.peek(p) for p in sorted(run_dir.glob("checkpoint-*.pth.tar"))]
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
