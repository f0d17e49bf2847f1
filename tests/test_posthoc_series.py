"""One run's post-hoc series, consistent with its checkpoints across any stop: snapshots carry
their run's id and a series of two runs is refused by name; a fresh start clears what a run that
saved no checkpoint left; a resume from an older checkpoint destroys no snapshot a newer
checkpoint still needs; the sweep reads last.pth.tar's series and refuses one that does not
reach it; with --model-ema-every N a snapshot is taken only at a new EMA update count."""
from __future__ import annotations

import filecmp
import shutil

import pytest
import torch
from conftest import run_in_process, tiny_args, torch_threads

from ematrain.cli import train, validate
from ematrain.posthoc import series as series_mod
from ematrain.posthoc import snapshots
from ematrain.run import parts
from ematrain.run.keeper import LAST
from ematrain.util.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")

# 3 classes x 8 images, batch 4: 6 steps per epoch, 18 in all; a snapshot every 3 steps.
ARGS = tiny_args("--model-ema-posthoc", "--model-ema-snapshot-every", "3it", "--checkpoint-hist",
                 "3", epochs=3)


def train_run(*argv):
    with torch_threads(1):
        return run_in_process(train.main, "train.py", *argv)


@pytest.fixture(scope="module")
def finished(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("series")
    r = train_run(small_data, *ARGS, "--seed", "1", "--output", out, "--experiment", "a")
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "a"


@pytest.fixture(scope="module")
def other_seed(small_data, tmp_path_factory):
    """Another run of the same settings (seed 2), one epoch: snapshots at steps 3 and 6."""
    out = tmp_path_factory.mktemp("series_other")
    r = train_run(small_data, *ARGS, "--seed", "2", "--epochs", "1", "--output", out,
                  "--experiment", "b")
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "b"


def steps(run_dir) -> list[int]:
    return [s for s, _ in snapshots.snapshot_files(run_dir / snapshots.FOLDER)]


def run_ids(run_dir) -> set:
    return {torch.load(p, weights_only=True, mmap=True)["run_id"]
            for _, p in snapshots.snapshot_files(run_dir / snapshots.FOLDER)}


def test_every_snapshot_and_checkpoint_carries_the_run_id(finished):
    last = torch.load(finished / LAST, weights_only=True, mmap=True)
    assert isinstance(last["run_id"], str) and len(last["run_id"]) >= 8
    assert run_ids(finished) == {last["run_id"]}
    assert steps(finished) == [3, 6, 9, 12, 15, 18]


def test_the_sweep_refuses_a_series_of_two_runs_by_name(finished, other_seed, tmp_path):
    mixed = tmp_path / "a"
    shutil.copytree(finished, mixed)
    for step in (3, 6):  # the other seed's over the first half of the series
        name = snapshots.snapshot_name(step)
        shutil.copyfile(other_seed / snapshots.FOLDER / name, mixed / snapshots.FOLDER / name)
    with pytest.raises(UserError, match="mixes snapshots of 2 runs") as err:
        series_mod.read_series(mixed)
    assert snapshots.snapshot_name(3) in str(err.value)


def test_a_fresh_start_clears_the_snapshots_of_a_run_that_left_no_checkpoint(
        small_data, other_seed, tmp_path):
    # What a run killed (SIGKILL) before its first checkpoint leaves: args.yaml and snapshots.
    left = tmp_path / "x"
    (left / snapshots.FOLDER).mkdir(parents=True)
    shutil.copyfile(other_seed / "args.yaml", left / "args.yaml")
    for _, path in snapshots.snapshot_files(other_seed / snapshots.FOLDER):
        shutil.copyfile(path, left / snapshots.FOLDER / path.name)
    r = train_run(small_data, *ARGS, "--seed", "1", "--epochs", "1", "--output", tmp_path,
                  "--experiment", "x", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "removed 2 post-hoc snapshot(s)" in r.stderr and "starts its own series" in r.stderr
    new_id = torch.load(left / LAST, weights_only=True, mmap=True)["run_id"]
    assert run_ids(left) == {new_id} and steps(left) == [3, 6]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_snapshots(small_data, tmp_path):
    r = train_run(small_data, *ARGS, "--lr", "1e30", "--model-ema-snapshot-every", "1it",
                  "--log-interval", "1", "--output", tmp_path, "--experiment", "f")
    assert r.returncode == 1 and "non-finite loss" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "f").exists()


def test_a_resume_from_an_older_checkpoint_destroys_no_snapshot_until_superseded(
        finished, small_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "a"
    shutil.copytree(finished, run_dir)
    original = tmp_path / "original"
    shutil.copytree(finished / snapshots.FOLDER, original)
    # Back to epoch 0 with another learning rate, and the process dies at step 10 (after the
    # recovery save of step 9): last.pth.tar is still the first run's epoch 2.
    real = parts.Run.take_snapshot

    def dies_at_step_10(self):
        real(self)
        if self.counters.num_updates == 10:
            raise RuntimeError("killed")
    monkeypatch.setattr(parts.Run, "take_snapshot", dies_at_step_10)
    r = train_run("--resume", run_dir / "checkpoint-0.pth.tar", "--lr", "0.02",
                  "--recovery-interval", "3")
    assert r.returncode == 1 and "killed" in r.stderr, r.stderr[-2000:]
    assert "stay for the newer checkpoints" in r.stderr
    monkeypatch.setattr(parts.Run, "take_snapshot", real)
    # The first run's series is whole, and it is the series of last.pth.tar.
    assert steps(run_dir) == [3, 6, 9, 12, 15, 18]
    for _, path in snapshots.snapshot_files(run_dir / snapshots.FOLDER):
        assert filecmp.cmp(path, original / path.name, shallow=False), path.name
    series = series_mod.read_series(run_dir)
    assert [s.step for s in series.snapshots] == [3, 6, 9, 12, 15, 18]
    # --resume auto continues the newer recovery file of the second run, to its end.
    again = train_run("--resume", "auto", *ARGS, "--output", tmp_path, "--experiment", "a")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "recovery.pth.tar at epoch 1, step 3" in again.stderr
    assert steps(run_dir) == [3, 6, 9, 12, 15, 18]
    assert not list((run_dir / snapshots.FOLDER).glob(snapshots.FORK_PREFIX + "*"))
    for step in (3, 6):  # before the fork: the first run's
        assert filecmp.cmp(run_dir / snapshots.FOLDER / snapshots.snapshot_name(step),
                           original / snapshots.snapshot_name(step), shallow=False)
    for step in (9, 12, 15, 18):  # after it: the second run's
        assert not filecmp.cmp(run_dir / snapshots.FOLDER / snapshots.snapshot_name(step),
                               original / snapshots.snapshot_name(step), shallow=False)
    # The series ends at the final checkpoint's power EMAs.
    last = torch.load(run_dir / LAST, weights_only=True)
    end = torch.load(run_dir / snapshots.FOLDER / snapshots.snapshot_name(18), weights_only=True)
    for shadow, saved in zip(end["shadows"], last["posthoc_ema"]["ema"]["shadows"]):
        assert all(torch.equal(shadow[k], saved[k].to(shadow[k].dtype)) for k in shadow)
    assert [s.step for s in series_mod.read_series(run_dir).snapshots] == [3, 6, 9, 12, 15, 18]


def test_the_sweep_refuses_a_series_that_does_not_reach_last(finished, small_data, tmp_path):
    run_dir = tmp_path / "a"
    shutil.copytree(finished, run_dir)
    (run_dir / snapshots.FOLDER / snapshots.snapshot_name(18)).unlink()
    r = run_in_process(validate.main, "validate.py", small_data, "--posthoc", run_dir, "-j", "0")
    assert r.returncode == 2, r.stderr
    assert "the series ends at step 15" in r.stderr and "last snapshot at step 18" in r.stderr


def test_snapshots_are_taken_only_at_new_ema_update_counts(small_data, tmp_path):
    # EMA updates every 3 steps; snapshot steps 2, 4, ..., 18 have 0, 1, 2, 2, 3, 4, 4, 5, 6.
    r = train_run(small_data, *ARGS, "--model-ema-every", "3", "--model-ema-snapshot-every",
                  "2it", "--output", tmp_path, "--experiment", "e")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "and at the end: 6 snapshots of" in r.stderr
    run_dir = tmp_path / "e"
    assert steps(run_dir) == [4, 6, 10, 12, 16, 18]
    series = series_mod.read_series(run_dir)
    assert [s.updates for s in series.snapshots] == [1, 2, 3, 4, 5, 6]
    sweep = run_in_process(validate.main, "validate.py", small_data, "--posthoc", run_dir, "-j",
                           "0", "--sigma-rel", "0.08")
    assert sweep.returncode == 0, sweep.stderr


def test_a_rerun_of_the_sweep_removes_what_a_killed_sweep_left(finished, small_data, tmp_path):
    run_dir = tmp_path / "a"
    shutil.copytree(finished, run_dir)
    # A sweep killed (SIGKILL) while writing its best file leaves the temporary file of that
    # write, named as `atomic.atomic_write` names it, as big as the checkpoint.
    left = run_dir / ".model_posthoc_best.pth.tar.k1x9q2z0.tmp"
    shutil.copyfile(run_dir / LAST, left)
    r = run_in_process(validate.main, "validate.py", small_data, "--posthoc", run_dir, "-j", "0",
                       "--sigma-rel", "0.08")
    assert r.returncode == 0, r.stderr
    assert not list(run_dir.glob(".*.tmp"))
    assert (run_dir / "model_posthoc_best.pth.tar").is_file()


def test_a_run_whose_power_emas_never_update_says_so_and_writes_no_snapshot(small_data,
                                                                           tmp_path):
    r = train_run(small_data, *ARGS, "--epochs", "1", "--model-ema-every", "100",
                  "--output", tmp_path, "--experiment", "n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "and at the end: 0 snapshots of" in r.stderr
    assert "fewer than two snapshots at new EMA update counts (--model-ema-every 100)" in r.stderr
    assert steps(tmp_path / "n") == []
