"""A run's post-hoc snapshot series: the folder's snapshots in step order, checked to be one
series (`read_series`: one line, exit 2, otherwise), and the linear combinations of them that the
least-squares solution asks for (`synthesize`).

Every snapshot carries its run's id (drawn at the run's start, kept by every resume, recorded in
every checkpoint), so snapshots of two runs are never taken for one series. A resume from an
older checkpoint than the newest one on disk (`--resume RUN/checkpoint-0.pth.tar`) goes on
differently from the snapshots after it, which that newer checkpoint still needs: it writes its
own into a fork folder, `posthoc/fork-<step>-<id>/` (its checkpoints name the fork and its step),
until the first last.pth.tar it saves supersedes them; then the fork's snapshots replace the
later ones (`merge_fork`, safe to interrupt and repeat). A checkpoint's series is the main
folder's snapshots up to its fork's step and the fork's (`series_files`).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.schema import peek
from ..util.atomic import fsync_dir
from ..util.errors import UserError
from ..util.logs import log
from .profiles import Profile, Solution
from .snapshots import (
    FOLDER,
    META_KEYS,
    Snapshot,
    fork_of,
    load_shadows,
    peek_snapshot,
    snapshot_files,
)


@dataclass(frozen=True)
class Series:
    """A run's snapshots in step order and what they share (`meta`: the last one's record)."""
    folder: Path
    snapshots: tuple[Snapshot, ...]
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    dtype: str
    meta: dict

    def profiles(self) -> list[Profile]:
        """The profile of every (snapshot, tracked EMA), snapshot-major: `synthesize`'s order."""
        return [Profile("power", g, s.updates) for s in self.snapshots for g in self.gammas]

    @property
    def updates(self) -> int:
        """EMA updates at the last snapshot: the end of the series."""
        return self.snapshots[-1].updates

    def updates_per_epoch(self) -> float:
        return self.meta["steps_per_epoch"] / self.meta["every"]


def read_series(run_dir: str | Path) -> Series:
    """The snapshot series of a run folder (or of its posthoc/ folder), checked: at least two
    snapshots of one run, all of the same profiles, network and dtype, in increasing update
    counts; with the run's last.pth.tar, the series of that checkpoint (its fork's, none after
    its step), which must reach the last snapshot it took."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--posthoc {run_dir}: no such folder")
    folder = run_dir / FOLDER if (run_dir / FOLDER).is_dir() else run_dir
    last = _last_checkpoint(folder)
    files = series_files(folder, last)
    if not files:
        raise UserError(f"{run_dir} holds no post-hoc snapshots ({FOLDER}/snapshot-*.pth.tar): "
                        f"train with --model-ema-posthoc")
    if len(files) < 2:
        raise UserError(f"{folder} holds one snapshot only ({files[0][1].name}): post-hoc "
                        f"synthesis needs at least two (a shorter --model-ema-snapshot-every)")
    first, snapshots, last_data, runs = None, [], None, {}
    for step, path in files:
        data = peek_snapshot(path)
        shared = _shared(data)
        if first is None:
            first = (path, shared)
        elif shared != first[1]:
            raise UserError(f"{folder} mixes snapshots of different runs or settings, which "
                            f"differ in {_difference(shared, first[1])}: {path.name} "
                            f"({_describe(shared)}) and {first[0].name} ({_describe(first[1])})")
        runs.setdefault(data.get("run_id"), path)
        if snapshots and data["updates"] <= snapshots[-1].updates:
            raise UserError(f"{folder}: {path.name} has {data['updates']} EMA updates, no more "
                            f"than the snapshot before it: mixed runs")
        snapshots.append(Snapshot(path, step, data["updates"]))
        last_data = data
    _check_one_run(folder, runs, last)
    _check_reaches(folder, snapshots[-1], last)
    return Series(folder, tuple(snapshots), tuple(last_data["sigma_rels"]),
                  tuple(last_data["gammas"]), last_data["dtype"],
                  {k: last_data[k] for k in META_KEYS})


def _last_checkpoint(folder: Path) -> dict | None:
    """The run's last.pth.tar, peeked, when the series lies in its run folder."""
    path = folder.parent / "last.pth.tar"
    peeked = peek(path) if folder.name == FOLDER and path.is_file() else None
    if peeked is not None:
        peeked["path"] = path
    return peeked


def _check_one_run(folder: Path, runs: dict, last: dict | None) -> None:
    """Every snapshot of one run, and the run of last.pth.tar."""
    if len(runs) > 1:
        (a, pa), (b, pb) = list(runs.items())[:2]
        raise UserError(f"{folder} mixes snapshots of {len(runs)} runs: {pa.name} (run {a}) and "
                        f"{pb.name} (run {b}); keep one run's series in a folder")
    run_id = next(iter(runs))
    if last is not None and run_id and last.get("run_id") and last["run_id"] != run_id:
        raise UserError(f"{folder} holds the snapshots of run {run_id}, but {last['path']} is "
                        f"run {last['run_id']}'s: the raw weights would not be the series' run")


def _check_reaches(folder: Path, end: Snapshot, last: dict | None) -> None:
    """The series ends at the last snapshot that last.pth.tar's run took."""
    taken = ((last or {}).get("posthoc") or {}).get("last_snapshot")
    if taken is not None and end.step != int(taken[0]):
        raise UserError(f"{folder}: the series ends at step {end.step}, but {last['path']} "
                        f"(step {last['counters']['num_updates']}) took its last snapshot at "
                        f"step {int(taken[0])}: snapshots are missing, the raw weights would not "
                        f"be the series' end")


def series_files(folder: Path, last: dict | None = None) -> list[tuple[int, Path]]:
    """(step, path) of one checkpoint's series (`last`, peeked; None: every snapshot of
    `folder`): with a fork, the main folder's up to the fork's step and the fork's own, wherever
    a merge left them; none after the checkpoint's step (a killed run's, written after it)."""
    files = snapshot_files(folder)
    fork = ((last or {}).get("posthoc") or {}).get("fork")
    if fork is not None:
        name, sub = fork["folder"], folder / fork["folder"]
        files = sorted([(s, p) for s, p in files if s <= fork["step"] or fork_of(p) == name]
                       + (snapshot_files(sub) if sub.is_dir() else []))
    upto = ((last or {}).get("counters") or {}).get("num_updates")
    later = [p for s, p in files if upto is not None and s > upto]
    if later:
        log.info(f"post-hoc: {len(later)} snapshot(s) after step {upto} of {last['path']} are "
                 f"left out (a run stopped or killed after that checkpoint wrote them; "
                 f"--resume continues it)")
    return [(s, p) for s, p in files if upto is None or s <= upto]


def merge_fork(folder: Path, fork: dict) -> None:
    """The fork's checkpoint is last.pth.tar now: its snapshots replace the main folder's after
    its step. Each step of the merge may be interrupted and done again."""
    name, sub = fork["folder"], folder / fork["folder"]
    if not sub.is_dir():
        return
    for step, path in snapshot_files(folder):
        if step > fork["step"] and fork_of(path) != name:
            path.unlink(missing_ok=True)
    for _, path in snapshot_files(sub):
        os.replace(path, folder / path.name)
    fsync_dir(folder)
    shutil.rmtree(sub, ignore_errors=True)


def _shared(data: dict) -> tuple:
    """What every snapshot of one series has in common: the network (its architecture, classes
    and every tensor's shape, read from the file's index without loading it), the profiles and
    the dtype."""
    shapes = tuple(sorted((k, tuple(v.shape)) for k, v in data["shadows"][0].items()))
    return (tuple(data["sigma_rels"]), data["arch"], data["num_classes"],
            tuple(data["class_names"]), data["dtype"], data["every"], shapes)


def _describe(shared) -> str:
    sigmas, arch, num_classes, _, dtype, every, _ = shared
    return (f"{arch}, {num_classes} classes, sigma_rel {' '.join(f'{s:g}' for s in sigmas)}, "
            f"{dtype}" + (f", every {every}" if every != 1 else ""))


def _difference(a: tuple, b: tuple) -> str:
    """The first thing two snapshots' `_shared` records differ in, by name."""
    names = ("the tracked sigma_rels", "the model", "the class count", "the class folders",
             "the snapshot dtype", "--model-ema-every", "the weights' shapes")
    return next(name for name, x, y in zip(names, a, b) if x != y)


@dataclass
class Formed:
    """The reconstructions of a sweep's targets (`accumulate`), and what else the one read of
    the series gives: the tracked EMAs' weights at its last snapshot."""
    states: list[dict]
    clamped: int
    last: list[dict]


def synthesize(series: Series, solution: Solution) -> tuple[list[dict], int]:
    """The reconstructed weights of every target and the count of clamped elements
    (`accumulate`)."""
    formed = accumulate(series, solution)
    return formed.states, formed.clamped


@torch.no_grad()
def accumulate(series: Series, solution: Solution) -> Formed:
    """The reconstructed weights of every target: ``sum_i c_i snapshot_i`` in float64, every
    target in one read of the series, one snapshot in memory at a time, returned in float32
    (float64 for float64 snapshots); integer buffers from the last snapshot.

    A variance buffer (BatchNorm's ``running_var``) is clamped at zero: negative coefficients
    may take a combination of variances below it, where the layer would give NaN. Each
    snapshot's tensors are widened to float64 once, and all targets' accumulators are updated
    from each in one outer product (the targets' coefficients times its elements).
    """
    coef = torch.from_numpy(solution.coefficients)  # targets x (snapshots * tracked)
    tracked = len(series.gammas)
    sums, shadows = None, None
    for i, snapshot in enumerate(series.snapshots):
        shadows = load_shadows(snapshot)
        if sums is None:
            sums = {k: torch.zeros((coef.shape[0], v.numel()), dtype=torch.float64)
                    for k, v in shadows[0].items() if v.is_floating_point()}
        _add_snapshot(sums, shadows, coef[:, i * tracked:(i + 1) * tracked])
        if i < len(series.snapshots) - 1:
            del shadows
    return _finish(series, sums, shadows, coef.shape[0])


def _add_snapshot(sums: dict, shadows: list[dict], block: torch.Tensor) -> None:
    """Add one snapshot to every target's accumulator (`block`: targets x tracked, its
    coefficients): each tensor widened once, one outer product per tensor and shadow."""
    for j, shadow in enumerate(shadows):
        column = block[:, j].contiguous()
        for k, acc in sums.items():
            acc.addr_(column, shadow[k].reshape(-1).double())


def _finish(series: Series, sums: dict, last: list[dict], count: int) -> Formed:
    """The accumulators as state dicts in the snapshot key order (variances clamped), each
    tensor's float64 accumulator freed once converted: the peak stays near the accumulators'."""
    dtype = torch.promote_types(getattr(torch, series.dtype), torch.float32)
    template = last[0]
    states: list[dict] = [{} for _ in range(count)]
    clamped = 0
    for k in list(sums):
        acc = sums.pop(k)
        if k.endswith("running_var"):
            clamped += int((acc < 0).sum())
            acc.clamp_(min=0.0)
        for state, row in zip(states, acc):
            state[k] = row.to(dtype, copy=True).view(template[k].shape)
        del acc
    out = [{k: state[k] if k in state else template[k] for k in template} for state in states]
    return Formed(out, clamped, last)
