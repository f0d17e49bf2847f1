"""curves.png is drawn by a renderer process of its own: one that dies (killed, out of memory) is
said in one warning line and started again, so the run still ends with its picture."""
from __future__ import annotations

import logging

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
