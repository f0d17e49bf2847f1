"""Exact resume: a real train.py killed (SIGKILL) or interrupted (SIGINT) and resumed ends with
bit-identical weights, EMA shadows, summary rows and post-hoc snapshots as the same run
uninterrupted."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO_ROOT,
    assert_files_agree_with_records,
    assert_quit_names_the_files,
    make_imagefolder,
    run_cli,
    tiny_args,
    wait_for_checkpoint,
)

EPOCHS = 3
_BASE = tiny_args("--drop", "0.2", "--model-ema", "--model-ema-decay", "0.9", "0.99", "--seed", "7",
                  "--log-interval", "1", batch=8, epochs=EPOCHS, workers=None)
# Post-hoc snapshots, at steps that recovery saves (--recovery-interval 3) share.
_POSTHOC = ["--model-ema-posthoc", "--model-ema-snapshot-every", "3it"]
COMMON = _BASE + _POSTHOC


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("resume") / "data", num_classes=3,
                            train_per_class=16, val_per_class=6)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = run_cli("train.py", data_root, *COMMON, "-j", "0", "--output", out, "--experiment", "ref")
    assert r.returncode == 0, r.stderr
    return out / "ref"


def _popen(data_root, out, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), str(data_root), *COMMON,
                             "--output", str(out), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _assert_same_run(run_dir: Path, ref_dir: Path) -> None:
    a = torch.load(ref_dir / "last.pth.tar", weights_only=True)
    b = torch.load(run_dir / "last.pth.tar", weights_only=True)
    assert a["epoch"] == b["epoch"] == EPOCHS - 1
    for key in ("state_dict", "state_dict_ema", "state_dict_ema_1"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert a["ema"]["steps"] == b["ema"]["steps"]
    assert a["counters"] == b["counters"]
    ref_rows = (ref_dir / "summary.csv").read_text().splitlines()
    rows = (run_dir / "summary.csv").read_text().splitlines()
    assert rows == ref_rows
    assert [r.split(",")[0] for r in rows[1:]] == [str(e) for e in range(EPOCHS)]
    assert not list(run_dir.glob(".*.tmp"))
    assert_files_agree_with_records(run_dir)
    _assert_same_snapshots(run_dir, ref_dir)


def _assert_same_snapshots(run_dir: Path, ref_dir: Path) -> None:
    """The post-hoc series of the interrupted run is the uninterrupted one's, file for file."""
    names = sorted(p.name for p in (ref_dir / "posthoc").iterdir())
    assert names == sorted(p.name for p in (run_dir / "posthoc").iterdir())
    assert len(names) == 6  # 18 steps, one snapshot every 3
    for name in names:
        a = torch.load(ref_dir / "posthoc" / name, weights_only=True)
        b = torch.load(run_dir / "posthoc" / name, weights_only=True)
        assert (a["step"], a["updates"]) == (b["step"], b["updates"])
        for x, y in zip(a["shadows"], b["shadows"]):
            assert all(torch.equal(x[k], y[k]) for k in x), name


STEPS = 6  # 3 classes x 16 training images / batch 8


@pytest.mark.parametrize("workers,recovery", [("0", None), ("2", "3")])
def test_sigkill_then_resume_is_bit_identical(data_root, reference, tmp_path, workers, recovery):
    extra = ["-j", workers, "--experiment", "run"]
    if recovery:
        extra += ["--recovery-interval", recovery]
    # An arbitrary moment after the first checkpoint: just after some step of epoch 1 or 2
    # (epoch 1's last is followed by its validation and save), short of the run's last step.
    rng = random.Random()
    epoch, step = rng.choice([(1, s) for s in range(1, STEPS + 1)]
                             + [(2, s) for s in range(1, STEPS)])
    delay = rng.uniform(0.0, 0.05)
    where = f"killed after step {step} of epoch {epoch} + {delay * 1e3:.0f} ms"
    proc = _popen(data_root, tmp_path, *extra)
    run_dir = tmp_path / "run"
    deadline = time.time() + 300
    for line in proc.stdout:  # --log-interval 1: a progress line per step
        if f"train {epoch} [{step}/" in line:
            break
    while not (run_dir / "last.pth.tar").exists():
        assert proc.poll() is None and time.time() < deadline, f"no first checkpoint ({where})"
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was {where}"
    r = run_cli("train.py", data_root, *COMMON, "--output", tmp_path, "--resume", "auto", *extra)
    assert r.returncode == 0, f"{where}: {r.stderr}"
    assert "resumed from" in r.stderr, where
    _assert_same_run(run_dir, reference)


def test_sigint_saves_mid_epoch_and_resume_is_bit_identical(data_root, reference, tmp_path):
    proc = _popen(data_root, tmp_path, "-j", "0", "--experiment", "run")
    output = []
    for line in proc.stdout:
        output.append(line)
        if "train 1 [3/" in line:
            proc.send_signal(signal.SIGINT)
    proc.wait()
    text = "".join(output)
    assert proc.returncode == 130, text
    assert "--resume" in text and "last.pth.tar" in text
    run_dir = tmp_path / "run"
    ckpt = torch.load(run_dir / "last.pth.tar", weights_only=True)
    assert ckpt["counters"]["epoch"] == 1 and ckpt["counters"]["epoch_step"] >= 3
    rows = (run_dir / "summary.csv").read_text().splitlines()
    assert len(rows) == 2  # header + epoch 0: the interrupted epoch is not reported
    r = run_cli("train.py", data_root, *COMMON, "-j", "0", "--output", tmp_path,
                "--experiment", "run", "--resume", str(run_dir / "last.pth.tar"))
    assert r.returncode == 0, r.stderr
    _assert_same_run(run_dir, reference)


def test_second_ctrl_c_quits_at_once_leaving_good_files(data_root, tmp_path):
    proc = _popen(data_root, tmp_path, "-j", "0", "--experiment", "run")
    run_dir = tmp_path / "run"
    output = []
    for line in proc.stdout:
        output.append(line)
        if "train 1 [2/" in line:
            break
    # Epoch 0's checkpoint may still be in the background writer: the second press would
    # abandon it. Wait for the file, then press twice.
    wait_for_checkpoint(run_dir / "last.pth.tar", proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    output.append(proc.stdout.read())
    proc.wait(timeout=120)
    text = "".join(output)
    assert proc.returncode == 130, text[-3000:]
    if "again: quitting at once" in text:
        assert_quit_names_the_files(text)  # whole, loadable, where the message says
    else:  # both presses arrived before the first was seen: they count once, a graceful stop
        stop = re.search(r"stopped (?:at epoch (\d+), step (\d+)|after epoch (\d+)); saved "
                         r"(\S+)\. Resume", text)
        assert stop, text[-3000:]
        c = torch.load(stop.group(4), weights_only=True)["counters"]
        assert (c["epoch"], c["epoch_step"]) == ((int(stop[1]), int(stop[2])) if stop[1]
                                                 else (int(stop[3]) + 1, 0))
    assert not list(run_dir.glob("*.tmp"))


def test_resume_without_matching_ema_state_is_a_clear_error(data_root, reference, tmp_path):
    r = run_cli("train.py", data_root, *_BASE[:-4], *_POSTHOC, "--model-ema-decay", "0.9", "-j", "0",
                "--output", tmp_path, "--experiment", "x", "--resume", reference / "last.pth.tar")
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip() and "error" in l]
    assert len(lines) == 1 and "EMA" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_a_kill_between_the_last_checkpoint_and_its_summary_line_loses_no_row(
        data_root, reference, tmp_path):
    """The race the SIGKILL test can hit by chance, made certain: the finished run's last
    summary.csv line is missing, as if killed right after last.pth.tar was written."""
    import shutil
    run_dir = tmp_path / "ref"
    shutil.copytree(reference, run_dir)
    summary = run_dir / "summary.csv"
    lines = summary.read_text().splitlines()
    summary.write_text("\n".join(lines[:-1]) + "\n")
    r = run_cli("train.py", data_root, *COMMON, "-j", "0", "--output", tmp_path,
                "--experiment", "ref", "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert summary.read_text().splitlines() == lines
