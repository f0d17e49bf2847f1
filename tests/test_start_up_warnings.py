"""Settings that quietly waste a run are named at start: a warmup that takes most of the run, a
batch larger than the training set, more loader processes than cores (said once, not by torch
for every loader)."""
from __future__ import annotations

from conftest import run_in_process

from ematrain.cli import train
from ematrain.settings import data_specs
from ematrain.settings.data_specs import LoaderSpec
from ematrain.settings.train_specs import train_settings


def _schedule(tmp_path, *flags):
    return train_settings([str(tmp_path), *flags]).schedule


def test_a_warmup_over_most_of_the_run_is_named_with_a_setting_to_try(tmp_path):
    text = _schedule(tmp_path, "--epochs", "5").warmup_warning(5)  # timm's default warmup of 5
    assert text == ("warning: --warmup-epochs 5 covers most of this 5-epoch run: the LR reaches "
                    "its peak only at epoch 5 (after the run); try --warmup-epochs 1")
    assert "after the run" not in _schedule(tmp_path, "--epochs", "8").warmup_warning(8)
    assert _schedule(tmp_path, "--epochs", "10").warmup_warning(10) is None
    assert _schedule(tmp_path, "--epochs", "5", "--warmup-epochs", "1").warmup_warning(5) is None
    assert _schedule(tmp_path, "--epochs", "5", "--sched", "none").warmup_warning(5) is None


def test_loader_processes_follow_the_cores(monkeypatch):
    monkeypatch.setattr(data_specs, "available_cores", lambda: 2)
    auto = LoaderSpec(batch_size=8, workers=None)
    assert auto.workers_per_process() == 2 and auto.too_many_workers() is None
    assert auto.workers_per_process(local_processes=4) == 1  # torchrun: the cores are shared
    asked = LoaderSpec(batch_size=8, workers=4)
    assert asked.workers_per_process() == 4  # what the user asks for, with a warning
    assert asked.too_many_workers() == (
        "warning: -j 4 starts 4 loader processes on 2 cores: they will compete with training "
        "(-j 2 or leave -j out to pick it from the cores)")
    monkeypatch.setattr(data_specs, "available_cores", lambda: 64)
    assert auto.workers_per_process() == 4  # timm's default, where there are cores enough


def test_the_warnings_reach_the_user_once(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(data_specs, "available_cores", lambda: 2)
    monkeypatch.setattr(data_specs, "available_cores", lambda: 1)
    r = run_in_process(train.main, "train.py", tiny_data, "--model", "test_resnet", "--img-size",
                       "16", "-b", "500", "--epochs", "2", "-j", "2", "--output", tmp_path,
                       "--experiment", "w")
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert err.count("warning: -b 500 is larger than the training set (72 images): every epoch "
                     "is one step of 72 images") == 1
    assert err.count("warning: --warmup-epochs 5 covers most of this 2-epoch run") == 1
    assert err.count("warning: -j 2 starts 2 loader processes on 1 core") == 1
    assert "This DataLoader will create" not in err  # torch's own, once per loader
