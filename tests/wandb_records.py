"""Reading back what W&B wrote offline: the records of a run's ``run-<id>.wandb`` file.

W&B keeps an offline run as a log of protocol-buffer records (``wandb sync`` replays it): a
7-byte header, then LevelDB-style chunks in 32 KiB blocks, each with a 7-byte header (checksum,
length, type: whole, first, middle or last part of a record). The records are W&B's own
``wandb_internal_pb2.Record``: `history` rows, `summary` updates, the `run` with its config.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # b":W&B", a 2-byte magic number, a version byte
WHOLE, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """Every record of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    pos, parts = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (WHOLE, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def history(path: Path) -> list[dict]:
    """The run's history rows, each {key: value} with W&B's ``_step``."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({_key(i): json.loads(i.value_json) for i in record.history.item})
    return rows


def summary(path: Path) -> dict:
    """The run's summary as W&B ends up with it (the last value of each key)."""
    out = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                out.pop(_key(item), None)
    return out


def run_info(path: Path) -> dict:
    """The run record: its id, project, name, tags and config."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            config = {i.key: json.loads(i.value_json) for i in run.config.update}
            return {"id": run.run_id, "project": run.project, "name": run.display_name,
                    "tags": list(run.tags), "config": config}
    raise AssertionError(f"{path} has no run record")


def offline_files(wandb_dir: Path, run_id: str | None = None) -> list[Path]:
    """The ``.wandb`` files of the offline runs under `wandb_dir`, oldest first (a resumed
    run writes a folder of its own, with the same id)."""
    folders = sorted(Path(wandb_dir).glob("wandb/offline-run-*"))
    files = [f for d in folders for f in d.glob("run-*.wandb")]
    return [f for f in files if run_id is None or f.name == f"run-{run_id}.wandb"]


def synced_history(files: list[Path]) -> list[dict]:
    """The history W&B shows once the segments are synced in order: as when logging, a row at
    a lower step than the run already holds is dropped."""
    rows, last = [], -1
    for path in files:
        for row in history(path):
            if row["_step"] > last:
                rows.append(row)
                last = row["_step"]
    return rows
