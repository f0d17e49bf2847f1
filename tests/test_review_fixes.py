"""Regression tests for defects an independent review found."""
from __future__ import annotations

import csv
import logging

import pytest
import torch

from conftest import make_imagefolder, make_training, torch_threads
from ematrain import resume
from ematrain import train as train_mod
from ematrain.build import build_run
from ematrain.engine import NonFiniteLoss
from ematrain.settings import resolve_train

TINY = ["--model", "test_resnet", "--img-size", "32", "-b", "4", "--epochs", "1",
        "--warmup-epochs", "0", "--lr", "0.05", "-j", "0"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("review") / "data", num_classes=3,
                            train_per_class=8, val_per_class=4)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_shadow_in_another_dtype_trains_and_validates(data_root, tmp_path, capsys, dtype):
    rc = train_mod.main([str(data_root), *TINY, "--output", str(tmp_path), "--experiment", "d",
                         "--model-ema-decay", "0.5", "--model-ema-dtype", dtype])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "train/d/summary.csv")))
    assert float(rows[0]["ema_eval_loss"]) > 0
    ckpt = torch.load(tmp_path / "train/d/last.pth.tar", weights_only=True)
    assert ckpt["state_dict_ema"]["fc.weight"].dtype == getattr(torch, dtype)


def test_low_precision_shadow_that_cannot_move_is_warned(data_root, tmp_path, capsys):
    logging.getLogger("ematrain").handlers.clear()  # log to this test's captured stderr
    assert train_mod.main([str(data_root), *TINY, "--model-ema-dtype", "bfloat16",
                           "--output", str(tmp_path)]) == 0
    assert "below the dtype's precision" in capsys.readouterr().err


def test_resume_auto_before_any_checkpoint_keeps_the_folder(data_root, tmp_path, capsys):
    run = tmp_path / "train" / "x"
    run.mkdir(parents=True)
    (run / "args.yaml").write_text("model: test_resnet\n")  # a run killed before epoch 0 ended
    rc = train_mod.main([str(data_root), *TINY, "--output", str(tmp_path), "--experiment", "x",
                         "--resume", "auto"])
    assert rc == 0
    assert (run / "last.pth.tar").is_file()
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["x"]


def test_resume_from_a_path_continues_in_that_runs_folder(data_root, tmp_path, capsys):
    assert train_mod.main([str(data_root), *TINY, "--output", str(tmp_path),
                           "--experiment", "first"]) == 0
    last = tmp_path / "train/first/last.pth.tar"
    assert train_mod.main([str(data_root), *TINY, "--epochs", "2", "--resume", str(last)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "train/first/summary.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["first"]


def test_no_resume_opt_resumes_at_the_schedules_lr(data_root, tmp_path, capsys):
    assert train_mod.main([str(data_root), *TINY, "--epochs", "2", "--warmup-epochs", "1",
                           "--warmup-lr", "1e-4", "--sched", "step", "--decay-epochs", "10",
                           "--output", str(tmp_path), "--experiment", "w"]) == 0
    ckpt = tmp_path / "train/w/checkpoint-0.pth.tar"
    ckpt = ckpt if ckpt.exists() else tmp_path / "train/w/model_best.pth.tar"
    settings, source = resolve_train(["--resume", ckpt, "--no-resume-opt"])
    run = build_run(settings)
    resume.restore(run, source)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


class NanAfter(torch.nn.Module):
    def __init__(self, first_bad):
        super().__init__()
        self.first_bad, self.calls = first_bad, 0
        self.ce = torch.nn.CrossEntropyLoss()

    def forward(self, output, target):
        self.calls += 1
        loss = self.ce(output, target)
        return loss * float("nan") if self.calls - 1 >= self.first_bad else loss


def test_recovery_save_never_stores_weights_after_a_bad_step(data_root, tmp_path):
    tr = make_training([data_root, *TINY, "--output", tmp_path, "--log-interval", "100",
                        "--recovery-interval", "1"])
    saved = []
    tr.run.keeper.save_mid_epoch = lambda ckpt, name=None: saved.append(
        [p.detach().clone() for p in tr.run.model.parameters()])
    tr.loop.recipe.loss_fn = NanAfter(1)
    loader, _ = tr.run.data.loaders(0, 0, seed=0)
    with pytest.raises(NonFiniteLoss) as info:
        tr.train(loader, lambda: False)
    assert info.value.step == 1
    assert len(saved) == 1  # after step 0 only
    assert all(torch.isfinite(p).all() for p in saved[0])


def test_skipped_step_leaves_batchnorm_statistics_untouched(data_root, tmp_path):
    tr = make_training([data_root, *TINY, "--output", tmp_path, "--log-interval", "100",
                        "--skip-nonfinite", "100"])
    loader, _ = tr.run.data.loaders(0, 0, seed=0)

    class NanStats(torch.nn.Module):
        """A NaN loss whose forward also pushed NaN into BatchNorm running statistics."""

        def forward(self, output, target):
            with torch.no_grad():
                for m in tr.run.model.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_mean.fill_(float("nan"))
            return output.sum() * float("nan")

    before = {k: v.clone() for k, v in tr.run.model.state_dict().items() if "running" in k}
    tr.loop.recipe.loss_fn = NanStats()
    tr.train(loader, lambda: False)
    after = tr.run.model.state_dict()
    assert tr.run.counters.skipped_nonfinite == tr.run.data.steps_per_epoch
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def test_ema_decay_can_be_given_as_printed(data_root, tmp_path, capsys):
    assert train_mod.main([str(data_root), *TINY, "--output", str(tmp_path), "--experiment", "h",
                           "--model-ema-half-life", "3it", "1ep"]) == 0
    from ematrain import checkpoint as ckpt_io
    ckpt = ckpt_io.load_file(tmp_path / "train/h/last.pth.tar")
    printed = float(f"{ckpt['ema']['decays'][1]:g}")
    assert printed != ckpt["ema"]["decays"][1]
    assert ckpt_io.ema_index_for_decay(ckpt, printed, "x") == 1


def test_resume_with_other_decays_is_refused(data_root, tmp_path, capsys):
    assert train_mod.main([str(data_root), *TINY, "--output", str(tmp_path), "--experiment", "r",
                           "--model-ema-decay", "0.9"]) == 0
    rc = train_mod.main([str(data_root), *TINY, "--epochs", "2", "--output", str(tmp_path),
                         "--experiment", "r", "--resume", "auto", "--model-ema-decay", "0.99"])
    err = capsys.readouterr().err
    assert rc == 2 and "averages decays 0.9, this run asks for 0.99" in err
