"""curves.png is drawn by a renderer process of its own: one that dies (killed, out of memory) is
said in one warning line and started again, so the run still ends with its picture; one whose
run is killed dies with it."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from ematrain.run import curves
from ematrain.run import summary as summary_mod
from ematrain.run.weight_sets import weight_sets
from ematrain.util.logs import log


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_renderer_that_dies_is_said_and_started_again(tmp_path):
    sets = weight_sets([0.9])
    summary = summary_mod.Summary(sets)
    for epoch in range(2):
        summary.add(epoch, 0.1, 1.0 - epoch / 4,
                    {s.name: {"loss": 1.0, "top1": 50.0 + epoch, "top5": 100.0} for s in sets})
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    elsewhere.mkdir()
    lines = _Lines()
    log.addHandler(lines)
    renderer = curves.CurveRenderer()
    try:
        renderer.submit(elsewhere, sets)  # starts the renderer (nothing to draw there)
        renderer._process.kill()
        renderer._process.wait()
        summary.write(run_dir)
        renderer.submit(run_dir, sets)
        renderer.close()
    finally:
        log.removeHandler(lines)
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert lines.lines == ["warning: the curves.png renderer ended (killed by SIGKILL); "
                           "starting it again"]


def _alive(pid: int) -> bool:
    """Running or stopped (a zombie nobody reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_renderer_dies_with_a_killed_run():
    """A SIGKILLed run takes its renderer with it, even one in the middle of a picture (here
    stopped, as one starved at the lowest priority on a busy machine is): no orphan drawing,
    minutes later, into the folder that the resumed run has taken over."""
    script = (f"import sys, time; sys.path.insert(0, {str(curves._PACKAGE_ROOT)!r})\n"
              "from ematrain.run.curves import CurveRenderer\n"
              "print(CurveRenderer()._running().pid, flush=True); time.sleep(600)")
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    renderer = int(run.stdout.readline())
    try:
        os.kill(renderer, signal.SIGSTOP)  # busy: it would not read its stdin's end
        run.kill()
        run.wait()
        deadline = time.monotonic() + 60  # the state asserted is awaited; this only bounds it
        while _alive(renderer):
            assert time.monotonic() < deadline, "the renderer outlived its run"
            time.sleep(0.01)
    finally:
        run.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(renderer, signal.SIGKILL)
