"""The post-hoc snapshot file: `<run>/posthoc/snapshot-<step>.pth.tar`, its keys and its reading.

A snapshot holds the weights of every tracked power-function EMA at one optimizer step, in the
snapshot dtype (integer buffers as they are), with what the reconstruction needs to know of them:
the step and EMA update counts, each profile's sigma_rel and exponent, and what validate.py needs
to rebuild the network (the run's record, as its checkpoints hold it). `SNAPSHOT_SCHEMA` names
every key; the README's table is checked against it, and `snapshot_entry` writes exactly its
keys. Each file is written atomically by the run's checkpoint writer and read by the checkpoint
module's safe loader. The series a run's snapshots form, and what is made of it, is `series`'.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.files import is_state_dict, safe_load
from ..checkpoint.schema import run_record
from ..util.errors import UserError

FORMAT = "ematrain-posthoc-snapshot"
VERSION = 1
FOLDER = "posthoc"
FORK_PREFIX = "fork-"
_NAME = re.compile(r"^snapshot-(\d+)\.pth\.tar$")


@dataclass(frozen=True)
class SnapshotKey:
    name: str
    what: str


SNAPSHOT_SCHEMA: tuple[SnapshotKey, ...] = (
    SnapshotKey("format", f"`{FORMAT}`: what the file is"),
    SnapshotKey("version", "this format's version"),
    SnapshotKey("step", "the optimizer step it was taken at"),
    SnapshotKey("updates", "EMA updates averaged in by then (a skipped non-finite update counts): "
                "the profile's length"),
    SnapshotKey("sigma_rels", "each tracked power EMA's relative width"),
    SnapshotKey("gammas", "each tracked power EMA's exponent"),
    SnapshotKey("dtype", "the dtype the weights are stored in (--model-ema-snapshot-dtype)"),
    SnapshotKey("shadows", "each tracked power EMA's weights, in the order of `sigma_rels`"),
    SnapshotKey("arch", "timm model name"),
    SnapshotKey("args", "every setting of the run (as the checkpoint's `args`)"),
    SnapshotKey("num_classes", "classifier outputs"),
    SnapshotKey("class_names", "class folder names, in label order"),
    SnapshotKey("data_config", "the evaluation transform"),
    SnapshotKey("eval_dtype", "the dtype training scored the power EMAs in"),
    SnapshotKey("steps_per_epoch", "optimizer steps per epoch (half-lives in epochs)"),
    SnapshotKey("images_per_step", "images per optimizer step (half-lives in images)"),
    SnapshotKey("every", "optimizer steps per EMA update (--model-ema-every)"),
    SnapshotKey("run_id", "the run's identity, as its checkpoints': no series mixes two runs"),
    SnapshotKey("fork", "the fork folder it was written into (a resume from an older checkpoint), "
                "or None"),
)
# What a snapshot records of its run besides its weights and counters: how to rebuild the
# network and count its time.
META_KEYS = ("arch", "args", "num_classes", "class_names", "data_config", "eval_dtype",
             "steps_per_epoch", "images_per_step", "every")


def snapshot_markdown() -> str:
    """The key table as the README shows it."""
    return "\n".join(["| key | what |", "|---|---|"]
                     + [f"| `{k.name}` | {k.what} |" for k in SNAPSHOT_SCHEMA])


def snapshot_record(run) -> dict:
    """What a snapshot records of the `Run` (`META_KEYS` and its id): the run's record, as its
    checkpoints hold it, and how its post-hoc power EMAs count time."""
    power = run.emas.posthoc
    return {**run_record(run),
            "eval_dtype": str(power.scored_dtype(run.model)).removeprefix("torch."),
            "steps_per_epoch": run.data.steps_per_epoch,
            "images_per_step": run.images_per_step(), "every": power.every}


def snapshot_name(step: int) -> str:
    return f"snapshot-{step:010d}.pth.tar"


def snapshot_entry(shadows: Sequence[dict], sigma_rels: Sequence[float], gammas: Sequence[float],
                   step: int, updates: int, dtype: torch.dtype, meta: dict,
                   fork: str | None = None) -> dict:
    """One snapshot as a file holds it (`SNAPSHOT_SCHEMA`): floating tensors of `shadows` in
    `dtype`, on the host; `meta` is the run's record (`snapshot_record`), and `fork` the fork
    folder it is written into."""
    # Copies (also where device and dtype already match): training goes on changing the shadows
    # while the file is written.
    weights = [{k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype, copy=True)
                for k, v in shadow.items()} for shadow in shadows]
    return {"format": FORMAT, "version": VERSION, "step": int(step), "updates": int(updates),
            "sigma_rels": [float(s) for s in sigma_rels], "gammas": [float(g) for g in gammas],
            "dtype": str(dtype).removeprefix("torch."), "shadows": weights,
            **{k: meta[k] for k in META_KEYS}, "run_id": meta.get("run_id"), "fork": fork}


def shadow_bytes(shadow: dict, dtype: torch.dtype) -> int:
    """Bytes one shadow takes in a snapshot of `dtype`."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(v.numel() * (size if v.is_floating_point() else v.element_size())
               for v in shadow.values())


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file of a series: where, and at which step and EMA update count."""
    path: Path
    step: int
    updates: int


def snapshot_files(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the snapshot files in `folder`, in step order."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def peek_snapshot(path: Path) -> dict:
    """A snapshot's record, checked, its tensors memory-mapped (not read)."""
    try:
        data = safe_load(path, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise UserError(f"cannot read {path}: not a snapshot ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not an ematrain post-hoc snapshot")
    if data.get("version") != VERSION:
        raise UserError(f"{path} is a version {data.get('version')} snapshot; this ematrain "
                        f"reads version {VERSION}")
    shadows, sigmas = data.get("shadows"), data.get("sigma_rels")
    if not (isinstance(shadows, list) and isinstance(sigmas, list) and len(shadows) == len(sigmas)
            and all(is_state_dict(s) for s in shadows) and shadows
            and isinstance(data.get("updates"), int) and data["updates"] >= 1
            and all(k in data for k in META_KEYS)):
        raise UserError(f"{path}: a malformed snapshot (shadows, sigma_rels, updates or the "
                        f"run's record missing or inconsistent)")
    return data


def fork_of(path: Path) -> str | None:
    """The fork folder a snapshot was written into (None: the main folder)."""
    try:
        data = safe_load(path, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by `peek_snapshot`
        return None
    return data.get("fork") if isinstance(data, dict) else None


def load_shadows(snapshot: Snapshot) -> list[dict]:
    """The weights of every tracked EMA of one snapshot."""
    return safe_load(snapshot.path)["shadows"]
