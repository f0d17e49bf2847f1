"""TensorBoard, through torch.utils.tensorboard: one event folder per run, continued on resume.

A resumed run writes a new event file in the same folder, opened with ``purge_step``: TensorBoard
then drops whatever the earlier files hold from that step on, the steps a killed process logged
after its last checkpoint, which the resumed run logs again. So each step shows exactly once.
"""
from __future__ import annotations

import threading
from pathlib import Path

from . import names

# The charts that put every weight set side by side (TensorBoard's Custom Scalars view).
LAYOUT = {"ematrain: every weight set": {
    "top-1": ["Multiline", [r"val/top1/.*"]],
    "top-5": ["Multiline", [r"val/top5/.*"]],
    "loss": ["Multiline", [r"val/loss/.*"]],
    "EMA effective half-life (epochs)": ["Multiline", [r"ema/half_life_epochs/.*"]],
}}


class TensorBoardWriter:
    """Scalars at the run's step (see `names`), the settings for the HParams view, the best
    epochs at the end.

    Args:
        folder: the event folder (made if missing).
        state: what `state_dict` gave in the checkpoint the run resumes from, or None.
        resume_at: the step the run resumes after, when there is no state (the checkpoint was
            written without TensorBoard): steps after it are purged all the same.
    """
    name = "TensorBoard"

    def __init__(self, folder: str | Path, state: dict | None = None,
                 resume_at: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        _quiet_writer_threads()
        self.folder = Path(folder)
        state = state or {}
        self.step: int | None = state.get("step")
        last = self.step if self.step is not None else resume_at
        self.purged_from = None if last is None else int(last) + 1
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=self.purged_from)
        self.writer.add_custom_scalars(LAYOUT)

    def log(self, step: int, values: dict) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.step = step if self.step is None else max(self.step, step)

    def log_hparams(self, settings: dict, metric_tags: list[str]) -> None:
        """The settings in the HParams view, beside the metrics `metric_tags` name (written at
        the end by `finish`)."""
        from torch.utils.tensorboard.summary import hparams

        writer = self.writer._get_file_writer()
        for summary in hparams(names.flat_hparams(settings), {t: 0.0 for t in metric_tags}):
            writer.add_summary(summary)

    def log_table(self, name: str, columns: list[str], rows: list[list], values: dict) -> None:
        """A table (as markdown text, TensorBoard's Text view) and its headline `values`, after
        the last step."""
        step = (self.step or 0) + 1
        self.writer.add_text(name, names.markdown_table(columns, rows), global_step=step)
        self.log(step, values)

    def flush(self) -> None:
        self.writer.flush()

    def finish(self, values: dict) -> None:
        self.log(self.step or 0, values)
        self.close()

    def close(self, exit_code: int = 0) -> None:
        self.writer.close()

    def state_dict(self) -> dict:
        return {"step": self.step, "dir": str(self.folder)}


def _quiet_writer_threads() -> None:
    """TensorBoard writes from a thread of its own; a write that fails there (disk full) is
    raised again by the next call on the training thread, which turns it into one warning. The
    thread's own traceback on stderr is left out (other threads' exceptions are untouched)."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "ematrain_quiet_tensorboard", False):
        return

    def hook(args):
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)
    hook.ematrain_quiet_tensorboard = True
    threading.excepthook = hook
