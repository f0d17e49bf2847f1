"""Weights & Biases: one W&B run per training run, continued on resume.

As timm's train.py: ``wandb.init(project=--wandb-project, name=<the run folder's name>,
tags=--wandb-tags, config=<the settings>)``, and --wandb-resume-id continues that W&B run
(``resume="must"``). A run resumed from its checkpoint continues the W&B run the checkpoint names
(``resume="allow"``). W&B's files go to ``$WANDB_DIR`` when set, else to the run folder
(``<run>/wandb``); ``WANDB_MODE=offline`` logs with no account and no network
(``wandb sync <run>/wandb/offline-run-*`` uploads later).

Each step once, after a kill too. W&B keeps a run's steps increasing: a step lower than the
ones it holds is dropped (an online run knows them, `run.step`, and this writer does not send
them). W&B's service writes its records in batches (its file every 15 s), so a process killed
at once can lose the last seconds it logged, checkpointed ones among them: the checkpoint
therefore carries the rows of its last minute (`CARRY_S`), and the resumed run logs them again
first. W&B keeps whichever copy of a step it got first, and no step is missing.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

# Epoch-level keys are drawn against the epoch; the others against the step.
EPOCH_KEYS = ("train_loss", "eval_*", "lr", "val/*", "epoch/*", "ema/*")
# Rows logged this long before a checkpoint travel in it: four times W&B's longest wait
# between two writes of its file (x_transaction_log_flush_interval, 15 s).
CARRY_S = 60.0


class WandbWriter:
    name = "W&B"

    def __init__(self, project: str | None, tags: tuple[str, ...], run_name: str,
                 run_dir: str | Path, resume_id: str = "", state: dict | None = None):
        import wandb

        state = state or {}
        run_id = resume_id or state.get("run_id") or None
        resume = None if run_id is None else ("must" if resume_id else "allow")
        if run_id is not None and not resume_id:  # the checkpoint's run, in its own project
            project = state.get("project") or project
        folder = os.environ.get("WANDB_DIR") or str(run_dir)
        self.run = wandb.init(project=project, name=run_name, tags=list(tags) or None, id=run_id,
                              resume=resume, dir=folder)
        self.step: int | None = state.get("step")
        self.recent: list[tuple[float, int, dict]] = []  # (when, step, values) of the last rows
        self.run.define_metric("epoch")
        for key in EPOCH_KEYS:
            self.run.define_metric(key, step_metric="epoch")
        for step, values in state.get("recent") or []:  # what the killed process may have lost
            self.log(int(step), dict(values))

    def log(self, step: int, values: dict) -> None:
        if step < self.run.step:  # W&B holds this step already
            return
        self.run.log(dict(values), step=step)
        self.step = step if self.step is None else max(self.step, step)
        now = time.monotonic()
        self.recent.append((now, step, dict(values)))
        while self.recent and self.recent[0][0] < now - CARRY_S:
            self.recent.pop(0)

    def log_hparams(self, settings: dict, metric_tags: list[str]) -> None:
        self.run.config.update(dict(settings), allow_val_change=True)

    def log_table(self, name: str, columns: list[str], rows: list[list], values: dict) -> None:
        """A W&B Table, after the last step, and its headline `values` in the run's summary."""
        import wandb

        step = max(self.run.step, (self.step or 0) + 1)
        self.run.log({name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])},
                     step=step)
        self.step = step
        for key, value in values.items():
            self.run.summary[key] = value

    def flush(self) -> None:
        """W&B writes in a process of its own (see the module's docstring)."""

    def finish(self, values: dict) -> None:
        for key, value in values.items():
            self.run.summary[key] = value
        self.close()

    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run, then end W&B's service process: only then are its files whole
        (the commands end without Python's exit handlers, which would do it)."""
        import wandb

        self.run.finish(exit_code=exit_code)
        wandb.teardown()

    def state_dict(self) -> dict:
        """The W&B run's id and project, the last step logged, and the rows of the last
        `CARRY_S` seconds (steps and values)."""
        cutoff = time.monotonic() - CARRY_S
        recent = [[step, dict(values)] for when, step, values in self.recent if when >= cutoff]
        return {"run_id": self.run.id, "project": self.run.project, "step": self.step,
                "recent": recent}
