"""What a user reads while a run goes: durations, the remaining time, the training rate without
start-up, the data-wait share, and epoch lines that stay readable with several EMAs."""
from __future__ import annotations

import pytest

from ematrain.run.report import epoch_line
from ematrain.run.weight_sets import RAW, WeightSet
from ematrain.util.clock import RunClock, StepTimer, duration
from ematrain.util.logs import plural


@pytest.mark.parametrize("seconds,text", [(0.04, "0.0s"), (7.34, "7.3s"), (42.4, "42s"),
                                          (245, "4m05s"), (3600, "1h00m"), (7620, "2h07m"),
                                          (273600, "3d04h")])
def test_durations_read_in_two_units_at_most(seconds, text):
    assert duration(seconds) == text


def test_plurals():
    assert [plural(n, "epoch") for n in (0, 1, 3, 0.5)] == [
        "0 epochs", "1 epoch", "3 epochs", "0.5 epochs"]


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_the_step_rate_leaves_out_start_up_and_measures_data_wait():
    now = FakeTime()
    timer = StepTimer(now)
    waits = iter([30.0, 1.0, 1.0, 1.0])  # the first batch: workers starting, 30 s

    class Slow:
        def __iter__(self):
            return self

        def __next__(self):
            now.t += next(waits)  # time spent waiting for this batch
            return "batch"

    stream = timer.waiting(Slow())
    for _ in range(4):
        next(stream)
        now.t += 3.0  # the step itself
        timer.step_done(images=8)
    rate, wait = timer.interval()
    # Three counted steps of 4 s each (1 s of it waiting), 8 images each; the first step and its
    # 30 s wait are start-up.
    assert rate == pytest.approx(24 / 12) and wait == pytest.approx(3 / 12)
    assert timer.step_seconds == pytest.approx(4.0)
    assert timer.interval() is None  # nothing counted since


def test_the_remaining_time_comes_from_whole_epochs_after_the_first():
    now = FakeTime()
    clock = RunClock(num_epochs=5, steps_per_epoch=10, now=now)
    # Before any epoch ended: the step rate times the steps left.
    assert clock.remaining(0, steps_left=4, step_seconds=0.5) == pytest.approx(2 + 4 * 5)
    assert clock.remaining(0) is None
    for took in (30.0, 8.0, 6.0):  # the first epoch carries the start-up
        clock.start_epoch()
        now.t += took
        assert clock.end_epoch() == took
    assert clock.per_epoch() == pytest.approx(7.0)
    assert clock.remaining(2) == pytest.approx(2 * 7.0)
    assert clock.remaining(3, steps_left=5, step_seconds=0.5) == pytest.approx(2.5 + 7.0)
    assert clock.elapsed() == pytest.approx(44.0)


def _sets(n_ema: int):
    emas = tuple(WeightSet(f"ema {d}", f"EMA {d}", f"ema{d}_", None, i, d)
                 for i, d in enumerate([0.99, 0.999, 0.9999][:n_ema]))
    return (RAW,) + emas


def _results(sets):
    return {s.name: {"top1": 90.0 + i, "top5": 99.5, "loss": 0.3 - 0.01 * i, "count": 10}
            for i, s in enumerate(sets)}


def test_an_epoch_line_with_three_emas_stays_readable():
    sets = _sets(3)
    text = epoch_line(9, 300, 0.0123, 0.8765, _results(sets), sets, ["ema 0.999"],
                      timing=(65.0, 17650.0))
    lines = text.splitlines()
    assert lines[0] == "epoch 9 (10/300) 1m05s, eta 4h54m | lr 0.0123 train_loss 0.8765"
    assert [l.split()[:2] for l in lines[1:]] == [["raw", "top1"], ["ema", "0.99"],
                                                  ["ema", "0.999"], ["ema", "0.9999"]]
    assert lines[3].endswith("<- new best") and "best" not in "".join(lines[1:3] + lines[4:])
    assert max(len(l) for l in lines) <= 100
    # The scores are aligned in columns.
    assert len({l.index("top1") for l in lines[1:]}) == 1


def test_an_epoch_line_of_a_one_epoch_run_without_ema():
    sets = _sets(0)
    text = epoch_line(0, 1, 0.1, 2.0, _results(sets), sets, timing=(3.0, 0.0))
    assert text == ("epoch 0 (1/1) 3.0s | lr 0.1 train_loss 2.0000 | raw: top1  90.00  "
                    "top5  99.50  loss 0.3000")
    assert "0/0" not in text and "eta" not in text  # nothing remains after the last epoch


def test_the_bar_shows_the_rate_and_remaining_time_between_log_intervals(small_data, tmp_path,
                                                                        monkeypatch, capsys):
    """On a terminal the timing fields refresh on the clock, not only at --log-interval (timm's
    default of 50 steps may be minutes on a CPU), without reading the device."""
    from conftest import make_training, run_epochs

    from ematrain.run import curves, loop
    monkeypatch.setattr(loop, "show_bars", lambda: True)
    monkeypatch.setattr(loop._Progress, "REFRESH_S", 0.0)
    monkeypatch.setattr(curves.CurveRenderer, "submit", lambda *a, **k: None)
    tr = make_training([small_data, "--model", "test_resnet", "--img-size", "16", "-b", "4",
                        "-j", "0", "--epochs", "3", "--log-interval", "100"])
    run_epochs(tr, tmp_path)
    err = capsys.readouterr().err
    states = [s for s in err.replace("\n", "\r").split("\r") if s.startswith("train 0:")]
    early = [s for s in states if "eta=" in s and "loss=" not in s]
    assert early and all("img/s=" in s and "data=" in s for s in early), states
    # The loss (a read of the device) comes at the epoch's last step only.
    assert any("loss=" in s for s in states)


def test_each_weight_set_is_marked_at_its_new_bests_only(small_data, tmp_path, capsys):
    """`<- new best` marks every set whose best epoch (by --eval-metric) this is, as its best
    file and the keeper have it; not the set that is best among the others this epoch."""
    import csv

    from conftest import torch_threads

    from ematrain.cli import train
    with torch_threads(1):
        rc = train.main([str(small_data), "--model", "test_resnet", "--img-size", "16", "-b", "4",
                         "-j", "0", "--epochs", "4", "--warmup-epochs", "0", "--lr", "0.2",
                         "--model-ema-decay", "0.5", "0.9", "--output", str(tmp_path),
                         "--experiment", "m"])
    out = capsys.readouterr().out
    assert rc == 0
    epoch, marked = None, set()
    for line in out.splitlines():
        if line.startswith("epoch "):
            epoch = int(line.split()[1])
        elif line.startswith("  ") and line.endswith("<- new best"):
            marked.add((epoch, " ".join(line.split()[:2]) if line.split()[0] == "ema"
                        else line.split()[0]))
    rows = list(csv.DictReader(open(tmp_path / "m/summary.csv")))
    expected = set()
    for prefix, name in (("raw_", "raw"), ("", "ema 0.5"), ("ema0.9_", "ema 0.9")):
        best = -1.0
        for row in rows:
            if float(row[f"{prefix}eval_top1"]) > best:
                best = float(row[f"{prefix}eval_top1"])
                expected.add((int(row["epoch"]), name))
    assert marked == expected and "best this epoch" not in out
