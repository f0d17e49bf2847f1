"""curves.png: validation top-1 and loss of every weight set, training loss and learning rate,
drawn from summary.csv by a renderer process of its own at the lowest CPU priority.

The renderer imports this module alone (with `summary` and `weight_sets`): no torch, no timm.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path

from ..util.atomic import atomic_write
from ..util.logs import log
from .summary import read_summary
from .weight_sets import WeightSet

# The folder that holds the ematrain package (src/), put on the renderer's path.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


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
                                   f"from ematrain.run.curves import render_forever; "
                                   f"render_forever()"],
            stdin=subprocess.PIPE, text=True, preexec_fn=_renderer_setup(os.getpid()))
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


_PR_SET_PDEATHSIG = 1


def _renderer_setup(parent: int):
    """What the renderer's process does before it starts: the lowest CPU priority, and on Linux
    death with the run's process. A run killed (SIGKILL, out of memory) would otherwise leave
    its renderer drawing at that priority for minutes on a busy machine, into the folder that
    the resumed run has taken over: a temporary file left beside it, an older picture over
    the new one. (The signal comes when the thread that started the renderer ends: the run's
    background writer, which lives as long as the run.)"""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child may only call it
        prctl = libc.prctl
    except (OSError, AttributeError):  # not Linux: the renderer ends at its stdin's end
        prctl = None

    def setup() -> None:
        os.nice(19)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the run died before the signal was asked for
                os._exit(1)
    return setup


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
