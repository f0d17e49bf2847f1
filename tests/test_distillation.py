"""Knowledge distillation (`ematrain.distill`): the loss is timm's task loss plus the teacher
term, measured against the formula; the teacher is frozen (no gradient, no statistics moved, no
update); the student alone is what trains and what an EMA averages; feature distillation's
projection is state a resume restores."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from ematrain.ema import ModelEma
from ematrain.run.distill import Distillation, build_teacher, freeze
from ematrain.util.errors import UserError

SIZE = 32


def _student(name="test_resnet", classes=4, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=classes)


def _teacher(name="test_efficientnet", classes=4, seed=1):
    torch.manual_seed(seed)
    return freeze(timm.create_model(name, num_classes=classes))


def _batch(n=6, classes=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_logit_loss_is_the_task_loss_plus_the_softened_kl_of_the_teacher():
    student, teacher = _student(), _teacher()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    distill = Distillation.create(student, teacher, "logit", nn.CrossEntropyLoss(),
                                  distill_weight=2.0, task_weight=0.5, temperature=3.0,
                                  mean=mean, std=std)
    images, targets = _batch()
    seen = []
    teacher.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    loss = distill(images, targets)

    with torch.no_grad():
        # The teacher is shown the pixels the student saw, in its own (ImageNet) normalization.
        pixels = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        t_mean = torch.tensor(teacher.pretrained_cfg["mean"]).view(1, 3, 1, 1)
        t_std = torch.tensor(teacher.pretrained_cfg["std"]).view(1, 3, 1, 1)
        torch.testing.assert_close(seen[0], (pixels - t_mean) / t_std)
        logits_t = teacher((pixels - t_mean) / t_std)
    logits_s = student(images)  # same train-mode forward: BatchNorm on the same batch
    task = F.cross_entropy(logits_s, targets)
    kl = F.kl_div(F.log_softmax(logits_s / 3.0, -1), F.log_softmax(logits_t / 3.0, -1),
                  reduction="batchmean", log_target=True) * 9.0
    torch.testing.assert_close(loss, 0.5 * task + 2.0 * kl)
    assert kl > 1e-3  # the teacher term is there, and not negligible
    torch.testing.assert_close(distill.last["kd_loss"], kl.detach())
    assert distill.weights == (0.5, 2.0)


@pytest.mark.parametrize("distill_weight,task_weight,expected", [
    (None, None, (1.0, 1.0)), (None, 0.3, (0.3, 0.7)), (5.0, None, (1.0, 5.0))])
def test_loss_weights_follow_timms_three_modes(distill_weight, task_weight, expected):
    distill = Distillation.create(_student(), _teacher(), "logit", nn.CrossEntropyLoss(),
                                  distill_weight=distill_weight, task_weight=task_weight)
    assert distill.weights == pytest.approx(expected)


def test_the_teacher_is_frozen_and_only_the_student_trains():
    student, teacher = _student(), _teacher()
    before = copy.deepcopy(teacher.state_dict())
    distill = Distillation.create(student, teacher, "logit", nn.CrossEntropyLoss())
    assert distill.trainable is student and distill.student is student
    ema = ModelEma(student, decay=0.5)
    optimizer = torch.optim.SGD(distill.trainable.parameters(), lr=0.5)
    student.train()
    teacher.train()  # a stray train() leaves the frozen teacher in eval mode
    assert not teacher.training
    for seed in range(3):
        loss = distill(*_batch(seed=seed))
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
        optimizer.zero_grad()
        ema.update(student)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    # The EMA holds the student's weights, keys and shapes, nothing of the teacher's.
    shadow = ema.shadow_state_dict()
    assert set(shadow) == set(student.state_dict())
    assert not any(k.startswith("teacher") for k in shadow)


def test_feature_distillation_trains_a_projection_that_is_task_state():
    student, teacher = _student(), _teacher()
    distill = Distillation.create(student, teacher, "feature", nn.CrossEntropyLoss(),
                                  distill_weight=5.0)
    projection = distill.trainable.projection
    assert projection.in_features == student.num_features == 96
    assert projection.out_features == teacher.num_features == 256
    names = {n for n, _ in distill.trainable.named_parameters()}
    assert {"projection.weight", "projection.bias"} <= names
    assert distill.student is student
    images, targets = _batch()
    loss = distill(images, targets)
    with torch.no_grad():
        t_features = teacher.forward_head(teacher.forward_features(
            distill.task.teacher.normalize_input(images, distill.task.student_mean,
                                                 distill.task.student_std)), pre_logits=True)
    features = student.forward_head(student.forward_features(images), pre_logits=True)
    mse = F.mse_loss(projection(features), t_features)
    task = F.cross_entropy(student(images), targets)
    torch.testing.assert_close(loss, task + 5.0 * mse)
    loss.backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0

    state = distill.state_dict()
    assert set(state) == {"projection"}
    other = Distillation.create(_student(), _teacher(), "feature", nn.CrossEntropyLoss())
    other.load_state_dict(copy.deepcopy(state))
    assert torch.equal(other.trainable.projection.weight, projection.weight)
    with pytest.raises(UserError, match="projection"):
        other.load_state_dict({})


def test_token_distillation_uses_the_students_distillation_head():
    torch.manual_seed(3)
    student = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=4, img_size=SIZE)
    distill = Distillation.create(student, _teacher(), "token", nn.CrossEntropyLoss(),
                                  token_type="hard")
    images, targets = _batch()
    loss = distill(images, targets)
    student.train()
    main, dist = student(images)
    with torch.no_grad():
        hard = distill.task.teacher(distill.task.teacher.normalize_input(
            images, distill.task.student_mean, distill.task.student_std)).argmax(-1)
    torch.testing.assert_close(loss, F.cross_entropy(main, targets) + F.cross_entropy(dist, hard))
    student.eval()  # evaluation (an EMA shadow's too) averages the two heads, as timm's DeiT
    assert student(images).shape == (6, 4)


def test_token_distillation_needs_a_distilled_student():
    with pytest.raises(UserError, match="distillation head"):
        Distillation.create(_student(), _teacher(), "token", nn.CrossEntropyLoss())


def test_bind_runs_the_student_through_its_wrapper():
    student = _student()
    distill = Distillation.create(student, _teacher(), "logit", nn.CrossEntropyLoss())
    # DataParallel stands for DDP (which needs a process group): both hold it as .module.
    with pytest.raises(ValueError):
        distill.bind(nn.DataParallel(_student()))
    calls = []
    wrapped = nn.DataParallel(student)
    wrapped.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    distill.bind(wrapped)
    distill(*_batch())
    assert calls == [6] and distill.trainable is wrapped and distill.student is student


def test_a_teacher_comes_from_a_local_file_with_the_students_classes(tmp_path):
    trained = _teacher("test_resnet", classes=4, seed=5)
    path = tmp_path / "teacher.pth"
    torch.save({"state_dict": trained.state_dict(), "arch": "test_resnet"}, path)
    teacher, source = build_teacher("test_resnet", 4, "logit", weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(),
                                                 trained.state_dict().values()))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert "--kd-pretrained-path" in source and "raw weights" in source
    with pytest.raises(UserError, match="4 classes .* the student 10"):
        build_teacher("test_resnet", 10, "logit", weights=str(path))
    # Feature distillation keeps the teacher's own head: any class count.
    teacher, _ = build_teacher("test_resnet", 10, "feature", weights=str(path))
    assert teacher.num_classes == 4


def test_a_teacher_without_weights_here_is_one_line(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="--kd-pretrained-path FILE"):
        build_teacher("test_resnet", 1000, "logit")
    with pytest.raises(UserError, match="classifier has 1000 classes"):
        build_teacher("test_resnet", 10, "logit")
    with pytest.raises(UserError, match="unknown model"):
        build_teacher("resnet_nope", 10, "logit")


def test_the_teachers_cost_is_said():
    torch.manual_seed(0)
    teacher = freeze(timm.create_model("resnet18", num_classes=4))
    distill = Distillation.create(_student(), teacher, "logit", nn.CrossEntropyLoss(),
                                  teacher_name="resnet18", source="a file")
    line = distill.cost_line((3, SIZE, SIZE))
    assert line.startswith("distillation (logit): teacher resnet18 from a file, 11.2M parameters")
    # FLOPs at 32 px: resnet18 0.074 G per forward, test_resnet 0.0082 G: 74 / (3 x 8.2) = 3.
    share = int(line.split("about ")[1].split("%")[0])
    assert 250 < share < 350
    assert "loss = 1 x task + 1 x distillation" in line
