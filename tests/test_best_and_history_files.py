"""The best and history files hold the epochs the records in last.pth.tar name: any resume
(finished or not) checks them and puts a stale or missing one right from whichever file of the run
holds that epoch, in one line; a resume from an older checkpoint destroys nothing that the
run's last.pth.tar still names before its own first save, and then makes the files its own."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import assert_files_agree_with_records, run_in_process, tiny_args, torch_threads

from ematrain.cli import train
from ematrain.run.keeper import LAST, CheckpointKeeper, history_name
from ematrain.run.weight_sets import weight_sets

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")

ARGS = tiny_args("--seed", "1", "--model-ema", "--model-ema-decay", "0.9", "--checkpoint-hist", "3",
                 "--experiment", "run", epochs=3)


@pytest.fixture(scope="module")
def finished(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("best_files")
    with torch_threads(1):
        r = run_in_process(train.main, "train.py", small_data, *ARGS, "--output", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "run"


def epoch_of(path) -> int:
    return torch.load(path, weights_only=True, mmap=True)["epoch"]


def replace_by_copy(run_dir, name: str, other_epoch: int) -> None:
    """`name` replaced (a new file, as a user's cp or a sync tool would leave it) by the
    checkpoint of another epoch."""
    tmp = run_dir / "replacement"
    shutil.copyfile(run_dir / history_name(other_epoch), tmp)
    os.replace(tmp, run_dir / name)


def repaired_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("repaired")]


def test_a_stale_best_file_of_a_finished_run_is_repaired_by_its_resume(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    records = torch.load(run_dir / LAST, weights_only=True)["keeper"]
    best = records["best"]["ema 0.9"]["epoch"]  # model_best.pth.tar is the EMA's, as timm's
    other = next(e for e in range(3) if e != best)
    raw_best = records["best"]["raw"]["epoch"]
    replace_by_copy(run_dir, "model_best.pth.tar", other)
    (run_dir / "model_best_raw.pth.tar").unlink()  # a missing one too
    assert epoch_of(run_dir / "model_best.pth.tar") == other
    with torch_threads(1):
        r = run_in_process(train.main, "train.py", "--resume", "auto", *ARGS, "--output",
                           tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = repaired_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert f"model_best.pth.tar (epoch {best}, from " in lines[0], lines
    assert f"model_best_raw.pth.tar (epoch {raw_best}, from " in lines[0], lines
    assert epoch_of(run_dir / "model_best.pth.tar") == best
    assert_files_agree_with_records(run_dir)


def test_a_stale_best_file_is_repaired_by_a_resume_in_the_middle_of_an_epoch(
        finished, tmp_path, monkeypatch):
    from ematrain.util import signals
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    monkeypatch.setattr(signals.StopRequest, "__call__", lambda self: True)
    with torch_threads(1):
        mid = run_in_process(train.main, "train.py", "--resume", run_dir / LAST, "--epochs", "4")
    assert mid.returncode == 130, mid.stderr[-2000:]
    assert torch.load(run_dir / LAST, weights_only=True)["counters"]["epoch_step"] == 1
    best = torch.load(run_dir / LAST, weights_only=True)["keeper"]["best"]["ema 0.9"]["epoch"]
    other = next(e for e in range(3) if e != best)
    replace_by_copy(run_dir, "model_best.pth.tar", other)
    with torch_threads(1):
        again = run_in_process(train.main, "train.py", "--resume", run_dir / LAST)
    assert again.returncode == 130, again.stderr[-2000:]  # stopped again, after one more step
    lines = repaired_lines(again.stderr)
    assert len(lines) == 1 and f"model_best.pth.tar (epoch {best}, from " in lines[0], again.stderr
    assert epoch_of(run_dir / "model_best.pth.tar") == best
    assert_files_agree_with_records(run_dir)


# ----------------------------------------------------------------------------- the keeper alone
# The layout of --primary-weights raw: model_best.pth.tar and the history follow the raw weights.
SETS = weight_sets([0.9], primary="raw")


def _checkpoint(keeper: CheckpointKeeper, epoch: int, rows: list[dict]) -> dict:
    """An epoch-end checkpoint as the keeper writes it (tiny weights; the records and rows are
    what the files are checked by)."""
    return {"epoch": epoch, "state_dict": {"w": torch.full((2,), float(epoch))},
            "counters": {"epoch": epoch + 1, "epoch_step": 0}, "keeper": keeper.state_dict(),
            "summary": {"rows": [dict(r) for r in rows]}}


def _epochs(keeper, run, results, rows=None, first=0):
    """Record and save epochs `first`, ... with `results` [(raw top1, ema top1), ...]; `run`
    tells the runs apart in the summary rows (their train_loss)."""
    rows = list(rows or [])
    saved = {}
    for epoch, (raw, ema) in enumerate(results, start=first):
        improved = keeper.record(epoch, {"raw": {"top1": raw}, "ema 0.9": {"top1": ema}})
        rows.append({"epoch": epoch, "train_loss": run + epoch / 10})
        saved[epoch] = _checkpoint(keeper, epoch, rows)
        keeper.save_epoch(epoch, saved[epoch], improved)
    keeper.wait()
    return rows, saved


def _row_of(path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    return next(r for r in ckpt["summary"]["rows"] if r["epoch"] == ckpt["epoch"])


def _keeper(run_dir, state=None) -> CheckpointKeeper:
    keeper = CheckpointKeeper(SETS, "top1", history_size=3, background=False)
    keeper.run_dir = run_dir
    if state is not None:
        keeper.load_state_dict(state)
    return keeper


def test_a_resume_from_an_older_checkpoint_keeps_the_files_last_names_until_its_first_save(
        tmp_path):
    first = _keeper(tmp_path)
    rows, saved = _epochs(first, 1.0, [(50, 40), (60, 45), (70, 80)])  # run A: best 2 and 2
    # Run B resumes from A's epoch 0 (so its records say: best 0, history [0]).
    second = _keeper(tmp_path, saved[0]["keeper"])
    assert second.repair() == []  # last.pth.tar is still A's epoch 2, and the files agree with it
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [history_name(e)
                                                                    for e in range(3)]
    assert epoch_of(tmp_path / "model_best_ema.pth.tar") == 2
    # B's epoch 1: the raw weights improve on its epoch 0, its EMA does not.
    _epochs(second, 2.0, [(65, 39)], rows=rows[:1], first=1)
    last = torch.load(tmp_path / LAST, weights_only=True)
    assert last["keeper"]["best"]["ema 0.9"]["epoch"] == 0
    assert epoch_of(tmp_path / "model_best_ema.pth.tar") == 0  # from checkpoint-0, not A's 2
    assert _row_of(tmp_path / "model_best.pth.tar") == {"epoch": 1, "train_loss": 2.1}
    assert _row_of(tmp_path / history_name(1)) == {"epoch": 1, "train_loss": 2.1}
    assert not (tmp_path / history_name(2)).exists()  # A's epoch 2: in no record of B


def test_the_same_epoch_of_another_continuation_is_not_taken_for_the_records_epoch(tmp_path):
    first = _keeper(tmp_path)
    rows, saved = _epochs(first, 1.0, [(50, 40), (70, 45), (60, 46)])  # A: best raw epoch 1
    second = _keeper(tmp_path, saved[0]["keeper"])
    second.repair()
    # B's epoch 1 improves the raw weights; killed right after its last.pth.tar is in place:
    # model_best.pth.tar still holds A's epoch 1, the same epoch number as B's records name.
    second.record(1, {"raw": {"top1": 65}, "ema 0.9": {"top1": 41}})
    second._write(LAST, _checkpoint(second, 1, rows[:1] + [{"epoch": 1, "train_loss": 2.1}]))
    assert epoch_of(tmp_path / "model_best.pth.tar") == 1
    third = _keeper(tmp_path, torch.load(tmp_path / LAST, weights_only=True)["keeper"])
    fixed = third.repair()
    assert "model_best.pth.tar (epoch 1, from last.pth.tar)" in fixed
    assert f"{history_name(1)} (epoch 1, from last.pth.tar)" in fixed
    assert _row_of(tmp_path / "model_best.pth.tar") == {"epoch": 1, "train_loss": 2.1}
