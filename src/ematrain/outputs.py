"""What a run shows and leaves: its folder, args.yaml, summary.csv, curves.png, the epoch line and
the final report. Every file is written atomically."""
from __future__ import annotations

import csv
import fcntl
import io
import contextlib
import dataclasses
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

from .atomic import atomic_write, atomic_write_text, remove_stale_temporaries
from .clock import duration
from .errors import UserError
from .logs import log
from .signals import close_in_loader_workers
from .weightsets import WeightSet

METRICS = ("loss", "top1", "top5")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- the run folder
LOCK = ".ematrain.lock"
# What a run writes before its first checkpoint: a folder holding only these is removed again
# when the run fails (nothing of value is lost, no empty run is left to mislead; post-hoc
# snapshots without a checkpoint cannot be continued).
_BEFORE_FIRST_CHECKPOINT = {"args.yaml", "summary.csv", "curves.png", "posthoc", LOCK}


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


DEFAULT_OUTPUT = Path("output") / "train"


def run_folder_base(output: str, experiment: str, model: str, img_size: int) -> Path:
    """As timm lays it out: `<--output>/<experiment or date-model-imgsize>`, by default under
    ./output/train (`img_size`: the input size the run trains at)."""
    from timm.models import safe_model_name  # here: the curve renderer imports this module

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


# ----------------------------------------------------------------------------- summary.csv
class Summary:
    """summary.csv: one row per epoch in timm's columns, ``epoch, train_loss, eval_loss,
    eval_top1, eval_top5, lr`` (``eval_*``: the primary weight set, see `weightsets`), then each
    other weight set's ``<prefix>eval_*``.

    The rows also travel in every checkpoint (`state_dict`), so a kill between writing a
    checkpoint and writing summary.csv loses no row: a resumed run rewrites the file from them.
    """

    def __init__(self, sets: tuple[WeightSet, ...]):
        self.sets = sets
        others = [s for s in sets if not s.primary]
        self.columns = (["epoch", "train_loss"] + [f"eval_{m}" for m in METRICS] + ["lr"]
                        + [f"{s.column_prefix}eval_{m}" for s in others for m in METRICS])
        self.rows: list[dict] = []

    def add(self, epoch: int, lr: float, train_loss: float, results: dict[str, dict]) -> dict:
        row = {"epoch": epoch, "train_loss": train_loss, "lr": lr}
        for s in self.sets:
            row.update({f"{s.column_prefix}eval_{m}": results[s.name][m] for m in METRICS})
        self.rows.append(row)
        return row

    def write(self, run_dir: Path, rows: list[dict] | None = None) -> None:
        """Rewrite summary.csv whole (with `rows`, a snapshot, or the rows now): a resumed run
        never duplicates or loses a row."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows if rows is None else rows:
            writer.writerow({k: row.get(k, "") for k in self.columns})
        atomic_write_text(run_dir / "summary.csv", buf.getvalue())

    def state_dict(self) -> dict:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [self._current_names(dict(r)) for r in state["rows"]]

    def _current_names(self, row: dict) -> dict:
        """A row of a run saved before its shadows were named as asked, in today's columns."""
        for s in self.sets:
            old, new = s.legacy_prefix, s.column_prefix
            if old and old != new and f"{new}eval_top1" not in row:
                for m in METRICS:
                    if f"{old}eval_{m}" in row:
                        row[f"{new}eval_{m}"] = row.pop(f"{old}eval_{m}")
        return row


def read_summary(run_dir: Path) -> list[dict]:
    path = run_dir / "summary.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class CurveRenderer:
    """Renders curves.png in a process of its own at the lowest priority, so that training keeps
    the CPU (a thread would share the interpreter lock, and hold it while descheduled).

    `submit` names the run folder and returns at once; the renderer reads summary.csv and, when
    several requests wait, draws only the newest. On a loaded machine the file catches up when the
    CPU has time; `close` waits for the last picture. A failed render is a warning line, never
    the run's end (the checkpoints and summary.csv hold the numbers). A renderer that dies (killed,
    out of memory) is a warning line too, and is started again once for the next picture.
    """

    RESTARTS = 1

    def __init__(self):
        self._process: subprocess.Popen | None = None  # started with the first picture
        self._deaths = 0

    def submit(self, run_dir: Path, sets: tuple[WeightSet, ...], title: str = "",
               chance: float | None = None) -> None:
        job = {"run_dir": str(run_dir), "title": title, "chance": chance,
               "sets": [dataclasses.asdict(s) for s in sets]}
        for _ in range(2):  # a renderer that died meanwhile is noticed and replaced once
            process = self._running()
            if process is None:
                return
            try:
                process.stdin.write(json.dumps(job) + "\n")
                process.stdin.flush()
                return
            except OSError:
                process.wait()

    def _running(self) -> subprocess.Popen | None:
        """The renderer, started when needed (again after it died, `RESTARTS` times, each time
        with a warning); None once given up."""
        if self._process is not None and self._process.poll() is None:
            return self._process
        if self._process is not None:
            self._deaths += 1
            given_up = self._deaths > self.RESTARTS
            self._warn_ended("curves.png is no longer drawn; summary.csv has every epoch"
                             if given_up else "starting it again")
            self._process = None
            if given_up:
                return None
        elif self._deaths > self.RESTARTS:
            return None
        self._process = subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(_PACKAGE_ROOT)!r}); "
                                   f"from ematrain.outputs import render_forever; "
                                   f"render_forever()"],
            stdin=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(19))
        return self._process

    def _warn_ended(self, then: str) -> None:
        code = self._process.returncode
        how = f"exit code {code}"
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                how = f"killed by {signal.Signals(-code).name}"
        log.warning(f"warning: the curves.png renderer ended ({how}); {then}")

    def close(self) -> None:
        """Wait for the last picture (a renderer that died meanwhile is a warning line)."""
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
            self._process.wait()
            if self._process.returncode != 0:
                self._warn_ended("curves.png may lack the last epochs; summary.csv has them")
            self._process = None


def render_forever() -> None:
    """The renderer process: a job per line on stdin, the newest of those waiting drawn."""
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        while selector.select(timeout=0):  # newer requests wait: they replace this one
            newer = sys.stdin.readline()
            if not newer:
                break
            line = newer
        job = json.loads(line)
        try:
            sets = tuple(WeightSet(**s) for s in job["sets"])
            run_dir = Path(job["run_dir"])
            plot_curves(run_dir, read_summary(run_dir), sets, job["title"], job["chance"])
        except Exception as exc:  # noqa: BLE001 - a picture must not end a run
            print(f"warning: curves.png not written: {str(exc).splitlines()[0][:160]}",
                  file=sys.stderr, flush=True)


def _number(row: dict, column: str) -> float:
    """A summary value; NaN (not drawn) where a row has none, e.g. the rows of a timm run this
    one continues, which lack the columns timm does not write."""
    value = row.get(column)
    return float(value) if value not in (None, "") else math.nan


_STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "P")]


def plot_curves(run_dir: Path, rows: list[dict], sets: tuple[WeightSet, ...], title: str = "",
                chance: float | None = None) -> None:
    """curves.png: validation top-1 and loss of the raw weights and every EMA, the training
    loss and the learning rate, per epoch.

    Matplotlib's object API (no pyplot), so it can run in the background writer's thread.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) for r in rows]
    fig = Figure(figsize=(14, 4.2))
    FigureCanvasAgg(fig)
    ax_acc, ax_loss, ax_lr = fig.subplots(1, 3)
    for s, (line, marker) in zip(sets, _STYLES * len(sets)):
        style = dict(linestyle=line, marker=marker, markersize=4, label=s.label)
        ax_acc.plot(epochs, [_number(r, f"{s.column_prefix}eval_top1") for r in rows], **style)
        ax_loss.plot(epochs, [_number(r, f"{s.column_prefix}eval_loss") for r in rows], **style)
    ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows], color="grey", linestyle=":",
                 label="training loss")
    ax_lr.plot(epochs, [float(r["lr"]) for r in rows], color="black", marker=".")
    _top1_range(ax_acc, rows, sets, chance)
    ax_acc.set(title="validation top-1", xlabel="epoch", ylabel="top-1 (%)")
    ax_loss.set(title="loss", xlabel="epoch", ylabel="loss")
    ax_lr.set(title="learning rate", xlabel="epoch", ylabel="lr")
    for ax in (ax_acc, ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend()
    ax_loss.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(run_dir / "curves.png", lambda f: fig.savefig(f, format="png", dpi=100))


def _top1_range(ax, rows: list[dict], sets, chance: float | None) -> None:
    """At least 20 points of top-1 in view, and chance level when known, so that wiggles near
    chance do not look dramatic."""
    values = [v for v in (_number(r, f"{s.column_prefix}eval_top1") for r in rows for s in sets)
              if not math.isnan(v)] or [0.0]
    low, high = min(values + ([chance] if chance else [])), max(values)
    if high - low < 20:
        high = min(100.0, low + 20)
        low = max(0.0, high - 20)
    ax.set_ylim(max(0.0, low - 2), min(100.0, high + 2) + 0.5)
    if chance:
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance")


# ----------------------------------------------------------------------------- console lines
def epoch_line(epoch: int, num_epochs: int, lr: float, train_loss: float,
               results: dict[str, dict], sets: tuple[WeightSet, ...],
               improved: Sequence[str] = (), skipped_ema_updates: int = 0,
               timing: tuple[float, float | None] | None = None) -> str:
    """What each epoch prints: its position, time and the run's remaining time (`timing`:
    seconds taken, seconds left), then every weight set's numbers, ``<- new best`` on each set
    whose best epoch this is (`improved`: their names; its best file, if it has one, is this
    epoch's). One line for the raw weights alone; with EMAs a header and one aligned row per set."""
    head = f"epoch {epoch} ({epoch + 1}/{num_epochs})"
    if timing is not None:
        took, left = timing
        head += f" {duration(took)}" + (f", eta {duration(left)}"
                                        if left is not None and epoch + 1 < num_epochs else "")
    head += f" | lr {lr:.3g} train_loss {train_loss:.4f}"
    if skipped_ema_updates:
        head += f" | EMA updates skipped (NaN/Inf weights): {skipped_ema_updates}"
    width = max(len(s.name) for s in sets)

    def scores(s: WeightSet) -> str:
        r = results[s.name]
        mark = "  <- new best" if s.name in improved else ""
        return f"top1 {r['top1']:6.2f}  top5 {r['top5']:6.2f}  loss {r['loss']:.4f}{mark}"

    if len(sets) == 1:
        return f"{head} | {sets[0].name}: {scores(sets[0])}"
    return "\n".join([head] + [f"  {s.name:<{width}}  {scores(s)}" for s in sets])


def final_report(best: dict[str, dict], sets: tuple[WeightSet, ...], metric: str) -> list[str]:
    """One line per weight set: its best epoch by the eval metric."""
    lines = []
    for s in sets:
        record = best.get(s.name)
        if record and record.get("epoch") is not None:
            lines.append(f"best {s.name}: {metric} {record['metric']:.4f} at epoch {record['epoch']}")
    return lines
