"""Ctrl-C and SIGTERM, as a terminal sends them to a real run (to its whole process group, loader
workers included): one message; the first press stops after the current step without starting a
validation pass; the second quits within a second even inside a long step; files stay whole."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import (
    REPO_ROOT,
    assert_files_agree_with_records,
    assert_quit_names_the_files,
    make_imagefolder,
    tiny_args,
    wait_for_checkpoint,
)

# One optimizer step per epoch that takes about two seconds on one CPU thread.
SLOW = ["--model", "resnet18", "--img-size", "192", "-b", "24", "-j", "2", "--epochs", "4",
        "--warmup-epochs", "0", "--lr", "0.01", "--log-interval", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("interrupts") / "data", num_classes=3,
                            train_per_class=8, val_per_class=2, size=48)


class Run:
    """train.py in a session of its own; its output is collected line by line."""

    def __init__(self, data, out, *extra):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "train.py"), str(data), *SLOW, "--output", str(out),
             "--experiment", "x", *extra], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.run_dir = out / "x"

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            assert time.time() < deadline, f"no {text!r} in time"
            time.sleep(0.02)

    def press(self, sig=signal.SIGINT) -> None:
        """As a terminal does: the signal goes to the whole process group."""
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 120) -> str:
        self.proc.wait(timeout=timeout)
        self.ended = time.time()
        self.reader.join(timeout=10)
        return "".join(self.lines)


def test_a_second_ctrl_c_quits_within_a_second_inside_a_long_step(data, tmp_path):
    """The second press abandons a write in progress and says which complete checkpoint the
    disk holds: that file, at that position."""
    run = Run(data, tmp_path)
    run.wait_for("epoch 0 (1/4)")
    # Epoch 0's checkpoint is written in the background after its line: wait for the file,
    # then a moment for a step of a later epoch to be under way.
    wait_for_checkpoint(run.run_dir / "last.pth.tar", run.proc)
    time.sleep(0.5)
    run.press()
    time.sleep(0.3)
    pressed = time.time()
    run.press()
    text = run.finish()
    quit_after = run.ended - pressed
    assert run.proc.returncode == 130, text[-3000:]
    assert quit_after < 1.0, f"took {quit_after:.2f} s to quit"
    assert text.count("SIGINT received") == 1, text  # not once per loader worker
    assert "SIGINT again: quitting at once" in text and "Traceback" not in text
    assert assert_quit_names_the_files(text) == run.run_dir / "last.pth.tar"
    assert not [p for p in run.run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_stop_during_the_last_step_saves_without_validating(data, tmp_path):
    run = Run(data, tmp_path)
    run.wait_for("epoch 0 (1/4)")
    time.sleep(0.5)
    run.press(signal.SIGTERM)
    text = run.finish()
    assert run.proc.returncode == 143, text[-3000:]
    assert "epoch 1 (2/4)" not in text  # epoch 1 was trained, not validated
    assert "stopped at epoch 1, step 1" in text and "Traceback" not in text
    ckpt = torch.load(run.run_dir / "last.pth.tar", weights_only=True)
    assert ckpt["counters"]["epoch"] == 1 and ckpt["counters"]["epoch_step"] == 1
    assert len((run.run_dir / "summary.csv").read_text().splitlines()) == 2


FAST = tiny_args("--model-ema", "--model-ema-decay", "0.9", "--checkpoint-hist", "2",
                 "--recovery-interval", "2", "--experiment", "b", "--resume", "auto", epochs=3)


def run_with_hook(hook: str, data, out, timeout=300):
    """train.py FAST with `hook` (Python run first, with `train` and `keeper` imported)."""
    script = out / "hooked.py"
    script.write_text("import os, signal, sys, time\n"
                      f"sys.path.insert(0, {str(REPO_ROOT / 'src')!r})\n"
                      "from ematrain.cli import train\nfrom ematrain.run import keeper\n" + hook +
                      "\nsys.exit(train.main())\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, script, data, *FAST, "--output", out], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_kill_right_after_the_last_checkpoint_is_repaired_on_resume(small_data, tmp_path):
    """Killed (SIGKILL) just after the final epoch's last.pth.tar is in place, before its best
    and history copies: the next run with the same command repairs the files, although no epoch
    is left to train."""
    hook = ("real = keeper.CheckpointKeeper.save_epoch\n"
            "def save_epoch(self, epoch, ckpt, improved, then=None):\n"
            "    if epoch == 2:\n"
            "        self.wait()\n"
            "        self._write(keeper.LAST, keeper.host_copy(ckpt))\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(self, epoch, ckpt, improved, then)\n"
            "keeper.CheckpointKeeper.save_epoch = save_epoch\n")
    killed = run_with_hook(hook, small_data, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / "b"
    assert (run_dir / "recovery.pth.tar").is_file()  # left over by the kill
    again = subprocess.run([sys.executable, REPO_ROOT / "train.py", small_data, *FAST,
                            "--output", tmp_path], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "repaired to agree with the records in" in again.stderr
    assert_files_agree_with_records(run_dir)


def test_a_second_ctrl_c_during_a_checkpoint_write_exits_130_with_the_old_file(small_data,
                                                                                tmp_path):
    hook = ("import torch\n"
            "real = torch.save\n"
            "calls = []\n"
            "def slow_save(obj, f, *a, **k):\n"
            "    calls.append(1)\n"
            "    if isinstance(obj, dict) and obj.get('epoch') == 1:\n"
            "        open(f, 'wb').write(b'partial')\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        time.sleep(0.3)\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        time.sleep(30)\n"
            "    return real(obj, f, *a, **k)\n"
            "torch.save = slow_save\n")
    started = time.time()
    r = run_with_hook(hook, small_data, tmp_path)
    assert r.returncode == 130, r.stderr[-2000:]
    assert time.time() - started < 25 and "Traceback" not in r.stderr
    assert "SIGINT again: quitting at once" in r.stderr
    assert "the write in progress is abandoned" in r.stderr
    run_dir = tmp_path / "b"
    # The newest complete one: epoch 1's recovery file (--recovery-interval 2), not the last.pth.tar
    # of epoch 1 being written.
    assert assert_quit_names_the_files(r.stderr) == run_dir / "recovery.pth.tar"
    assert torch.load(run_dir / "last.pth.tar", weights_only=True)["epoch"] == 0  # whole
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
