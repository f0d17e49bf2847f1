"""The train step and the loop around it: `train_step` is forward, loss, backward, clip, step and
EMA update with exact arithmetic; the loop finds a non-finite loss at its exact step, skips it
without a trace when asked, and never saves weights a bad step has spoiled."""
from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_training, tiny_args

from ematrain.ema import ModelEma
from ematrain.run.loop import NonFiniteLoss
from ematrain.run.step import Recipe, train_step

TINY = tiny_args()


pytestmark = pytest.mark.usefixtures("one_thread_no_plots")


def _pair(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=3)
    reference = timm.create_model("test_resnet", num_classes=3)
    reference.load_state_dict(model.state_dict())
    return model, reference


def test_one_step_is_forward_loss_backward_clip_sgd_and_the_ema_lerp():
    model, reference = _pair()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ModelEma(model, 0.75)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recipe = Recipe(torch.nn.CrossEntropyLoss(), clip_grad=0.5, clip_mode="norm")
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    model.train()
    loss = train_step(model, optimizer, images, targets, recipe, ema)
    # The same recipe by hand.
    reference.train()
    ref_loss = torch.nn.functional.cross_entropy(reference(images), targets)
    ref_loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    assert torch.equal(loss, ref_loss.detach())
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-6, atol=1e-7)
        if value.is_floating_point():  # ema = 0.75 * start + 0.25 * model after the step
            expected = start[name] + 0.25 * (model.state_dict()[name] - start[name])
            torch.testing.assert_close(ema.module.state_dict()[name], expected, rtol=1e-6,
                                       atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


def test_an_accumulation_micro_batch_only_accumulates():
    model, _ = _pair()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = ModelEma(model, 0.75)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recipe = Recipe(torch.nn.CrossEntropyLoss())
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    model.train()
    loss = train_step(model, optimizer, images, targets, recipe, ema, update=False, group_size=2)
    ref = torch.nn.functional.cross_entropy(model(images), targets)
    assert torch.isclose(loss, ref.detach(), rtol=1e-5)
    for name, value in start.items():
        assert torch.equal(model.state_dict()[name], value), name  # no step yet
    assert ema.steps == 0 and all(p.grad is not None for p in model.parameters())
    # The gradient so far is the micro-batch's loss divided by the group size.
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (ref / 2).backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


class NanAfter(torch.nn.Module):
    def __init__(self, first_bad):
        super().__init__()
        self.first_bad, self.calls = first_bad, 0
        self.ce = torch.nn.CrossEntropyLoss()

    def forward(self, output, target):
        self.calls += 1
        loss = self.ce(output, target)
        return loss * float("nan") if self.calls - 1 >= self.first_bad else loss


def test_recovery_save_never_stores_weights_after_a_bad_step(small_data, tmp_path):
    tr = make_training([small_data, *TINY, "--output", tmp_path, "--log-interval", "100",
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


def test_skipped_step_leaves_batchnorm_statistics_untouched(small_data, tmp_path):
    tr = make_training([small_data, *TINY, "--output", tmp_path, "--log-interval", "100",
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


class NanOnSteps(torch.nn.Module):
    """Cross-entropy that returns NaN on chosen calls, to fake a diverging step."""

    def __init__(self, bad_calls):
        super().__init__()
        self.bad_calls, self.calls = set(bad_calls), 0
        self.ce = torch.nn.CrossEntropyLoss()

    def forward(self, output, target):
        loss = self.ce(output, target)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 in self.bad_calls else loss


def _run(small_data, tmp_path, *extra):
    return make_training([small_data, *TINY, "--output", tmp_path, "--log-interval", "100", *extra])


def _epoch(tr, loss_fn):
    """One training epoch of `tr` (its loop, recovery and stop handling) with this loss."""
    tr.loop.recipe.loss_fn = loss_fn
    loader, _ = tr.run.data.loaders(0, 0, seed=0)
    tr.train(loader, lambda: False)
    return tr.run.counters


def test_nonfinite_loss_stops_with_exact_step_and_untouched_ema(small_data, tmp_path):
    tr = _run(small_data, tmp_path, "--model-ema", "--model-ema-decay", "0.9",
              "--model-ema-precheck")
    ema = tr.run.emas.regular
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with pytest.raises(NonFiniteLoss) as info:
        _epoch(tr, NanOnSteps({2}))
    assert info.value.step == 2 and info.value.epoch == 0
    # Steps 0 and 1 were averaged in; the NaN step and everything after were refused.
    assert ema.num_updates == 2
    assert ema.skipped_nonfinite >= 1
    for name, value in ema.module.state_dict().items():
        assert torch.isfinite(value.float()).all(), name
    assert any(not torch.equal(before[k], v) for k, v in ema.module.state_dict().items())


def test_without_the_precheck_a_nonfinite_run_stops_before_its_shadows_are_saved(small_data,
                                                                                 tmp_path):
    from ematrain.run import training as train
    from ematrain.run.loop import NonFiniteShadows
    tr = _run(small_data, tmp_path, "--model-ema", "--model-ema-decay", "0.9")
    with pytest.raises(NonFiniteLoss) as info:
        _epoch(tr, NanOnSteps({2}))
    assert info.value.step == 2
    assert tr.run.emas.regular.nonfinite_shadows() == [0]  # averaged in: it must never leave memory
    with pytest.raises(NonFiniteShadows, match="EMA ema 0.9 holds NaN/Inf at epoch 0"):
        train.Training.check_weights(_with_clean_loss_record(tr))


def _with_clean_loss_record(tr):
    tr.loop.tally.first_bad.fill_(-1)  # as if the loss had stayed finite: the shadows still tell
    return tr


def test_skip_nonfinite_skips_the_bad_step_only(small_data, tmp_path):
    tr = _run(small_data, tmp_path, "--model-ema", "--model-ema-decay", "0.9",
              "--skip-nonfinite", "1", "--model-ema-precheck")
    counters = _epoch(tr, NanOnSteps({1}))
    steps = tr.run.data.steps_per_epoch
    assert counters.skipped_nonfinite == 1
    assert counters.num_updates == steps - 1
    assert tr.run.emas.regular.num_updates == steps - 1
    assert torch.isfinite(torch.tensor(counters.train_loss))
    for value in tr.run.model.state_dict().values():
        assert torch.isfinite(value.float()).all()


def test_skip_nonfinite_budget_exhausted_stops(small_data, tmp_path):
    tr = _run(small_data, tmp_path, "--skip-nonfinite", "1")
    with pytest.raises(NonFiniteLoss):
        _epoch(tr, NanOnSteps({0, 1}))
