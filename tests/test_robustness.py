"""Nothing lost, no traceback: a diverging run, a failing disk, unsafe checkpoints, and a
table-driven CLI fuzz."""
from __future__ import annotations

import errno
import os
import random
import subprocess

import pytest
import torch
from conftest import run_cli, tiny_args

from ematrain.checkpoint import files as ckpt_files
from ematrain.cli import train as train_mod

TINY = tiny_args()


def test_diverging_run_exits_1_and_keeps_last_good_checkpoint(small_data, tmp_path):
    # lr 1e30 turns the weights into Inf after the first update of epoch 1; the EMA averages
    # them in (no precheck), and the run stops before the shadows are validated or saved.
    out = tmp_path / "out"
    r = run_cli("train.py", small_data, *TINY, "--epochs", "1", "--output", out, "--experiment",
                "x", "--model-ema", "--model-ema-decay", "0.9")
    assert r.returncode == 0, r.stderr
    good = torch.load(out / "x/last.pth.tar", weights_only=True)
    r = run_cli("train.py", small_data, *TINY, "--epochs", "2", "--output", out, "--experiment",
                "x", "--resume", "auto", "--lr", "1e30", "--no-resume-opt", "--log-interval", "1")
    assert r.returncode == 1
    assert "non-finite loss at epoch 1, step" in r.stderr and "Traceback" not in r.stderr
    kept = torch.load(out / "x/last.pth.tar", weights_only=True)
    assert kept["epoch"] == 0
    for key in ("state_dict", "state_dict_ema"):
        assert all(torch.equal(good[key][k], kept[key][k]) for k in good[key])


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    # What torch's zip writer raises when the file's write fails part-way.
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
])
def test_full_disk_keeps_previous_checkpoint(small_data, tmp_path, monkeypatch, capsys, failure):
    out = tmp_path / "out"
    assert train_mod.main([str(small_data), *TINY, "--output", str(out), "--experiment", "d"]) == 0
    last = out / "d/last.pth.tar"
    good = last.read_bytes()

    def no_space(obj, f, *a, **k):
        open(f, "wb").write(b"partial")  # torch.save gets the temporary file's path
        raise failure

    monkeypatch.setattr(ckpt_files.torch, "save", no_space)
    capsys.readouterr()
    rc = train_mod.main([str(small_data), *TINY, "--epochs", "2", "--output", str(out),
                         "--experiment", "d", "--resume", "auto"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "previous checkpoint is intact" in errors[0]
    assert str(failure).split(" vs")[0].split("] ")[-1] in errors[0] or "No space" in errors[0]
    assert last.read_bytes() == good
    assert not list(last.parent.glob(".*.tmp"))


def test_a_full_disk_before_any_checkpoint_says_none_was_saved(small_data, tmp_path,
                                                               monkeypatch, capsys):
    def no_space(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_files.torch, "save", no_space)
    capsys.readouterr()
    rc = train_mod.main([str(small_data), *TINY, "--output", str(tmp_path / "out"),
                         "--experiment", "d"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0], err
    assert "no checkpoint of this run was saved before it" in errors[0]
    assert "intact" not in errors[0]


def test_a_really_full_disk_is_one_line_and_resume_too(small_data, tmp_path):
    """On a 3 MB tmpfs the first checkpoint does not fit: one line, exit 1; `--resume auto`
    afterwards is one line too. (Needs the right to mount; skipped without it.)"""
    import shutil
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        base = [small_data, *TINY, "--model", "resnet18", "--output", mount, "--experiment", "f"]
        r = run_cli("train.py", *base)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith("train.py: error: cannot write")
        again = run_cli("train.py", *base, "--resume", "auto")
        assert again.returncode in (1, 2) and "Traceback" not in again.stderr, again.stderr
        assert again.stderr.strip().splitlines()[-1].startswith("train.py: error:")
        assert not [p for p in mount.rglob("*") if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_output_path_that_is_a_file_is_a_clear_error(small_data, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    r = run_cli("train.py", small_data, *TINY, "--output", blocker / "out")
    assert r.returncode == 2
    assert "cannot create output directory" in r.stderr and "Traceback" not in r.stderr


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("flag", ["--resume", "--initial-checkpoint"])
def test_checkpoint_with_pickled_code_is_refused(small_data, tmp_path, flag):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "epoch": 0, "payload": _Marker(str(marker))}, evil)
    assert not marker.exists()
    r = run_cli("train.py", small_data, *TINY, "--output", tmp_path / "o", flag, evil)
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
    ["HIDDEN"],  # a data tree with hidden files and folders (skipped, counted)
]
INVALID = [
    ["--model-ema-decay", "1.5"], ["--model-ema-decay", "0"], ["-b", "0"], ["--epochs", "-1"],
    ["-j", "-3"], ["--model", "no_such_model_x"], ["--num-classes", "9"], ["--lr", "-1"],
    ["--model-ema-half-life", "3weeks"], ["--model-ema-every", "0"], ["--eval-metric", "f1"],
    ["--grad-accum-steps", "0"], ["--hflip", "2"], ["--opt", "not_an_optimizer"],
    ["--sched", "not_a_schedule"], ["--mixup", "0.2", "-b", "3"], ["--amp", "--amp-dtype", "float16"],
    ["--model-ema-decay", "0.9", "--model-ema-half-life", "1ep"], ["--input-size", "3", "32"],
    ["--batch-size", "x"], ["--unknown-flag"],
    # Non-finite and extreme values, paths that escape, malformed files.
    ["--lr", "nan"], ["--weight-decay=inf"], ["--model-ema-half-life", "1e20it"],
    ["--model-ema-half-life", "1e-300it"], ["--model-ema-half-life", "1e309it"],
    ["--img-size", "100000"], ["--experiment", "../escape"], ["--cutmix-minmax", "0.9", "0.1"],
    ["--initial-checkpoint", "MALFORMED"], ["--resume", "MALFORMED"],
]


def _combos(n, seed=1234):
    rng = random.Random(seed)
    for i in range(n):
        flags = []
        for extra in rng.sample(VALID, rng.randint(0, 3)):
            flags += extra
        expect_bad = i % 2 == 1
        if expect_bad:
            flags += INVALID[i // 2]  # each invalid class once, among random valid flags
        yield i, flags, expect_bad


@pytest.fixture(scope="module")
def fuzz_inputs(small_data, tmp_path_factory):
    """The trees and files that the fuzz's placeholders stand for."""
    import shutil
    base = tmp_path_factory.mktemp("fuzz")
    hidden = base / "hidden"
    shutil.copytree(small_data, hidden)
    (hidden / "train" / ".ipynb_checkpoints").mkdir()
    (hidden / "train" / "class_0" / "._0000.png").write_bytes(b"\x00\x05\x16\x07")
    malformed = base / "malformed.pth.tar"
    torch.save({"epoch": "seven", "state_dict": "weights"}, malformed)
    return {"HIDDEN": hidden, "MALFORMED": malformed}


@pytest.mark.parametrize("i,flags,expect_bad", list(_combos(2 * len(INVALID))))
def test_cli_fuzz_exit_codes_and_no_partial_files(small_data, fuzz_inputs, tmp_path, capsys, i,
                                                  flags, expect_bad):
    out = tmp_path / "out"
    root = fuzz_inputs["HIDDEN"] if "HIDDEN" in flags else small_data
    flags = [str(fuzz_inputs.get(f, f)) for f in flags if f != "HIDDEN"]
    rc = train_mod.main([str(root), *TINY, "--output", str(out), "--experiment", f"f{i}", *flags])
    err = capsys.readouterr().err
    assert rc == (2 if expect_bad else 0), err
    if expect_bad:
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
        assert not out.exists() or not any(out.rglob("*")), "a rejected run wrote files"
    else:
        run_dir = out / f"f{i}"
        assert (run_dir / "last.pth.tar").is_file() and (run_dir / "summary.csv").is_file()
        torch.load(run_dir / "last.pth.tar", weights_only=True)
    assert not list(tmp_path.rglob("*.tmp"))


# --------------------------------------------------------------------------- the run folder
def test_a_live_run_folder_is_refused_to_a_second_process(small_data, tmp_path, capsys):
    from ematrain.run import folder
    holder = folder.RunFolder.open(tmp_path / "same", resuming=True)
    try:
        rc = train_mod.main([str(small_data), *TINY, "--output", str(tmp_path), "--experiment",
                             "same", "--resume", "auto"])
        err = capsys.readouterr().err
        assert rc == 2 and f"is in use by another process (pid {os.getpid()})" in err
        # A new run with the same name takes the next free folder instead.
        assert train_mod.main([str(small_data), *TINY, "--output", str(tmp_path),
                               "--experiment", "same"]) == 0
        assert (tmp_path / "same-1" / "last.pth.tar").is_file()
    finally:
        holder.close()
    assert not (tmp_path / "same" / folder.LOCK).exists()


def test_a_lock_left_by_a_killed_run_does_not_block(small_data, tmp_path):
    run = tmp_path / "x"
    run.mkdir(parents=True)
    (run / ".ematrain.lock").write_text("12345\n")  # its process is gone: no flock is held
    assert train_mod.main([str(small_data), *TINY, "--output", str(tmp_path), "--experiment", "x",
                           "--resume", "auto"]) == 0
    assert (run / "last.pth.tar").is_file() and not (run / ".ematrain.lock").exists()


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a/b", ".."])
def test_an_experiment_name_that_is_a_path_is_refused(small_data, tmp_path, capsys, name):
    rc = train_mod.main([str(small_data), *TINY, "--output", str(tmp_path / "o"), "--experiment",
                         name])
    assert rc == 2 and "must be a folder name, not a path" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()


def test_an_experiment_named_like_a_file_takes_the_next_name(small_data, tmp_path, capsys):
    (tmp_path / "e").write_text("x")
    assert train_mod.main([str(small_data), *TINY, "--output", str(tmp_path),
                           "--experiment", "e"]) == 0
    assert (tmp_path / "e-1" / "last.pth.tar").is_file()
    rc = train_mod.main([str(small_data), *TINY, "--output", str(tmp_path), "--experiment", "e",
                         "--resume", str(tmp_path / "e")])
    assert rc == 2 and "Traceback" not in capsys.readouterr().err


# --------------------------------------------------------------------------- malformed files
@pytest.fixture(scope="module")
def a_checkpoint(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("malformed")
    assert train_mod.main([str(small_data), *TINY, "--model-ema", "--model-ema-decay", "0.9",
                           "--output", str(out), "--experiment", "m"]) == 0
    return out / "m" / "last.pth.tar"


@pytest.mark.parametrize("change,words", [
    (lambda c: c.update(state_dict="weights"), ["'state_dict' must be a dict of tensors"]),
    (lambda c: c.update(epoch="seven"), ["'epoch' must be a whole number", "'seven'"]),
    (lambda c: c["ema"].update(keys=["state_dict_ema", "state_dict_ema_7"]),
     ["'ema' must be a mapping of decays and keys that name entries of the file"]),
    (lambda c: c.update(class_names="abc"), ["'class_names' must be a list of folder names"]),
    (lambda c: c.update(data_config=[1, 2]), ["'data_config' must be a mapping"]),
])
def test_a_malformed_checkpoint_is_one_line_everywhere(small_data, a_checkpoint, tmp_path, capsys,
                                                       change, words):
    from ematrain.cli import validate as validate_mod
    ckpt = torch.load(a_checkpoint, weights_only=True)
    change(ckpt)
    bad = tmp_path / "bad.pth.tar"
    torch.save(ckpt, bad)
    capsys.readouterr()
    for run in (lambda: validate_mod.main([str(small_data), "--checkpoint", str(bad),
                                           "--use-ema", "-j", "0"]),
                lambda: train_mod.main([str(small_data), *TINY, "--output", str(tmp_path / "o"),
                                        "--resume", str(bad)])):
        rc = run()
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, err
        (line,) = lines
        assert f"cannot read {bad}" in line and all(w in line for w in words), line


# --------------------------------------------------------------------------- checkpoint files
def test_best_and_history_files_are_links_of_their_epochs_checkpoint(small_data, tmp_path):
    assert train_mod.main([str(small_data), *TINY, "--model-ema", "--model-ema-decay", "0.9",
                           "--output", str(tmp_path), "--experiment", "l"]) == 0
    run = tmp_path / "l"
    last = os.stat(run / "last.pth.tar")
    for name in ("model_best.pth.tar", "model_best_raw.pth.tar", "checkpoint-0.pth.tar"):
        assert os.stat(run / name).st_ino == last.st_ino, name  # one physical file per epoch
    assert last.st_nlink == 4


def test_where_links_are_refused_the_files_are_copies(small_data, tmp_path, monkeypatch, capsys):
    from ematrain.run import checkpoint_files

    def no_links(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(checkpoint_files.os, "link", no_links)
    assert train_mod.main([str(small_data), *TINY, "--output", str(tmp_path), "--experiment",
                           "c"]) == 0
    assert capsys.readouterr().err.count("refuses hard links") == 1
    run = tmp_path / "c"
    assert os.stat(run / "model_best.pth.tar").st_ino != os.stat(run / "last.pth.tar").st_ino
    assert (run / "model_best.pth.tar").read_bytes() == (run / "last.pth.tar").read_bytes()


def test_runs_are_laid_out_as_timm_lays_them_out(small_data, tmp_path, monkeypatch):
    assert train_mod.main([str(small_data), *TINY, "--output", str(tmp_path / "runs"),
                           "--experiment", "e"]) == 0
    assert (tmp_path / "runs" / "e" / "last.pth.tar").is_file()  # <--output>/<experiment>
    monkeypatch.chdir(tmp_path)
    assert train_mod.main([str(small_data), *TINY, "--experiment", "d"]) == 0
    assert (tmp_path / "output" / "train" / "d" / "last.pth.tar").is_file()  # the default


def test_resume_auto_finds_a_run_in_the_earlier_layout(small_data, tmp_path):
    assert train_mod.main([str(small_data), *TINY, "--output", str(tmp_path / "x"),
                           "--experiment", "old"]) == 0
    old = tmp_path / "runs" / "train" / "old"  # <--output>/train/<experiment>, as it used to be
    old.parent.mkdir(parents=True)
    (tmp_path / "x" / "old").rename(old)
    assert train_mod.main([str(small_data), *TINY, "--epochs", "2", "--output",
                           str(tmp_path / "runs"), "--experiment", "old", "--resume", "auto"]) == 0
    assert torch.load(old / "last.pth.tar", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "runs" / "old").exists()
