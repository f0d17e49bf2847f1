"""The post-hoc snapshot series of a run: `<run>/posthoc/snapshot-<step>.pth.tar`.

A snapshot holds the weights of every tracked power-function EMA at one optimizer step, in the
snapshot dtype (integer buffers as they are), with what the reconstruction needs to know of them:
the step and EMA update counts, each profile's sigma_rel and exponent, and what validate.py needs
to rebuild the network (arch, args, classes, evaluation transform). Each file is written
atomically and loads with ``torch.load(weights_only=True)``; the series is the folder's files in
step order. `read_series` checks that the files form one series (one line, exit 2, otherwise),
`synthesize` forms the linear combinations the least-squares solution asks for.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .atomic import remove_stale_temporaries
from .errors import UserError
from .logs import log
from .posthoc import Profile, Solution

FORMAT = "ematrain-posthoc-snapshot"
VERSION = 1
FOLDER = "posthoc"
_NAME = re.compile(r"^snapshot-(\d+)\.pth\.tar$")
# What a snapshot records besides its weights and counters: how to rebuild the network.
META_KEYS = ("arch", "args", "num_classes", "class_names", "data_config", "eval_dtype",
             "steps_per_epoch", "images_per_step", "every")


def snapshot_name(step: int) -> str:
    return f"snapshot-{step:010d}.pth.tar"


def snapshot_entry(shadows: Sequence[dict], sigma_rels: Sequence[float], gammas: Sequence[float],
                   step: int, updates: int, dtype: torch.dtype, meta: dict) -> dict:
    """One snapshot as a file holds it: floating tensors of `shadows` in `dtype`, on the host."""
    # Copies (also where device and dtype already match): training goes on changing the shadows
    # while the file is written.
    weights = [{k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype, copy=True)
                for k, v in shadow.items()} for shadow in shadows]
    return {"format": FORMAT, "version": VERSION, "step": int(step), "updates": int(updates),
            "sigma_rels": [float(s) for s in sigma_rels], "gammas": [float(g) for g in gammas],
            "dtype": str(dtype).removeprefix("torch."), "shadows": weights,
            **{k: meta[k] for k in META_KEYS}}


def shadow_bytes(shadow: dict, dtype: torch.dtype) -> int:
    """Bytes one shadow takes in a snapshot of `dtype`."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(v.numel() * (size if v.is_floating_point() else v.element_size())
               for v in shadow.values())


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    updates: int


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


def snapshot_files(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the snapshot files in `folder`, in step order."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def _peek(path: Path) -> dict:
    """A snapshot's record, its tensors memory-mapped (not read)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise UserError(f"cannot read {path}: not a snapshot ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not an ematrain post-hoc snapshot")
    if data.get("version") != VERSION:
        raise UserError(f"{path} is a version {data.get('version')} snapshot; this ematrain "
                        f"reads version {VERSION}")
    shadows, sigmas = data.get("shadows"), data.get("sigma_rels")
    if not (isinstance(shadows, list) and isinstance(sigmas, list) and len(shadows) == len(sigmas)
            and all(ckpt_io.is_state_dict(s) for s in shadows) and shadows
            and isinstance(data.get("updates"), int) and data["updates"] >= 1
            and all(k in data for k in META_KEYS)):
        raise UserError(f"{path}: a malformed snapshot (shadows, sigma_rels, updates or the "
                        f"run's record missing or inconsistent)")
    return data


def read_series(run_dir: str | Path) -> Series:
    """The snapshot series of a run folder (or of its posthoc/ folder), checked: at least two
    snapshots, all of the same profiles, network and dtype, in increasing update counts."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--posthoc {run_dir}: no such folder")
    folder = run_dir / FOLDER if (run_dir / FOLDER).is_dir() else run_dir
    files = snapshot_files(folder)
    if not files:
        raise UserError(f"{run_dir} holds no post-hoc snapshots ({FOLDER}/snapshot-*.pth.tar): "
                        f"train with --model-ema-posthoc")
    if len(files) < 2:
        raise UserError(f"{folder} holds one snapshot only ({files[0][1].name}): post-hoc "
                        f"synthesis needs at least two (a shorter --model-ema-snapshot-every)")
    first, snapshots, last = None, [], None
    for step, path in files:
        data = _peek(path)
        shared = _shared(data)
        if first is None:
            first = (path, shared)
        elif shared != first[1]:
            raise UserError(f"{folder} mixes snapshots of different runs or settings, which "
                            f"differ in {_difference(shared, first[1])}: {path.name} "
                            f"({_describe(shared)}) and {first[0].name} ({_describe(first[1])})")
        if snapshots and data["updates"] <= snapshots[-1].updates:
            raise UserError(f"{folder}: {path.name} has {data['updates']} EMA updates, no more "
                            f"than the snapshot before it: mixed runs")
        snapshots.append(Snapshot(path, step, data["updates"]))
        last = data
    return Series(folder, tuple(snapshots), tuple(last["sigma_rels"]), tuple(last["gammas"]),
                  last["dtype"], {k: last[k] for k in META_KEYS})


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


def load_shadows(snapshot: Snapshot) -> list[dict]:
    """The weights of every tracked EMA of one snapshot."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(snapshot.path, map_location="cpu", weights_only=True)["shadows"]


@torch.no_grad()
def synthesize(series: Series, solution: Solution) -> tuple[list[dict], int]:
    """The reconstructed weights of every target: ``sum_i c_i snapshot_i`` in float64, read one
    snapshot at a time, returned in float32 (float64 for float64 snapshots); integer buffers
    from the last snapshot.

    A variance buffer (BatchNorm's ``running_var``) is clamped at zero: negative coefficients
    may take a combination of variances below it, where the layer would give NaN. Returns the
    state dicts and how many elements were clamped.
    """
    coef = torch.from_numpy(solution.coefficients)  # targets x (snapshots * tracked)
    sums: list[dict] | None = None
    tracked = len(series.gammas)
    for i, snapshot in enumerate(series.snapshots):
        shadows = load_shadows(snapshot)
        if sums is None:
            sums = [{k: torch.zeros(v.shape, dtype=torch.float64) for k, v in shadows[0].items()
                     if v.is_floating_point()} for _ in range(coef.shape[0])]
        for j, shadow in enumerate(shadows):
            column = coef[:, i * tracked + j].tolist()
            for target, c in zip(sums, column):
                if c != 0.0:
                    for k, acc in target.items():
                        acc.add_(shadow[k].double(), alpha=c)
    ints = {k: v for k, v in shadows[0].items() if not v.is_floating_point()}
    dtype = torch.promote_types(getattr(torch, series.dtype), torch.float32)
    clamped, out = 0, []
    for target in sums:
        state = {}
        for k, acc in target.items():
            if k.endswith("running_var"):
                clamped += int((acc < 0).sum())
                acc.clamp_(min=0.0)
            state[k] = acc.to(dtype)
        state.update(ints)
        out.append({k: state[k] for k in shadows[0]})
    return out, clamped


def remove_after(folder: Path, step: int) -> list[Path]:
    """Remove the snapshots later than `step` (a resumed run writes them again); returns them."""
    if not folder.is_dir():
        return []
    stale = [p for s, p in snapshot_files(folder) if s > step]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def snapshot_steps(every_steps: int, total_steps: int) -> list[int]:
    """The optimizer steps a run snapshots at: every `every_steps`, and at its last step."""
    steps = list(range(every_steps, total_steps + 1, every_steps))
    if not steps or steps[-1] != total_steps:
        steps.append(total_steps)
    return steps



class PosthocTracker:
    """The training side of post-hoc EMA: power-function EMAs (a `ModelEma` under the power
    schedule, `ema_schedules.Power`) and the snapshots of them every `every_steps` optimizer
    steps and at the run's last step.

    A snapshot is copied to host memory in its dtype at its step (the only part on the training
    path) and written by the run's checkpoint writer (`keeper.Writer`), in order with the
    checkpoints: when a checkpoint is on disk, so is every snapshot of the steps before it. A
    resumed run removes the snapshots later than its checkpoint and writes them again, so the
    series is the one an uninterrupted run writes. Part of the checkpoint (`state_dict`).
    """

    def __init__(self, ema, every_steps: int, total_steps: int, dtype: torch.dtype):
        self.ema, self.every_steps, self.total_steps, self.dtype = ema, every_steps, total_steps, dtype
        self._taken = -1  # the step of the last snapshot taken by this process

    def open_folder(self, run_dir: Path, resumed: bool, step: int) -> None:
        """<run>/posthoc/; on resume (at optimizer step `step`) without the snapshots later than
        the checkpoint, nor the temporary file of a write a kill interrupted: the resumed run
        writes them again."""
        folder = run_dir / FOLDER
        folder.mkdir(exist_ok=True)
        remove_stale_temporaries(folder)
        if resumed:
            stale = remove_after(folder, step)
            if stale:
                log.info(f"resume: removed {len(stale)} post-hoc snapshot(s) later than the "
                         f"checkpoint's step {step}; they are written again")

    def take(self, step: int, meta, keeper) -> None:
        """The snapshot of optimizer step `step` when it is one of the series' (once per step),
        handed to `keeper`'s writer; `meta()` gives the run's record (`META_KEYS`)."""
        if not self.due(step) or step == self._taken:
            return
        self._taken = step
        if keeper.primary:
            keeper.save_file(f"{FOLDER}/{snapshot_name(step)}", self.entry(step, meta()))

    @property
    def sigma_rels(self) -> list[float]:
        return list(self.ema.decays)

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (updates so far) is a snapshot step."""
        return step > 0 and (step % self.every_steps == 0 or step == self.total_steps)

    def entry(self, step: int, meta: dict) -> dict:
        """The snapshot of now as its file will hold it (host memory)."""
        shadows = [self.ema.shadow_state_dict(i) for i in range(len(self.ema.modules))]
        # The schedule's update count (a skipped non-finite update still counts in it).
        updates = self.ema.steps // self.ema.every
        return snapshot_entry(shadows, self.ema.decays, self.ema.schedule.gammas, step, updates,
                              self.dtype, meta)

    def plan(self) -> tuple[int, int]:
        """Snapshots the run writes and bytes per snapshot."""
        per = sum(shadow_bytes(m.state_dict(), self.dtype) for m in self.ema.modules)
        return len(snapshot_steps(self.every_steps, self.total_steps)), per

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict(), "every_steps": self.every_steps,
                "dtype": str(self.dtype).removeprefix("torch.")}

    def load_state_dict(self, state: dict) -> None:
        """The power EMAs' state (the snapshot settings are this run's: see the resume policy)."""
        self.ema.load_state_dict(state["ema"])
