"""Shared pytest helpers: tiny learnable ImageFolder trees and a CLI runner."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
from PIL import Image

# The data written as timm users keep theirs (shards, tars, Hugging Face datasets): fixtures.
pytest_plugins = ["data_writers"]

REPO_ROOT = Path(__file__).resolve().parent.parent

# Well separated dominant colours, one per class; more classes than this
# reuse the palette with a darkened shade so they still differ.
_PALETTE = (
    (220, 30, 30),    # red
    (30, 200, 40),    # green
    (30, 60, 220),    # blue
    (230, 220, 30),   # yellow
    (200, 40, 200),   # magenta
    (30, 210, 210),   # cyan
    (240, 140, 20),   # orange
    (130, 130, 130),  # grey
)


def _class_colour(cls: int) -> np.ndarray:
    base = np.array(_PALETTE[cls % len(_PALETTE)], dtype=np.float64)
    shade = 0.5 ** (cls // len(_PALETTE))
    return base * shade


def _make_image(rng: np.random.Generator, cls: int, size: int) -> Image.Image:
    """One image: class colour + mild noise + a bright square at a random spot."""
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = _class_colour(cls)
    img += rng.normal(0.0, 12.0, size=img.shape)
    side = max(2, size // 4)
    y, x = rng.integers(0, size - side + 1, size=2)
    img[y : y + side, x : x + side] = 245.0 + rng.normal(0.0, 4.0, size=(side, side, 3))
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def make_imagefolder(
    root,
    num_classes: int = 3,
    train_per_class: int = 24,
    val_per_class: int = 8,
    size: int = 32,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
) -> Path:
    """Write a small, easily learnable ImageFolder tree and return ``root``.

    Layout: ``root/<split>/class_<k>/<nnnn>.png``.  Each class has its own
    dominant colour, so a tiny CNN trained from scratch gets well above
    chance within an epoch or two.  Output depends only on the arguments.
    A split named ``"train"`` gets ``train_per_class`` images per class;
    every other split gets ``val_per_class``.
    """
    root = Path(root)
    for split_no, split in enumerate(splits):
        per_class = train_per_class if split == "train" else val_per_class
        for cls in range(num_classes):
            # Independent stream per (split, class) so counts in one split do
            # not change the pixels in another.
            rng = np.random.default_rng([seed, split_no, cls])
            cls_dir = root / split / f"class_{cls}"
            cls_dir.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                _make_image(rng, cls, size).save(cls_dir / f"{i:04d}.png")
    return root


def run_cli(
    script: str,
    *args,
    cwd=None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run ``python <repo>/<script> *args`` and capture its text output."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, str(REPO_ROOT / script), *(str(a) for a in args)]
    return subprocess.run(
        cmd,
        cwd=str(cwd) if cwd is not None else None,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _python_default_warning_filters() -> None:
    """The filters a fresh interpreter starts with (no -W, no dev mode)."""
    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__", append=True)
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category, append=True)
    warnings.simplefilter("default", append=True)  # the interpreter's default action


@contextlib.contextmanager
def _capture_fds():
    """Point file descriptors 1 and 2 at temporary files; yields {fd: file}."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}
    saved = {fd: os.dup(fd) for fd in files}
    try:
        for fd, f in files.items():
            os.dup2(f.fileno(), fd)
        yield files
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, keep in saved.items():
            os.dup2(keep, fd)
            os.close(keep)


def run_in_process(main: Callable[[list], int], script: str, *args) -> subprocess.CompletedProcess:
    """Call an entry point's ``main(argv)`` in this process, captured as ``run_cli`` captures
    ``python <script> *args``; returns the same kind of result.

    Output is captured at the Python level and at the file-descriptor level (C/C++ messages,
    forked workers). Python warnings are recorded under a fresh interpreter's filters and
    appended to stderr as the interpreter would print them. The 'ematrain' logger loses its
    handlers for the call, so ``setup_logging`` binds a new one to the captured stderr; the old
    ones (and the level) come back afterwards. An exception that escapes ``main`` becomes exit
    code 1 with its traceback on stderr, as in a process; SystemExit gives its code. The global
    random states (random, numpy, torch) are restored afterwards.
    """
    import random

    import torch

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    logger = logging.getLogger("ematrain")
    saved_log = (list(logger.handlers), logger.level, logger.propagate)
    saved_rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        logger.handlers = []
        with _capture_fds() as fds, warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            _python_default_warning_filters()
            try:
                rc = main(argv)
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    rc = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
                    rc = 1
            except Exception:
                traceback.print_exc()
                rc = 1
        for w in caught:
            err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
        fd_text = {}
        for fd, f in fds.items():
            f.seek(0)
            fd_text[fd] = f.read().decode("utf-8", errors="replace")
            f.close()
    finally:
        for handler in logger.handlers:
            if handler not in saved_log[0]:
                handler.close()
        logger.handlers = saved_log[0]
        logger.setLevel(saved_log[1])
        logger.propagate = saved_log[2]
        random.setstate(saved_rng[0])
        np.random.set_state(saved_rng[1])
        torch.set_rng_state(saved_rng[2])
    return subprocess.CompletedProcess([script, *argv], rc, out.getvalue() + fd_text[1],
                                       err.getvalue() + fd_text[2])


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """torch on `n` intra-op threads for the block, as OMP_NUM_THREADS=n gives a subprocess."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_jobs(jobs: dict, as_process: Sequence[str] = (), workers: int = 2) -> dict:
    """Run {name: (script, args)} and return {name: CompletedProcess}.

    Jobs named in `as_process` run as real `python <script>` processes, concurrently; the others
    run in-process meanwhile through the script's ``main(argv)``. torch gets one thread in every
    case, so in-process numbers match those of a one-thread subprocess.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ematrain.cli import train, validate
    entry_points = {"train.py": train.main, "validate.py": validate.main}
    with pytest.MonkeyPatch.context() as mp, torch_threads(1):
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MKL_NUM_THREADS", "1")
        with ThreadPoolExecutor(workers) as pool:
            futures = {name: pool.submit(run_cli, script, *args)
                       for name, (script, args) in jobs.items() if name in as_process}
            done = {name: run_in_process(entry_points[script], script, *args)
                    for name, (script, args) in jobs.items() if name not in as_process}
            done.update((name, f.result()) for name, f in futures.items())
    return done


def tiny_args(*extra, batch: int | None = 4, epochs: int | None = 1, lr: str | None = "0.05",
              warmup: int | None = 0, workers: int | None = 0, size: int = 32) -> list[str]:
    """The flags of the tiny runs the tests train: timm's `test_resnet` at `size` px, batch
    `batch`, `epochs` epochs, `--lr`, no LR warmup, loaders in the main process (`-j 0`); a
    keyword given as None leaves its flag out (train.py's default holds). `extra` follows."""
    args = ["--model", "test_resnet", "--img-size", str(size)]
    for flag, value in (("-b", batch), ("-j", workers), ("--epochs", epochs),
                        ("--warmup-epochs", warmup), ("--lr", lr)):
        if value is not None:
            args += [flag, str(value)]
    return args + [str(a) for a in extra]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A session-wide 3-class tree with 8 training and 4 validation images per class: 6 steps of
    batch 4 per epoch. Tests only read it."""
    return make_imagefolder(tmp_path_factory.mktemp("small_data") / "data", num_classes=3,
                            train_per_class=8, val_per_class=4)


@pytest.fixture
def one_thread_no_plots(monkeypatch):
    """One torch thread (on a shared 2-core machine oversubscribed threads are several times
    slower), and no curves.png, which costs a matplotlib import per epoch where it is not under
    test. Use with ``pytestmark = pytest.mark.usefixtures("one_thread_no_plots")``."""
    from ematrain.run import curves
    monkeypatch.setattr(curves.CurveRenderer, "submit", lambda *a, **k: None)
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A session-wide 3-class train/val ImageFolder tree (24/8 images per class)."""
    return make_imagefolder(tmp_path_factory.mktemp("tiny_data") / "data")


# ----------------------------------------------------------------------------- runs in-process
def make_training(argv):
    """The `Training` train.py would run for `argv` (no resume), built in this process."""
    from ematrain.run.build import build_run
    from ematrain.run.training import Training
    from ematrain.settings.train_specs import train_settings
    return Training(build_run(train_settings([str(a) for a in argv])))


def run_epochs(tr, out, epochs: int = 1) -> list[dict]:
    """Train and validate `epochs` epochs through `Training.run_epoch` (the call `fit` makes),
    writing into `out`; returns the summary rows so far."""
    tr.run_dir = Path(out)
    tr.run_dir.mkdir(parents=True, exist_ok=True)
    tr.run.keeper.run_dir = tr.run_dir
    start = tr.run.counters.epoch
    for epoch in range(start, start + epochs):
        assert tr.run_epoch(epoch, lambda: False) is None
    tr.run.keeper.wait()  # the files are written in the background
    return tr.run.summary.rows


def assert_files_agree_with_records(run_dir: Path) -> None:
    """The best and history files hold the epochs that last.pth.tar's records name, no other
    history file is left, and no mid-epoch recovery file outlives the epoch's end."""
    import torch

    from ematrain.run.weight_sets import weight_sets
    last = torch.load(run_dir / "last.pth.tar", weights_only=True)
    best = last["keeper"]["best"]
    meta = last.get("ema") or {}
    sets = weight_sets(meta.get("decays", []), names=meta.get("names"),
                       primary=last["args"].get("primary_weights", "raw"))
    files = {s.best_file: best[s.name]["epoch"] for s in sets if s.best_file and s.name in best}
    assert "model_best.pth.tar" in files
    files.update({f"checkpoint-{e}.pth.tar": e for _, e in last["keeper"]["history"]})
    rows = {r["epoch"]: r for r in last["summary"]["rows"]}
    for name, epoch in files.items():  # (timm's files, continued by a run, hold a Namespace)
        with torch.serialization.safe_globals([argparse.Namespace]):
            held = torch.load(run_dir / name, weights_only=True, mmap=True)
        assert held["epoch"] == epoch, name
        # The same epoch of this run, not of another continuation: the same summary row
        # (timm's own files, kept by a run that continued timm's, have no summary).
        if "summary" in held:
            assert [r for r in held["summary"]["rows"] if r["epoch"] == epoch] == [rows[epoch]], name
    on_disk = sorted(p.name for p in run_dir.glob("checkpoint-*.pth.tar"))
    assert on_disk == sorted(n for n in files if n.startswith("checkpoint-"))
    if not last["counters"]["epoch_step"]:
        assert not (run_dir / "recovery.pth.tar").exists()



def wait_for_checkpoint(path: Path, proc, timeout: float = 240) -> dict:
    """Wait until `path` is a whole checkpoint on disk (written in the background after the
    log line that announces its epoch), while `proc` lives; returns its counters."""
    import time

    import torch
    deadline = time.time() + timeout
    while True:
        if path.is_file():  # renamed into place whole, or not at all
            return torch.load(path, weights_only=True, mmap=True)["counters"]
        assert proc.poll() is None, f"the run ended without {path}"
        assert time.time() < deadline, f"no {path} in time"
        time.sleep(0.02)


def assert_quit_names_the_files(text: str) -> Path:
    """The second Ctrl-C's message names the newest complete checkpoint and its position; that
    file is on disk, whole, at that position. Returns its path."""
    import re

    import torch
    found = re.search(r"again: quitting at once; the newest complete checkpoint is (.+?) "
                      r"\((?:end of epoch (\d+)|epoch (\d+), step (\d+))\)", text)
    assert found, text[-3000:]
    path = Path(found.group(1))
    counters = torch.load(path, weights_only=True)["counters"]
    if found.group(2) is not None:
        assert (counters["epoch"] - 1, counters["epoch_step"]) == (int(found.group(2)), 0)
    else:
        assert (counters["epoch"], counters["epoch_step"]) == (int(found.group(3)),
                                                               int(found.group(4)))
    return path
