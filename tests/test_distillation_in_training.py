"""--kd-model-name through train.py: the loss is timm's task term plus the teacher term, the
teacher is frozen and in no EMA, optimizer or checkpoint, and a distillation run with --model-ema
and --model-ema-posthoc resumes after SIGKILL bit-identically."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch
from conftest import (
    REPO_ROOT,
    make_imagefolder,
    make_training,
    run_cli,
    run_epochs,
    tiny_args,
)

from ematrain.settings.train_specs import resolve_train, train_settings
from ematrain.util.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(3)
    teacher = timm.create_model("test_resnet", num_classes=3)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    return path


def _kd(teacher_file, *extra):
    return ["--kd-model-name", "test_resnet", "--kd-pretrained-path", str(teacher_file), *extra]


def test_the_loss_has_the_teacher_term_and_the_ema_holds_the_student(small_data, teacher_file,
                                                                     tmp_path):
    tr = make_training([small_data, *tiny_args(), "--model-ema", "--model-ema-decay", "0.9",
                        *_kd(teacher_file, "--distill-loss-weight", "0.5",
                                                      "--task-loss-weight", "2")])
    run, distill = tr.run, tr.run.distill
    teacher = distill.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = []
    objective = tr.loop.recipe.objective

    def recorded(images, targets):
        loss = objective(images, targets)
        losses.append((loss.detach(), dict(distill.last)))
        return loss
    tr.loop.recipe.objective = recorded
    run_epochs(tr, tmp_path)
    for loss, terms in losses:
        assert terms["kd_loss"] > 0
        assert torch.allclose(loss, 2 * terms["task_loss"] + 0.5 * terms["kd_loss"])
    # Frozen: the teacher's weights and statistics never moved, and it is trained by nothing.
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    trained = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in teacher.parameters()}
    assert trained == {id(p) for p in run.module.parameters()}
    student_keys = set(run.module.state_dict())
    for shadow in run.emas.shadows:
        assert set(shadow.state_dict()) == student_keys
    assert run.module is not teacher and teacher not in list(run.module.modules())


def test_distillation_settings_are_checked(small_data, teacher_file):
    base = [str(small_data), *tiny_args()]
    with pytest.raises(UserError, match="--kd-pretrained-path is the teacher's weights"):
        train_settings([*base, "--kd-pretrained-path", str(teacher_file)])
    with pytest.raises(UserError, match="--kd-distill-type feature trains a projection"):
        train_settings([*base, *_kd(teacher_file, "--kd-distill-type", "feature")])
    with pytest.raises(UserError, match="--kd-loss-type"):
        train_settings([*base, *_kd(teacher_file, "--kd-loss-type", "mse")])


EPOCHS = 2
STEPS = 6  # 3 classes x 16 images / batch 8
COMMON = tiny_args("--model-ema", "--model-ema-decay", "0.9", "--model-ema-posthoc",
                   "--model-ema-snapshot-every", "3it", "--seed", "5", "--log-interval", "1",
                   batch=8, epochs=EPOCHS)


@pytest.fixture(scope="module")
def kd_data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("kd") / "data", num_classes=3,
                            train_per_class=16, val_per_class=6)


def test_distillation_resumes_after_sigkill_bit_identically(kd_data, teacher_file, tmp_path):
    args = [kd_data, *COMMON, *_kd(teacher_file), "--output", tmp_path]
    r = run_cli("train.py", *args, "--experiment", "ref")
    assert r.returncode == 0, r.stderr
    assert "distillation (logit): teacher test_resnet" in r.stderr
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *map(str, args),
                             "--experiment", "run"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # part-way into the second epoch, after the first checkpoint
        if "train 1 [3/" in line:
            break
    while not (tmp_path / "run" / "last.pth.tar").exists():
        assert proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    r = run_cli("train.py", *args, "--experiment", "run", "--resume", "auto")
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr
    a = torch.load(tmp_path / "ref" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["counters"] == b["counters"]
    assert ((tmp_path / "ref" / "summary.csv").read_text()
            == (tmp_path / "run" / "summary.csv").read_text())
    names = sorted(p.name for p in (tmp_path / "ref" / "posthoc").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "run" / "posthoc").iterdir())
    for name in names:
        x = torch.load(tmp_path / "ref" / "posthoc" / name, weights_only=True)
        y = torch.load(tmp_path / "run" / "posthoc" / name, weights_only=True)
        for p, q in zip(x["shadows"], y["shadows"]):
            assert all(torch.equal(p[k], q[k]) for k in p), name
            assert p.keys() == a["state_dict"].keys()  # the power EMAs average the student
    # Another teacher on resume is refused: the rest would be no continuation of the run.
    with pytest.raises(UserError, match="it records --kd-model-name test_resnet, this run asks for resnet18 .the run distills from its teacher"):
        resolve_train([*map(str, args), "--resume", str(tmp_path / "run" / "last.pth.tar"),
                       "--kd-model-name", "resnet18", "--epochs", "3"])
