"""--kd-model-name through train.py: the loss is timm's task term plus the teacher term, the
teacher is frozen and in no EMA, optimizer or checkpoint; feature distillation's projection is
trained and checkpointed (timm's `task_state`) but never averaged; and a distillation run with
--model-ema and --model-ema-posthoc resumes after SIGKILL bit-identically."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch
import yaml
from conftest import (
    REPO_ROOT,
    make_imagefolder,
    make_training,
    run_cli,
    run_epochs,
    run_in_process,
    tiny_args,
)

from ematrain.cli import train
from ematrain.settings.train_specs import resolve_train, train_settings
from ematrain.util.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")
TIMM_ARGS = REPO_ROOT / "tests" / "fixtures" / "timm_args.yaml"


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(3)
    teacher = timm.create_model("test_resnet", num_classes=3)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def wide_teacher_file(tmp_path_factory):
    """A teacher whose pooled features are wider than the student's (test_nfnet: 192 against
    test_resnet's 96), with a head of its own 5 classes: feature distillation trains a
    projection and never compares class scores."""
    torch.manual_seed(4)
    teacher = timm.create_model("test_nfnet", num_classes=5)
    path = tmp_path_factory.mktemp("wide_teacher") / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    return path


def _kd(teacher_file, *extra, name="test_resnet"):
    return ["--kd-model-name", name, "--kd-pretrained-path", str(teacher_file), *extra]


def _feature_kd(teacher_file, *extra):
    return _kd(teacher_file, "--kd-distill-type", "feature", *extra, name="test_nfnet")


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


def test_feature_distillation_trains_a_projection_that_no_ema_averages(small_data,
                                                                     wide_teacher_file, tmp_path):
    tr = make_training([small_data, *tiny_args("--model-ema", "--model-ema-decay", "0.9",
                                               "--clip-grad", "1"),
                        *_feature_kd(wide_teacher_file, "--distill-loss-weight", "3")])
    run, distill = tr.run, tr.run.distill
    projection = distill.trained.projection
    assert (projection.in_features, projection.out_features) == (96, 192)
    before = projection.weight.detach().clone()
    terms = []
    objective = tr.loop.recipe.objective

    def recorded(images, targets):
        loss = objective(images, targets)
        student = run.module(images)  # the task term, recomputed from the student itself
        task = torch.nn.functional.cross_entropy(student, targets, label_smoothing=0.1)
        terms.append((loss.detach(), task.detach(), dict(distill.last)))
        return loss
    tr.loop.recipe.objective = recorded
    rows = run_epochs(tr, tmp_path)
    for loss, task, last in terms:
        assert last["kd_loss"] > 0
        torch.testing.assert_close(last["task_loss"], task)
        torch.testing.assert_close(loss, last["task_loss"] + 3 * last["kd_loss"])
    # The optimizer trains the student and the projection; the EMA holds the student only.
    trained = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in run.module.parameters()} | {
        id(p) for p in projection.parameters()}
    assert not torch.equal(projection.weight, before)
    assert set(run.emas.shadows[0].state_dict()) == set(run.module.state_dict())
    assert {"raw_eval_top1", "eval_top1"} <= set(rows[-1])  # raw and EMA students validated
    # The checkpoint: the student under timm's state_dict, the projection as timm's task_state.
    ckpt = torch.load(tmp_path / "last.pth.tar", weights_only=True)
    assert ckpt["state_dict"].keys() == run.module.state_dict().keys()
    assert torch.equal(ckpt["task_state"]["projection"]["weight"], projection.weight)
    assert "task_state_ema" not in ckpt
    # timm reads it: its feature task takes the student and the projection back.
    from timm.task import FeatureDistillationTask
    student = timm.create_model("test_resnet", num_classes=3)
    teacher = timm.create_model("test_nfnet", num_classes=5)
    task = FeatureDistillationTask(student, teacher, verbose=False)
    task.load_checkpoint_state(ckpt["state_dict"], ckpt["task_state"])
    assert torch.equal(task.trainable_module.projection.weight, projection.weight)


def test_distillation_settings_are_checked(small_data, teacher_file):
    base = [str(small_data), *tiny_args()]
    with pytest.raises(UserError, match="--kd-pretrained-path is the teacher's weights"):
        train_settings([*base, "--kd-pretrained-path", str(teacher_file)])
    with pytest.raises(UserError, match="--kd-teacher-feature-dim must be > 0, got 0"):
        train_settings([*base, *_kd(teacher_file, "--kd-distill-type", "feature",
                                    "--kd-teacher-feature-dim", "0")])
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


def test_distillation_resumes_after_sigkill_bit_identically(kd_data, wide_teacher_file,
                                                            tmp_path):
    """Feature distillation with a projection: beyond a logit run's state, the projection and
    its optimizer moments must come back too."""
    args = [kd_data, *COMMON, *_feature_kd(wide_teacher_file), "--output", tmp_path]
    r = run_cli("train.py", *args, "--experiment", "ref")
    assert r.returncode == 0, r.stderr
    assert "distillation (feature): teacher test_nfnet" in r.stderr
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
    projection = a["task_state"]["projection"]
    assert all(torch.equal(v, b["task_state"]["projection"][k]) for k, v in projection.items())
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
    last = str(tmp_path / "run" / "last.pth.tar")
    with pytest.raises(UserError, match="it records --kd-model-name test_nfnet, this run asks "
                                        "for resnet18 .the run distills from its teacher"):
        resolve_train([*map(str, args), "--resume", last, "--kd-model-name", "resnet18",
                       "--epochs", "3"])
    with pytest.raises(UserError, match="kd-student-feature-dim.*projection"):
        resolve_train([*map(str, args), "--resume", last, "--kd-student-feature-dim", "48"])


def test_timm_args_yaml_with_feature_distillation_runs_here(small_data, wide_teacher_file,
                                                            tmp_path):
    """timm's recipe names the teacher only (timm's train.py downloads its weights); here they
    come from --kd-pretrained-path, as nothing can be downloaded."""
    recipe = yaml.safe_load(TIMM_ARGS.read_text())
    recipe.update(kd_model_name="test_nfnet", kd_distill_type="feature", distill_loss_weight=0.5,
                  model="test_resnet", img_size=32, batch_size=4, workers=0, epochs=1,
                  warmup_epochs=0, model_ema=True, model_ema_decay=0.9)
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = run_in_process(train.main, "train.py", small_data, "-c", path, "--device", "cpu",
                       "--kd-pretrained-path", wide_teacher_file, "--output", tmp_path,
                       "--experiment", "run")
    assert r.returncode == 0, r.stderr
    assert "distillation (feature): teacher test_nfnet" in r.stderr
    ckpt = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)
    assert ckpt["task_state"]["projection"]["weight"].shape == (192, 96)
    assert ckpt["args"]["kd_distill_type"] == "feature"
