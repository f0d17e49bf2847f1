"""Nothing lost, no traceback: a diverging run, a failing disk, unsafe checkpoints, and a
table-driven CLI fuzz."""
from __future__ import annotations

import errno
import os
import random

import pytest
import torch
from conftest import run_cli

from ematrain import checkpoint as ckpt_io
from ematrain import train as train_mod

TINY = ["--model", "test_resnet", "--img-size", "32", "-b", "4", "--epochs", "1",
        "--warmup-epochs", "0", "--lr", "0.05", "-j", "0"]


@pytest.fixture(scope="module")
def data_root(small_data):
    return small_data


def test_diverging_run_exits_1_and_keeps_last_good_checkpoint(data_root, tmp_path):
    # lr 1e30 turns the weights into Inf after the first update of epoch 1.
    out = tmp_path / "out"
    r = run_cli("train.py", data_root, *TINY, "--epochs", "1", "--output", out, "--experiment", "x")
    assert r.returncode == 0, r.stderr
    good = torch.load(out / "train/x/last.pth.tar", weights_only=True)
    r = run_cli("train.py", data_root, *TINY, "--epochs", "2", "--output", out, "--experiment", "x",
                "--resume", "auto", "--lr", "1e30", "--no-resume-opt", "--log-interval", "1")
    assert r.returncode == 1
    assert "non-finite loss at epoch 1, step" in r.stderr and "Traceback" not in r.stderr
    kept = torch.load(out / "train/x/last.pth.tar", weights_only=True)
    assert kept["epoch"] == 0
    assert all(torch.equal(good["state_dict"][k], kept["state_dict"][k]) for k in good["state_dict"])


def test_full_disk_keeps_previous_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert train_mod.main([str(data_root), *TINY, "--output", str(out), "--experiment", "d"]) == 0
    last = out / "train/d/last.pth.tar"
    good = last.read_bytes()

    def no_space(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", no_space)
    rc = train_mod.main([str(data_root), *TINY, "--epochs", "2", "--output", str(out),
                         "--experiment", "d", "--resume", "auto"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "No space left on device" in err and "previous checkpoint is intact" in err
    assert last.read_bytes() == good
    assert not list(last.parent.glob(".*.tmp"))


def test_output_path_that_is_a_file_is_a_clear_error(data_root, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    r = run_cli("train.py", data_root, *TINY, "--output", blocker / "out")
    assert r.returncode == 2
    assert "cannot create output directory" in r.stderr and "Traceback" not in r.stderr


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("flag", ["--resume", "--initial-checkpoint"])
def test_checkpoint_with_pickled_code_is_refused(data_root, tmp_path, flag):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "epoch": 0, "payload": _Marker(str(marker))}, evil)
    assert not marker.exists()
    r = run_cli("train.py", data_root, *TINY, "--output", tmp_path / "o", flag, evil)
    assert r.returncode == 2
    assert "refusing" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.pth.tar"))


# --------------------------------------------------------------------------- CLI fuzz
VALID = [
    ["--epochs", "1"], ["--model-ema"], ["--model-ema-decay", "0.9"], ["--model-ema-decay", "0.5", "0.9"],
    ["--model-ema-half-life", "1ep"], ["--model-ema-every", "2"], ["--model-ema-warmup"],
    ["--model-ema-force-cpu"], ["--sched", "step"], ["--opt", "adamw"], ["--smoothing", "0"],
    ["--grad-accum-steps", "2"], ["--hflip", "0"], ["--eval-metric", "loss"], ["-vb", "3"],
    ["--checkpoint-hist", "1"], ["--clip-grad", "1.0"], ["--mixup", "0.2"],
]
INVALID = [
    ["--model-ema-decay", "1.5"], ["--model-ema-decay", "0"], ["-b", "0"], ["--epochs", "-1"],
    ["-j", "-3"], ["--model", "no_such_model_x"], ["--num-classes", "9"], ["--lr", "-1"],
    ["--model-ema-half-life", "3weeks"], ["--model-ema-every", "0"], ["--eval-metric", "f1"],
    ["--grad-accum-steps", "0"], ["--hflip", "2"], ["--opt", "not_an_optimizer"],
    ["--sched", "not_a_schedule"], ["--mixup", "0.2", "-b", "3"], ["--amp", "--amp-dtype", "float16"],
    ["--model-ema-decay", "0.9", "--model-ema-half-life", "1ep"], ["--input-size", "3", "32"],
    ["--batch-size", "x"], ["--unknown-flag"],
]


def _combos(n, seed=1234):
    rng = random.Random(seed)
    for i in range(n):
        flags = []
        for extra in rng.sample(VALID, rng.randint(0, 3)):
            flags += extra
        expect_bad = i % 2 == 1
        if expect_bad:
            flags += rng.choice(INVALID)
        yield i, flags, expect_bad


@pytest.mark.parametrize("i,flags,expect_bad", list(_combos(16)))
def test_cli_fuzz_exit_codes_and_no_partial_files(data_root, tmp_path, capsys, i, flags, expect_bad):
    out = tmp_path / "out"
    rc = train_mod.main([str(data_root), *TINY, "--output", str(out), "--experiment", f"f{i}", *flags])
    err = capsys.readouterr().err
    assert rc == (2 if expect_bad else 0), err
    if expect_bad:
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
        assert not out.exists() or not any(out.rglob("*")), "a rejected run wrote files"
    else:
        run_dir = out / "train" / f"f{i}"
        assert (run_dir / "last.pth.tar").is_file() and (run_dir / "summary.csv").is_file()
        torch.load(run_dir / "last.pth.tar", weights_only=True)
    assert not list(tmp_path.rglob("*.tmp"))


# --------------------------------------------------------------------------- the run folder
def test_a_live_run_folder_is_refused_to_a_second_process(data_root, tmp_path, capsys):
    from ematrain import outputs
    holder = outputs.RunFolder.open(tmp_path / "train" / "same", resuming=True)
    try:
        rc = train_mod.main([str(data_root), *TINY, "--output", str(tmp_path), "--experiment",
                             "same", "--resume", "auto"])
        err = capsys.readouterr().err
        assert rc == 2 and f"is in use by another process (pid {os.getpid()})" in err
        # A new run with the same name takes the next free folder instead.
        assert train_mod.main([str(data_root), *TINY, "--output", str(tmp_path),
                               "--experiment", "same"]) == 0
        assert (tmp_path / "train" / "same-1" / "last.pth.tar").is_file()
    finally:
        holder.close()
    assert not (tmp_path / "train" / "same" / outputs.LOCK).exists()


def test_a_lock_left_by_a_killed_run_does_not_block(data_root, tmp_path):
    run = tmp_path / "train" / "x"
    run.mkdir(parents=True)
    (run / ".ematrain.lock").write_text("12345\n")  # its process is gone: no flock is held
    assert train_mod.main([str(data_root), *TINY, "--output", str(tmp_path), "--experiment", "x",
                           "--resume", "auto"]) == 0
    assert (run / "last.pth.tar").is_file() and not (run / ".ematrain.lock").exists()


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a/b", ".."])
def test_an_experiment_name_that_is_a_path_is_refused(data_root, tmp_path, capsys, name):
    rc = train_mod.main([str(data_root), *TINY, "--output", str(tmp_path / "o"), "--experiment",
                         name])
    assert rc == 2 and "must be a folder name, not a path" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()


def test_an_experiment_named_like_a_file_takes_the_next_name(data_root, tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "e").write_text("x")
    assert train_mod.main([str(data_root), *TINY, "--output", str(tmp_path),
                           "--experiment", "e"]) == 0
    assert (tmp_path / "train" / "e-1" / "last.pth.tar").is_file()
    rc = train_mod.main([str(data_root), *TINY, "--output", str(tmp_path), "--experiment", "e",
                         "--resume", str(tmp_path / "train" / "e")])
    assert rc == 2 and "Traceback" not in capsys.readouterr().err
