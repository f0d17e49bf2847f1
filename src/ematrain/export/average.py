"""`export --average-best K`: the uniform average of a run's K best checkpoints, as timm's
avg_checkpoints.py makes it.

As timm's script: the checkpoints are the run's ``checkpoint-<epoch>.pth.tar`` files (its
--checkpoint-hist best epochs), ranked by their metric, the EMA weights by default, averaged
key by key in float64. Unlike it: they are ranked by the exported weight set's own --eval-metric
in the run's records (lower is better for loss; timm's script always keeps the highest), every
tensor goes back to the dtype it had (timm's makes all float32, integer counters too), and an
integer tensor (BatchNorm's batch counter) is the best checkpoint's, not an average.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import checkpoint as ckpt_io
from ..run.checkpoint_files import LAST, history_name
from ..util.errors import UserError
from ..util.logs import log
from .choose import Chosen, from_checkpoint, shadow_index, weight_set


def ranked_epochs(last: dict, run_dir: Path, choice: str) -> list[tuple[float, int]]:
    """The run's history checkpoints on disk as (metric, epoch), best first by the chosen
    weights' --eval-metric."""
    metric = ckpt_io.args_dict(last).get("eval_metric") or "top1"
    ws = weight_set(last, shadow_index(last, choice, run_dir / LAST))
    rows = {r.get("epoch"): r for r in (last.get("summary") or {}).get("rows") or []}
    kept = [e for _, e in (last.get("keeper") or {}).get("history") or []]
    found = []
    for epoch in kept:
        row = rows.get(epoch)
        value = row.get(f"{ws.column_prefix}eval_{metric}") if row and ws else None
        if value is not None and (run_dir / history_name(epoch)).is_file():
            found.append((float(value), int(epoch)))
    found.sort(key=lambda item: item[0], reverse=metric != "loss")
    return found


def average(states: list[dict]) -> dict:
    """The key-by-key mean of `states` (float64 sums, each tensor back in its dtype); integer
    tensors are the first state's."""
    first = states[0]
    for i, state in enumerate(states[1:], start=1):
        if state.keys() != first.keys():
            raise UserError(f"the checkpoints to average hold different tensors (the {i + 1}th "
                            f"differs from the first): not one model")
    out = {}
    for key, tensor in first.items():
        if not tensor.is_floating_point():
            out[key] = tensor.clone()
            continue
        total = torch.zeros(tensor.shape, dtype=torch.float64)
        for state in states:
            total += state[key].to(torch.float64)
        out[key] = (total / len(states)).to(tensor.dtype)
    return out


def average_best(run_dir: Path, choice: str | None, k: int) -> Chosen:
    """The average of the chosen weights of the run's `k` best history checkpoints."""
    if not run_dir.is_dir():
        raise UserError(f"--average-best takes a run folder, not a file: {run_dir}")
    if choice == "posthoc-best":
        raise UserError("--average-best averages checkpoints of the run: --weights raw, ema or "
                        "ema<decay>, not posthoc-best")
    if k < 1:
        raise UserError(f"--average-best must be at least 1, got {k}")
    path = run_dir / LAST
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder of ours: it has no {LAST}")
    last = ckpt_io.load_file(path)
    choice = choice or ("ema" if ckpt_io.ema_keys(last) else "raw")
    ranked = ranked_epochs(last, run_dir, choice)
    if len(ranked) < k:
        hist = ckpt_io.args_dict(last).get("checkpoint_hist")
        raise UserError(f"--average-best {k}: {run_dir} keeps {len(ranked)} history "
                        f"checkpoint(s) (checkpoint-<epoch>.pth.tar, --checkpoint-hist {hist})")
    picked = [from_checkpoint(ckpt_io.load_file(run_dir / history_name(e)),
                              run_dir / history_name(e), choice) for _, e in ranked[:k]]
    for (value, epoch), one in zip(ranked, picked):
        log.info(f"  epoch {epoch}: {one.weights}, logged {value:.4f}")
    best = picked[0]
    return Chosen(average([p.state for p in picked]), best.ckpt,
                  f"average of the {k} best epochs' {best.weights}", "average", decay=best.decay,
                  sigma_rel=best.sigma_rel, epoch=max(e for _, e in ranked[:k]),
                  sources=[s for p in picked for s in p.sources],
                  notes=[f"epochs {', '.join(str(e) for _, e in ranked[:k])}"])
