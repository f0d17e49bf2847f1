"""`Trackers`: the one object a run logs through, whatever trackers it has.

Logging must never stop or slow training. A tracker that cannot start (no login, a folder it
cannot write) or that fails later (disk full) costs one warning line, and is off for the rest of
the run; the others, and training, go on. Only the primary process (torchrun's rank 0) logs.

Its state (each tracker's W&B run id or TensorBoard step) travels in every checkpoint, so that a
resumed run continues the same tracker runs; `state_dict` first flushes what was logged, so a
checkpoint never claims steps that a kill could still lose.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

from ..util.errors import one_line
from ..util.logs import log
from .spec import TrackerSpec

TENSORBOARD, WANDB = "tensorboard", "wandb"
LABELS = {TENSORBOARD: "TensorBoard", WANDB: "W&B"}
DEFAULT_TB_FOLDER = "tensorboard"


def _reason(exc: BaseException) -> str:
    return one_line(str(exc)) or type(exc).__name__


class Trackers:
    """The run's trackers (`spec`), each guarded: see the module's docstring.

    Made with the run, before its folder exists: `load_state_dict` may come first (resume),
    `start` opens the trackers in the run folder.
    """

    def __init__(self, spec: TrackerSpec | None = None, primary: bool = True,
                 warn: Callable[[str], None] | None = None):
        self.spec = spec or TrackerSpec()
        self.primary = primary
        self.warn = warn or log.warning
        self.writers: dict[str, object] = {}
        self.state: dict[str, dict] = {}  # each tracker's last state, also of one that failed
        self.step: int | None = None

    @property
    def active(self) -> list[str]:
        """The trackers logging now."""
        return list(self.writers)

    def folder(self, run_dir: Path) -> Path:
        """TensorBoard's event folder: --log-tensorboard DIR, or ``<run>/tensorboard``."""
        return Path(self.spec.tensorboard or Path(run_dir) / DEFAULT_TB_FOLDER)

    # ----------------------------------------------------------------------------- start, end
    def start(self, run_dir: str | Path, run_name: str, resume_at: int | None = None) -> None:
        """Open the trackers of `spec` (on the primary process): `resume_at` is the step a
        resumed run continues after (None for a fresh run)."""
        if not self.primary:
            return
        wanted = ([TENSORBOARD] if self.spec.tensorboard is not None else []) + (
            [WANDB] if self.spec.wandb else [])
        for key in wanted:
            try:
                self.writers[key] = self._open(key, Path(run_dir), run_name, resume_at)
            except Exception as exc:  # noqa: BLE001 - whatever a tracker raises, training goes on
                self.warn(f"warning: {LABELS[key]} logging is off: it could not start "
                          f"({_reason(exc)}); training goes on")

    def _open(self, key: str, run_dir: Path, run_name: str, resume_at: int | None):
        state = self.state.get(key)
        if key == TENSORBOARD:
            from .tensorboard_writer import TensorBoardWriter
            return TensorBoardWriter(self.folder(run_dir), state, resume_at)
        from .wandb_writer import WandbWriter
        s = self.spec
        return WandbWriter(s.wandb_project, tuple(s.wandb_tags), run_name, run_dir,
                           s.wandb_resume_id, state)

    def finish(self, best: dict) -> None:
        """The end of a complete run: `best` (`names.best_values`) logged, every tracker closed."""
        self._each("finish", best)
        self._forget_all()

    def close(self, exit_code: int = 0) -> None:
        """Close every tracker still open (a run that stops or fails); idempotent."""
        self._each("close", exit_code)
        self._forget_all()

    def _forget_all(self) -> None:
        for key in list(self.writers):
            self._keep_state(key)
        self.writers.clear()

    # ----------------------------------------------------------------------------- logging
    def log_interval(self, step: int, values: dict) -> None:
        """The log interval's values (`names.interval_values`) at `step`."""
        self.step = step
        self._each("log", step, values)

    def log_epoch(self, epoch: int, values: dict, step: int | None = None) -> None:
        """Epoch `epoch`'s values (`names.epoch_values`), at `step` (default: the last one)."""
        step = self.step if step is None else step
        self.step = step
        self._each("log", step or 0, values)

    def log_hparams(self, settings: dict, metric_tags: list[str] = ()) -> None:
        """The run's settings; `metric_tags` are the metrics shown beside them."""
        self._each("log_hparams", dict(settings), list(metric_tags))

    def log_table(self, name: str, columns: list[str], rows: list[list], values: dict) -> None:
        """A table of results after training (validate.py --posthoc's sweep) and its headline
        `values`, after the run's last step."""
        self._each("log_table", name, list(columns), [list(r) for r in rows], dict(values))

    def flush(self) -> None:
        self._each("flush")

    def _each(self, method: str, *args) -> None:
        for key, writer in list(self.writers.items()):
            try:
                getattr(writer, method)(*args)
            except Exception as exc:  # noqa: BLE001 - see the module's docstring
                self._fail(key, exc)

    def _fail(self, key: str, exc: BaseException) -> None:
        writer = self.writers.pop(key)
        self.warn(f"warning: {LABELS[key]} logging failed ({_reason(exc)}): it is off for the "
                  f"rest of the run; training goes on")
        with contextlib.suppress(Exception):
            writer.close(1)

    # ----------------------------------------------------------------------------- state
    def _keep_state(self, key: str) -> None:
        with contextlib.suppress(Exception):
            self.state[key] = dict(self.writers[key].state_dict())

    def state_dict(self) -> dict:
        """Each tracker's state (a failed one's as it last was), after a flush: what the
        checkpoint records as logged is in the trackers' files."""
        self.flush()
        for key in self.writers:
            self._keep_state(key)
        return {key: dict(value) for key, value in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"expected the trackers' state as a mapping, got {state!r:.60}")
        self.state = {str(k): dict(v) for k, v in state.items() if isinstance(v, dict)}
