"""The run's folder: where it is (timm's layout), its lock, its args.yaml, and its removal when a
new run fails before its first checkpoint. Every file is written atomically."""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

import yaml
from timm.models import safe_model_name

from ..checkpoint.schema import is_ours
from ..settings.flags import DEFAULT_OUTPUT
from ..settings.resume_policy import ResumeSource
from ..util.atomic import atomic_write_text, remove_stale_temporaries
from ..util.errors import UserError
from ..util.signals import close_in_loader_workers

# ----------------------------------------------------------------------------- the run folder
LOCK = ".ematrain.lock"
# What a run writes before its first checkpoint: a folder holding only these is removed again
# when the run fails (nothing of value is lost, no empty run is left to mislead; post-hoc
# snapshots without a checkpoint cannot be continued, nor can the trackers' runs in their
# default folders: a new start logs to new ones).
_BEFORE_FIRST_CHECKPOINT = {"args.yaml", "summary.csv", "curves.png", "posthoc", "tensorboard",
                            "wandb", LOCK}


class RunFolder:
    """The run's folder, locked against a second process while the run lives.

    A new run never writes into an earlier run's folder: like timm, it takes `<name>-1`,
    `<name>-2`, ... instead (also when another process holds `<name>` right now). A resumed run
    continues in its own folder, and refuses one that a live process holds. The lock is an
    flock: it dies with its process, so a killed run's leftover never blocks.
    """

    def __init__(self, path: Path, handle, created: bool):
        self.path, self._handle, self.created = path, handle, created

    @classmethod
    def open(cls, base: Path, resuming: bool) -> "RunFolder":
        candidate, suffix = base, 0
        while True:
            if candidate.exists() and not candidate.is_dir():
                if resuming:
                    raise UserError(f"run folder {candidate} is a file, not a folder")
            else:
                created = not candidate.exists()
                handle = cls._lock(candidate, resuming)
                if handle is not None and (resuming or created or not _has_entries(candidate)):
                    if resuming:
                        remove_stale_temporaries(candidate)
                    return cls(candidate, handle, created)
                if handle is not None:
                    handle.close()
            suffix += 1
            candidate = base.with_name(f"{base.name}-{suffix}")

    @staticmethod
    def _lock(folder: Path, resuming: bool):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / LOCK, "a+")
        except OSError as exc:
            raise UserError(f"cannot create output directory {folder}: {exc.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            if resuming:
                raise UserError(f"run folder {folder} is in use by another process (pid "
                                f"{holder}); wait for it to end, or stop it first") from None
            return None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        close_in_loader_workers(handle.fileno())
        return handle

    def close(self) -> None:
        """Release the lock (the lock file goes too)."""
        if self._handle is not None:
            (self.path / LOCK).unlink(missing_ok=True)
            close_in_loader_workers(self._handle.fileno(), keep=False)
            self._handle.close()
            self._handle = None

    def discard_if_unused(self) -> None:
        """Remove a folder this run created and never saved a checkpoint in."""
        if self.created and all(p.name in _BEFORE_FIRST_CHECKPOINT for p in self.path.iterdir()):
            self.close()
            shutil.rmtree(self.path, ignore_errors=True)


def _has_entries(folder: Path) -> bool:
    return any(p.name != LOCK for p in folder.iterdir())


def run_folder_base(output: str, experiment: str, model: str, img_size: int) -> Path:
    """As timm lays it out: `<--output>/<experiment or date-model-imgsize>`, by default under
    ./output/train (`img_size`: the input size the run trains at)."""
    name = experiment or "-".join([time.strftime("%Y%m%d-%H%M%S"), safe_model_name(model),
                                   str(img_size)])
    return (Path(output) if output else DEFAULT_OUTPUT) / name


def check_writable(run_dir: Path) -> None:
    probe = run_dir / ".write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory {run_dir} is not writable: {exc.strerror}") from None


def write_args(run_dir: Path, record: dict) -> None:
    """args.yaml: the run's settings as a recipe, loadable again with `-c`."""
    # A recipe, not the run's history: `-c args.yaml` must start a new run, never resume this one.
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in record.items()
             if k not in ("config", "resume")}
    atomic_write_text(run_dir / "args.yaml", yaml.safe_dump(clean, sort_keys=True))


def open_run_folder(run, source: ResumeSource | None) -> RunFolder:
    """The `Run`'s folder: a resumed run of ours continues in its checkpoint's folder."""
    loop = run.settings.loop
    if source is not None and is_ours(source.ckpt):
        folder = RunFolder.open(source.path.parent, resuming=True)
    else:
        base = run_folder_base(loop.output, loop.experiment, run.settings.model.model,
                               run.data.data_config["input_size"][-1])
        folder = RunFolder.open(base, resuming=source is not None or loop.resume == "auto")
    check_writable(folder.path)
    return folder
