"""The training side of post-hoc EMA: when a run snapshots its power-function EMAs, and where.

`SnapshotSchedule` takes a snapshot of every tracked power EMA at the series' steps and hands it
to the run's checkpoint writer; on a resume it sets the series up to continue consistently with
the checkpoints on disk (`snapshots`: the file format; `series`: the fork folders and their
merge). The power EMAs themselves are members of the run's EMA collection, averaged, checked,
validated and saved with the others.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import torch

from ..checkpoint.schema import peek
from ..util.atomic import remove_stale_temporaries
from ..util.errors import UserError
from ..util.logs import log
from .series import merge_fork
from .snapshots import (
    FOLDER,
    FORK_PREFIX,
    shadow_bytes,
    snapshot_entry,
    snapshot_files,
    snapshot_name,
)

# A series that takes more than this share of the free space where it goes is warned about.
DISK_SHARE = 0.25


class SnapshotSchedule:
    """The snapshots of a run's post-hoc power EMAs (`ema`: a `ModelEma` under the power
    schedule, `ema.schedules.Power`, which the run's EMA collection updates and saves) every
    `every_steps` optimizer steps and at the run's last step, each at a new EMA update count
    (with --model-ema-every N a step may have none since the last snapshot, and is skipped).

    A snapshot is copied to host memory in its dtype at its step (the only part on the training
    path) and written by the run's checkpoint writer (`run.keeper.Writer`), in order with the
    checkpoints: when a checkpoint is on disk, so is every snapshot of the steps before it. A
    resumed run removes the snapshots later than its checkpoint that no other checkpoint on
    disk needs and writes them again, so the series is the one an uninterrupted run writes;
    those that a newer checkpoint needs stay until a last.pth.tar of this run supersedes it
    (its snapshots go to a fork folder meanwhile). Part of the checkpoint (`state_dict`).
    """

    def __init__(self, ema, every_steps: int, total_steps: int, dtype: torch.dtype):
        self.ema, self.every_steps, self.total_steps, self.dtype = ema, every_steps, total_steps, dtype
        # The last snapshot: its step, and the step of the EMAs' last average before it.
        self.last_snapshot: tuple[int, int] | None = None
        self.fork: dict | None = None  # {"step", "folder"} while the series goes on in a fork
        self.folder: Path | None = None

    def open_folder(self, run_dir: Path, resumed: bool, step: int,
                    on_disk: dict[str, dict]) -> None:
        """<run>/posthoc/, with the temporary file of a write a kill interrupted removed. A
        fresh start removes snapshots left by a run that saved no checkpoint here; a resume (at
        optimizer step `step`; `on_disk`: the run's checkpoints, peeked) finishes the merge of
        a fork whose last.pth.tar is on disk, removes forks no checkpoint names, and sets the
        series up to continue from its checkpoint."""
        self.folder = folder = run_dir / FOLDER
        folder.mkdir(exist_ok=True)
        remove_stale_temporaries(folder)
        last = (on_disk.get("last.pth.tar") or {}).get("posthoc") or {}
        if last.get("fork") is not None:
            merge_fork(folder, last["fork"])
        if not resumed:
            self._clear(folder)
            return
        if self.fork is not None and not (folder / self.fork["folder"]).is_dir():
            self.fork = None  # merged: its last.pth.tar superseded the main series
        named = {c["posthoc"]["fork"]["folder"] for c in on_disk.values()
                 if (c.get("posthoc") or {}).get("fork")}
        for sub in folder.glob(FORK_PREFIX + "*"):
            if sub.name not in named | ({self.fork["folder"]} if self.fork else set()):
                shutil.rmtree(sub, ignore_errors=True)
        later = [p for s, p in snapshot_files(self._series_folder()) if s > step]
        if not later:
            return
        if self.fork is None and any(_main_series(c, folder)
                                     and c["counters"].get("num_updates", 0) > step
                                     for c in on_disk.values() if c.get("counters")):
            self.fork = {"step": int(step), "folder": f"{FORK_PREFIX}{step}-{uuid.uuid4().hex[:8]}"}
            (folder / self.fork["folder"]).mkdir()
            log.info(f"resume: the {len(later)} post-hoc snapshot(s) after step {step} stay for "
                     f"the newer checkpoints until this run saves its own last.pth.tar; its "
                     f"snapshots go to {folder / self.fork['folder']} until then")
            return
        for path in later:
            path.unlink(missing_ok=True)
        log.info(f"resume: removed {len(later)} post-hoc snapshot(s) later than the "
                 f"checkpoint's step {step}; they are written again")

    def _clear(self, folder: Path) -> None:
        """A fresh start: snapshots here are a failed run's that left no checkpoint."""
        stale = [p for _, p in snapshot_files(folder)]
        forks = [p for p in folder.glob(FORK_PREFIX + "*") if p.is_dir()]
        for path in stale:
            path.unlink(missing_ok=True)
        for sub in forks:
            shutil.rmtree(sub, ignore_errors=True)
        if stale or forks:
            log.info(f"removed {len(stale)} post-hoc snapshot(s) in {folder} of a run that saved "
                     f"no checkpoint there: this run starts its own series")

    def _series_folder(self) -> Path:
        """Where this run writes its snapshots: the fork folder while there is one."""
        return self.folder / self.fork["folder"] if self.fork is not None else self.folder

    def settle(self):
        """The checkpoint being saved now goes to last.pth.tar: the job that, once it is on
        disk, makes the fork's snapshots the series and removes the forks of abandoned
        continuations (only a recovery file may still name one). Snapshots taken from now on go
        to the main folder, and are written after it."""
        fork, self.fork = self.fork, None
        folder = self.folder

        def job():
            if fork is not None:
                merge_fork(folder, fork)
            recovery = folder.parent / "recovery.pth.tar"
            named = ((peek(recovery) or {}).get("posthoc") or {}).get("fork") \
                if recovery.is_file() else None
            for sub in folder.glob(FORK_PREFIX + "*"):
                if sub.is_dir() and sub.name != (named or {}).get("folder"):
                    shutil.rmtree(sub, ignore_errors=True)
        return job

    def take(self, step: int, meta, keeper) -> None:
        """The snapshot of optimizer step `step` when it is one of the series' (once per step,
        and only at a new EMA update count), handed to `keeper`'s writer; `meta()` gives the
        run's record (`META_KEYS` and the run id)."""
        if not self.due(step) or (self.last_snapshot and step == self.last_snapshot[0]):
            return
        averaged = self.ema.steps - self.ema.steps % self.ema.every  # the last average's step
        if averaged < 1 or (self.last_snapshot and averaged <= self.last_snapshot[1]):
            return  # no EMA update since the last snapshot (--model-ema-every)
        self.last_snapshot = (step, averaged)
        if keeper.primary:
            where = f"{FOLDER}/{self.fork['folder']}" if self.fork is not None else FOLDER
            keeper.save_file(f"{where}/{snapshot_name(step)}", self.entry(step, meta()))

    @property
    def sigma_rels(self) -> list[float]:
        return list(self.ema.decays)

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (updates so far) is a snapshot step."""
        return step > 0 and (step % self.every_steps == 0 or step == self.total_steps)

    def entry(self, step: int, meta: dict) -> dict:
        """The snapshot of now as its file will hold it (host memory)."""
        shadows = [self.ema.shadow_state_dict(i) for i in range(len(self.ema.shadows))]
        # The schedule's update count (a skipped non-finite update still counts in it).
        updates = self.ema.steps // self.ema.every
        return snapshot_entry(shadows, self.ema.decays, self.ema.schedule.gammas, step, updates,
                              self.dtype, meta,
                              fork=self.fork["folder"] if self.fork is not None else None)

    def plan(self) -> tuple[int, int]:
        """Snapshots the run writes (one per EMA update count reached at a snapshot step) and
        bytes per snapshot."""
        per = sum(shadow_bytes(m.state_dict(), self.dtype) for m in self.ema.shadows)
        every = self.ema.every
        averaged = {s - s % every for s in snapshot_steps(self.every_steps, self.total_steps)}
        return len(averaged - {0}), per

    def check_disk(self, folder: Path, step: int) -> str | None:
        """The snapshots still to write (after optimizer step `step`) against the free space
        where they go: a UserError when they cannot fit, a warning line when they take more
        than `DISK_SHARE` of it, else None."""
        every, per = self.ema.every, self.plan()[1]
        steps = {s - s % every for s in snapshot_steps(self.every_steps, self.total_steps)}
        count = len([s for s in steps if s > step])
        need = count * per
        free = shutil.disk_usage(folder).free
        what = (f"post-hoc EMA: {count} snapshots of {per / 1e6:.3g} MB = "
                f"{need / 1e9:.3g} GB to write in {folder / FOLDER}")
        fewer = ("a longer --model-ema-snapshot-every, --model-ema-snapshot-dtype float16 "
                 "(half the size) or fewer --model-ema-posthoc profiles")
        if need > free:
            raise UserError(f"{what}, but only {free / 1e9:.3g} GB are free there: free space, "
                            f"or give {fewer}")
        if need > DISK_SHARE * free:
            return (f"warning: {what}: {need / free:.0%} of the {free / 1e9:.3g} GB free there "
                    f"(the checkpoints need room too); {fewer} would take less")
        return None

    def state_dict(self) -> dict:
        """Where the series stands and its settings (the power EMAs' own state is the EMA
        collection's; the checkpoint keeps both under `posthoc_ema`)."""
        return {"every_steps": self.every_steps,
                "dtype": str(self.dtype).removeprefix("torch."),
                "last_snapshot": list(self.last_snapshot) if self.last_snapshot else None,
                "fork": dict(self.fork) if self.fork is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Where the series stands (the snapshot settings are this run's: see the resume
        policy)."""
        taken = state.get("last_snapshot")
        self.last_snapshot = (int(taken[0]), int(taken[1])) if taken else None
        fork = state.get("fork")
        self.fork = {"step": int(fork["step"]), "folder": str(fork["folder"])} if fork else None


def _main_series(peeked: dict, folder: Path) -> bool:
    """Whether a checkpoint's series is the main folder's (no fork, or one merged already)."""
    fork = (peeked.get("posthoc") or {}).get("fork")
    return fork is None or not (folder / fork["folder"]).is_dir()


def snapshot_steps(every_steps: int, total_steps: int) -> list[int]:
    """The optimizer steps a run snapshots at: every `every_steps`, and at its last step."""
    steps = list(range(every_steps, total_steps + 1, every_steps))
    if not steps or steps[-1] != total_steps:
        steps.append(total_steps)
    return steps
