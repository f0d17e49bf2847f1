"""timm's train.py flags: each one is parsed with timm's name and meaning, reaches the real code
path, and has a visible effect in a real training step on a tiny data set.

Most tests build a `Training` in-process and run `Training.run_epoch` (the same call `fit` makes,
so the recipe, loss, mixup, EMA and scheduler wiring is the product's own), observing the
step through hooks: a pre-step hook on the optimizer (LR, gradients after clipping), forward hooks
on the model (autocast dtype, memory format) and a wrapper around the training loss (targets).
A few runs go end to end through `python train.py` in subprocesses.
"""
from __future__ import annotations

import copy
import inspect
import math
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import timm
import timm.optim
import torch
import yaml
from conftest import make_training, run_cli, run_epochs, tiny_args
from torch import nn

from ematrain.checkpoint import files, schema
from ematrain.run import summary as outputs
from ematrain.run.build import build_mixup, build_train_loss
from ematrain.run.optimizer import build_optimizer, build_scheduler
from ematrain.run.training import Training
from ematrain.settings.train_specs import train_settings
from ematrain.util.errors import UserError
from ematrain.util.modules import unwrap_model

TINY = tiny_args(lr=None)
STEPS = 6  # 3 classes x 8 training images / batch 4: optimizer steps per epoch


# ----------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread_no_plots")


def make_trainer(small_data, *extra, base=TINY) -> Training:
    return make_training([small_data, *base, *extra])


def settings(small_data, *extra):
    return train_settings([str(small_data), *TINY, *map(str, extra)])


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()}


def changed(before: dict, model: nn.Module) -> bool:
    after = unwrap_model(model).state_dict()
    return any(not torch.equal(before[k], after[k])
               for k in before if before[k].is_floating_point())


class StepProbe:
    """Optimizer pre-step hook: per optimizer step, the LRs and what the gradients look like."""

    def __init__(self, tr: Training, keep_grads: bool = False):
        self.tr, self.keep_grads = tr, keep_grads
        self.lrs: list[list[float]] = []
        self.epochs: list[int] = []
        self.grads: list[dict] = []
        self.callbacks = []
        tr.run.optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        self.epochs.append(self.tr.run.counters.epoch)
        if self.keep_grads:
            named = self.tr.run.module.named_parameters()
            self.grads.append({n: p.grad.detach().clone() for n, p in named if p.grad is not None})
        for cb in self.callbacks:
            cb(len(self.lrs))

    @property
    def count(self) -> int:
        return len(self.lrs)


class LossProbe(nn.Module):
    """Wraps the trainer's training loss; records what reaches it."""

    def __init__(self, tr: Training):
        super().__init__()
        self.inner, self.tr = tr.loop.recipe.loss_fn, tr
        self.calls: list[dict] = []
        tr.loop.recipe.loss_fn = self

    def forward(self, output, target):
        loss = self.inner(output, target)
        self.calls.append({"epoch": self.tr.run.counters.epoch, "output": output.detach().float(),
                           "target": target.detach().clone(), "loss": loss.detach().float()})
        return loss


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in unwrap_model(model).modules() if isinstance(m, nn.Conv2d))


# ----------------------------------------------------------------------------- --help
GROUPS = {
    "Model parameters": ["--model", "--initial-checkpoint", "--pretrained-path", "--gp",
                         "--model-kwargs"],
    "Optimizer parameters": ["--opt", "--opt-eps", "--opt-betas", "--momentum", "--weight-decay",
                             "--clip-grad", "--clip-mode", "--layer-decay"],
    "Learning rate schedule parameters": ["--sched", "--sched-on-updates", "--lr", "--lr-base",
                                          "--lr-base-size", "--warmup-lr", "--min-lr", "--epochs",
                                          "--warmup-epochs", "--cooldown-epochs", "--decay-epochs",
                                          "--decay-rate"],
    "Augmentation and regularization parameters": [
        "--no-aug", "--scale", "--ratio", "--hflip", "--color-jitter", "--aa", "--reprob",
        "--remode", "--smoothing", "--mixup", "--cutmix", "--cutmix-minmax", "--mixup-prob",
        "--mixup-switch-prob", "--mixup-mode", "--mixup-off-epoch", "--bce-loss",
        "--bce-target-thresh"],
}
# Grouped somewhere (timm and ematrain may file these under different titles).
ANY_GROUP = ["--amp", "--amp-dtype", "--channels-last", "--torchcompile", "--grad-accum-steps",
             "--drop", "--drop-path", "--no-prefetcher", "--recovery-interval",
             "--checkpoint-hist", "--model-ema", "--model-ema-decay", "--model-ema-warmup",
             "--seed", "--log-interval"]


def help_sections(text: str) -> dict[str, set[str]]:
    """{group title: flags listed under it} from argparse's help text."""
    sections, current = {}, None
    for line in text.splitlines():
        title = re.match(r"^(\S.*):$", line)
        if title:
            current = title.group(1)
            sections[current] = set()
        elif current is not None and re.match(r"^ {2,4}-", line):
            sections[current].update(re.findall(r"--[\w-]+", line.strip().split("  ")[0]))
    return sections


def test_help_lists_flags_in_groups(capsys):
    with pytest.raises(SystemExit) as exc:
        train_settings(["--help"])
    assert exc.value.code == 0
    sections = help_sections(capsys.readouterr().out)
    for title, flags in GROUPS.items():
        assert title in sections, f"no help group '{title}' (groups: {list(sections)})"
        missing = [f for f in flags if f not in sections[title]]
        assert not missing, f"not listed under '{title}': {missing}"
    grouped = set().union(*(v for k, v in sections.items() if k not in ("options",
                                                                        "optional arguments")))
    assert not [f for f in ANY_GROUP if f not in grouped], "flags outside any argument group"


# ----------------------------------------------------------------------------- precision
def test_amp_bfloat16_autocasts_training_and_validation(small_data, tmp_path):
    tr = make_trainer(small_data, "--amp", "--amp-dtype", "bfloat16")
    assert tr.run.precision.autocast == torch.bfloat16 and tr.run.scaler is None
    seen = {True: set(), False: set()}
    first_conv(tr.run.model).register_forward_hook(
        lambda m, i, o: seen[unwrap_model(tr.run.model).training].add(o.dtype))
    probe = LossProbe(tr)
    before = snapshot(tr.run.model)
    rows = run_epochs(tr, tmp_path)
    assert seen[True] == {torch.bfloat16}, "training forward not under bfloat16 autocast"
    assert seen[False] == {torch.bfloat16}, "validation forward not under bfloat16 autocast"
    assert all(c["output"].isfinite().all() for c in probe.calls)
    assert math.isfinite(rows[0]["train_loss"]) and changed(before, tr.run.model)
    # The weights themselves stay float32 (autocast, not a bfloat16 model).
    assert all(p.dtype == torch.float32 for p in tr.run.model.parameters())


def test_no_amp_runs_float32(small_data, tmp_path):
    tr = make_trainer(small_data)
    seen = set()
    first_conv(tr.run.model).register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    run_epochs(tr, tmp_path)
    assert seen == {torch.float32} and tr.run.precision.autocast is None


def test_amp_float16_on_cpu_refused(small_data):
    with pytest.raises(UserError, match="float16") as exc:
        make_trainer(small_data, "--amp", "--amp-dtype", "float16", "--device", "cpu")
    assert exc.value.exit_code == 2


def test_amp_dtype_choices_are_timms():
    with pytest.raises(UserError, match="amp-dtype"):
        train_settings(["d", "--amp-dtype", "float8"])
    assert train_settings(["d"]).precision.amp_dtype == "float16"  # timm's default


def test_channels_last(small_data, tmp_path):
    tr = make_trainer(small_data, "--channels-last")
    convs = [m for m in tr.run.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    layouts = []
    tr.run.model.register_forward_pre_hook(
        lambda m, args: layouts.append((m.training,
                                        args[0].is_contiguous(memory_format=torch.channels_last),
                                        args[0].is_contiguous())))
    run_epochs(tr, tmp_path)
    train = [cl for training, cl, _ in layouts if training]
    evals = [cl for training, cl, _ in layouts if not training]
    assert len(train) == STEPS and all(train), "training inputs not channels_last"
    assert evals and all(evals), "validation inputs not channels_last"
    assert not any(c for _, _, c in layouts), "inputs still NCHW-contiguous"


def test_without_channels_last_inputs_are_nchw(small_data, tmp_path):
    tr = make_trainer(small_data)
    layouts = []
    tr.run.model.register_forward_pre_hook(lambda m, a: layouts.append(a[0].is_contiguous()))
    run_epochs(tr, tmp_path)
    assert layouts and all(layouts)


def test_torchcompile_eager(small_data, tmp_path):
    tr = make_trainer(small_data, "--torchcompile", "eager", "--model-ema", "--model-ema-decay",
                      "0.9")
    assert isinstance(tr.run.model, torch._dynamo.eval_frame.OptimizedModule)
    assert tr.run.settings.args.torchcompile == "eager"
    before = snapshot(tr.run.model)
    ema_before = {k: v.clone() for k, v in tr.run.emas.regular.shadow_state_dict(0).items()}
    rows = run_epochs(tr, tmp_path)
    assert math.isfinite(rows[0]["train_loss"]) and changed(before, tr.run.model)
    assert tr.run.emas.regular.steps == STEPS
    assert any(not torch.equal(ema_before[k], v)
               for k, v in tr.run.emas.regular.shadow_state_dict(0).items() if v.is_floating_point())
    ckpt = files.load_file(tmp_path / "last.pth.tar")
    plain = set(timm.create_model("test_resnet", num_classes=3).state_dict())
    for key in ("state_dict", "state_dict_ema"):
        assert not [k for k in ckpt[key] if "_orig_mod" in k], f"{key} keeps _orig_mod. prefixes"
        assert set(ckpt[key]) == plain


def test_torchcompile_default_backend_is_inductor():
    assert train_settings(["d", "--torchcompile"]).model.torchcompile == "inductor"
    assert train_settings(["d"]).model.torchcompile is None


# ----------------------------------------------------------------------------- accumulation
def _reference_grads(model, batches, loss_fn, divisor):
    ref = copy.deepcopy(unwrap_model(model))
    ref.zero_grad(set_to_none=True)
    for x, y in batches:
        (loss_fn(ref(x), y) / divisor).backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("accum", [2, 3])
def test_grad_accum_steps(small_data, tmp_path, accum):
    tr = make_trainer(small_data, "--grad-accum-steps", accum, "--model-ema", "--model-ema-decay",
                      "0.9", "--sched-on-updates")
    assert tr.run.data.steps_per_epoch == STEPS // accum
    inputs = []
    tr.run.model.register_forward_pre_hook(
        lambda m, a: inputs.append(a[0].detach().clone()) if m.training else None)
    loss = LossProbe(tr)
    probe = StepProbe(tr, keep_grads=True)
    ref = {}
    # At the first optimizer step the gradient is the mean over the group's micro-batches.
    probe.callbacks.append(lambda n: ref.update(_reference_grads(
        tr.run.model, [(x, c["target"]) for x, c in zip(inputs, loss.calls)], loss.inner, accum))
        if n == 1 else None)
    run_epochs(tr, tmp_path)
    assert len(loss.calls) == STEPS  # micro-batches
    assert probe.count == STEPS // accum  # optimizer steps
    assert tr.run.counters.num_updates == STEPS // accum
    ema = tr.run.emas.regular
    assert ema.steps == STEPS // accum and ema.num_updates == STEPS // accum
    for name, g in ref.items():
        torch.testing.assert_close(probe.grads[0][name], g, rtol=1e-4, atol=1e-6)
    # The schedule advances once per optimizer step, not per micro-batch.
    assert len({lrs[0] for lrs in probe.lrs}) == probe.count


def test_grad_accum_last_short_group_is_a_mean(small_data, tmp_path):
    tr = make_trainer(small_data, "--grad-accum-steps", "4")  # 6 batches: groups of 4 and 2
    inputs = []
    tr.run.model.register_forward_pre_hook(
        lambda m, a: inputs.append(a[0].detach().clone()) if m.training else None)
    loss = LossProbe(tr)
    probe = StepProbe(tr, keep_grads=True)
    ref = {}
    probe.callbacks.append(lambda n: ref.update(_reference_grads(
        tr.run.model, [(x, c["target"]) for x, c in list(zip(inputs, loss.calls))[4:]], loss.inner, 2))
        if n == 2 else None)
    run_epochs(tr, tmp_path)
    assert probe.count == 2
    for name, g in ref.items():
        torch.testing.assert_close(probe.grads[1][name], g, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("mode", ["norm", "value", "agc"])
def test_clip_grad(small_data, tmp_path, mode):
    from timm.utils.agc import unitwise_norm
    bound = 1e-3
    tr = make_trainer(small_data, "--clip-grad", bound, "--clip-mode", mode)
    probe = StepProbe(tr, keep_grads=True)
    run_epochs(tr, tmp_path)
    assert probe.count == STEPS
    params = dict(unwrap_model(tr.run.model).named_parameters())
    for grads in probe.grads:
        if mode == "norm":
            total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
            # Unclipped gradients are far larger, so clipping lands right on the bound.
            assert bound * 0.99 < float(total) <= bound * (1 + 1e-4)
        elif mode == "value":
            peak = max(float(g.abs().max()) for g in grads.values())
            assert peak == pytest.approx(bound, rel=1e-6)
        else:
            # Compared against the weights the step started from: the optimizer has not run.
            for name, g in grads.items():
                if name.startswith("fc."):
                    continue  # timm's train.py excludes the head from AGC
                limit = unitwise_norm(params[name].detach()).clamp(min=1e-3) * bound
                assert (unitwise_norm(g) <= limit * (1 + 1e-3) + 1e-12).all(), name


def test_clip_mode_agc_leaves_the_head_alone(small_data, tmp_path):
    from timm.utils.agc import unitwise_norm
    tr = make_trainer(small_data, "--clip-grad", "0.001", "--clip-mode", "agc")
    probe = StepProbe(tr, keep_grads=True)
    run_epochs(tr, tmp_path)
    head = unwrap_model(tr.run.model).fc.weight.detach()
    limit = unitwise_norm(head).clamp(min=1e-3) * 1e-3
    assert (unitwise_norm(probe.grads[-1]["fc.weight"]) > limit * 1.01).any()


def test_clip_mode_choices():
    with pytest.raises(UserError, match="clip-mode"):
        train_settings(["d", "--clip-mode", "max"])


# ----------------------------------------------------------------------------- losses, mixup
def test_smoothing_loss(small_data, tmp_path):
    built = build_train_loss(settings(small_data, "--smoothing", "0.3").labels)
    assert isinstance(built, nn.CrossEntropyLoss) and built.label_smoothing == 0.3
    tr = make_trainer(small_data, "--smoothing", "0.3")
    probe = LossProbe(tr)
    run_epochs(tr, tmp_path)
    assert len(probe.calls) == STEPS
    for c in probe.calls:
        assert c["target"].dim() == 1  # hard labels without mixup
        n = c["output"].size(1)
        soft = torch.full_like(c["output"], 0.3 / n)
        soft.scatter_(1, c["target"][:, None], 1 - 0.3 + 0.3 / n)
        expected = -(soft * c["output"].log_softmax(1)).sum(1).mean()
        torch.testing.assert_close(c["loss"], expected, rtol=1e-5, atol=1e-6)


def test_smoothing_zero_is_plain_cross_entropy(small_data):
    tr = make_trainer(small_data, "--smoothing", "0")
    assert isinstance(tr.run.loss_fn, nn.CrossEntropyLoss) and tr.run.loss_fn.label_smoothing == 0.0


def _mixed(target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Rows that are not a smoothed one-hot vector (i.e. mixed with another sample)."""
    n = target.size(1)
    top = 1 - smoothing + smoothing / n
    return ~torch.isclose(target.max(1).values, torch.tensor(top), atol=1e-5)


def test_mixup_cutmix_params_and_soft_targets(small_data, tmp_path):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    labels = settings(small_data, "--mixup", "0.8", "--cutmix", "1.0", "--mixup-prob", "0.9",
                      "--mixup-switch-prob", "0.3", "--mixup-mode", "pair",
                      "--smoothing", "0.1").labels
    fn = build_mixup(labels, 3)
    assert isinstance(fn, Mixup)
    assert (fn.mixup_alpha, fn.cutmix_alpha, fn.mix_prob, fn.switch_prob, fn.mode,
            fn.label_smoothing, fn.num_classes) == (0.8, 1.0, 0.9, 0.3, "pair", 0.1, 3)
    assert isinstance(build_train_loss(labels), SoftTargetCrossEntropy)
    tr = make_trainer(small_data, "--mixup", "0.8", "--cutmix", "1.0")
    assert isinstance(tr.run.loss_fn, SoftTargetCrossEntropy) and tr.run.mixup_fn.mixup_enabled
    probe = LossProbe(tr)
    run_epochs(tr, tmp_path)
    targets = [c["target"] for c in probe.calls]
    assert len(targets) == STEPS
    for t in targets:
        assert t.shape == (4, 3) and t.is_floating_point()
        torch.testing.assert_close(t.sum(1), torch.ones(4))
    assert any(_mixed(t, 0.1).any() for t in targets), "no batch was mixed"


def test_mixup_prob_zero_never_mixes(small_data, tmp_path):
    tr = make_trainer(small_data, "--mixup", "0.8", "--cutmix", "1.0", "--mixup-prob", "0")
    probe = LossProbe(tr)
    run_epochs(tr, tmp_path)
    assert not any(_mixed(c["target"], 0.1).any() for c in probe.calls)
    assert all(c["target"].dim() == 2 for c in probe.calls)


def test_cutmix_minmax_turns_mixing_on(small_data):
    labels = settings(small_data, "--cutmix-minmax", "0.2", "0.8").labels
    assert build_mixup(labels, 3).cutmix_minmax == [0.2, 0.8]


def test_mixup_needs_even_batch(small_data):
    with pytest.raises(UserError, match="even"):
        make_trainer(small_data, "--mixup", "0.8", "-b", "3")


def test_mixup_off_epoch(small_data, tmp_path):
    tr = make_trainer(small_data, "--mixup", "0.8", "--cutmix", "1.0", "--mixup-off-epoch", "1",
                      "--epochs", "2")
    probe = LossProbe(tr)
    run_epochs(tr, tmp_path / "e0", epochs=1)
    assert tr.run.mixup_fn.mixup_enabled
    run_epochs(tr, tmp_path / "e1", epochs=1)
    assert not tr.run.mixup_fn.mixup_enabled
    by_epoch = {e: [c["target"] for c in probe.calls if c["epoch"] == e] for e in (0, 1)}
    assert any(_mixed(t, 0.1).any() for t in by_epoch[0])
    assert len(by_epoch[1]) == STEPS and not any(_mixed(t, 0.1).any() for t in by_epoch[1])


def test_bce_loss(small_data, tmp_path):
    from timm.loss import BinaryCrossEntropy
    tr = make_trainer(small_data, "--bce-loss", "--smoothing", "0.2")
    assert isinstance(tr.run.loss_fn, BinaryCrossEntropy)
    assert tr.run.loss_fn.smoothing == 0.2 and tr.run.loss_fn.target_threshold is None
    probe = LossProbe(tr)
    before = snapshot(tr.run.model)
    run_epochs(tr, tmp_path)
    c = probe.calls[0]
    # timm's BCE: one-hot targets smoothed to smoothing/n off and 1-smoothing+smoothing/n on.
    n = c["output"].size(1)
    dense = torch.full_like(c["output"], 0.2 / n)
    dense.scatter_(1, c["target"][:, None], 1 - 0.2 + 0.2 / n)
    expected = nn.functional.binary_cross_entropy_with_logits(c["output"], dense)
    torch.testing.assert_close(c["loss"], expected, rtol=1e-5, atol=1e-6)
    assert changed(before, tr.run.model)


def test_bce_with_mixup_and_threshold(small_data):
    from timm.loss import BinaryCrossEntropy
    loss = build_train_loss(settings(small_data, "--bce-loss", "--bce-target-thresh", "0.2",
                                     "--mixup", "0.8").labels)
    assert isinstance(loss, BinaryCrossEntropy)
    assert loss.smoothing == 0.0 and loss.target_threshold == 0.2  # mixup smooths already


# ----------------------------------------------------------------------------- augmentation
def _transforms(tr):
    """The per-sample transform, and the batch-level random erasing after it."""
    erase = [tr.run.data.erase] if tr.run.data.erase is not None else []
    return list(tr.run.data.train_set.dataset.transform.transforms) + erase


def _of(tr, name):
    return [t for t in _transforms(tr) if type(t).__name__ == name]


def test_rand_augment(small_data):
    tr = make_trainer(small_data, "--aa", "rand-m9-mstd0.5")
    (ra,) = _of(tr, "RandAugment")
    from timm.data.auto_augment import RandAugment
    assert isinstance(ra, RandAugment) and ra.num_layers == 2
    assert {op.magnitude for op in ra.ops} == {9}
    assert {op.magnitude_std for op in ra.ops} == {0.5}
    assert not _of(make_trainer(small_data), "RandAugment")
    # The transform is the one the training loader applies.
    image, label = tr.run.data.train_set[0]
    assert image.shape == (3, 32, 32)


def test_random_erasing(small_data):
    from timm.data.random_erasing import RandomErasing
    tr = make_trainer(small_data, "--reprob", "0.5", "--remode", "pixel")
    (re_,) = _of(tr, "RandomErasing")
    assert isinstance(re_, RandomErasing)
    assert re_.probability == 0.5 and re_.mode == "pixel" and re_.per_pixel
    (re_,) = _of(make_trainer(small_data, "--reprob", "0.5", "--remode", "const"), "RandomErasing")
    assert re_.mode == "const" and not re_.per_pixel
    assert not _of(make_trainer(small_data), "RandomErasing")  # --reprob 0 by default


def test_random_erasing_reaches_the_samples(small_data):
    # reprob 1 with const mode: every training sample has a block of zeros (after normalisation).
    tr = make_trainer(small_data, "--reprob", "1.0", "--remode", "const", "--scale", "1", "1",
                      "--ratio", "1", "1", "--hflip", "0", "--color-jitter", "0")
    plain = make_trainer(small_data, "--scale", "1", "1", "--ratio", "1", "1", "--hflip", "0",
                         "--color-jitter", "0")
    from ematrain.run.step import Batches

    def first_input(t):  # the first sample as the training step receives it
        images = t.run.data.train_set[0][0][None]
        return Batches(torch.device("cpu"), normalize=t.run.data.normalize,
                       erase=t.run.data.erase)(images, torch.zeros(1, dtype=torch.long))[0][0]
    erased, clean = first_input(tr), first_input(plain)
    zeros = (erased == 0).all(0)
    assert zeros.sum() >= 4 and not (clean == 0).all(0).any()


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_hflip(small_data, p):
    tr = make_trainer(small_data, "--hflip", p)
    flips = _of(tr, "RandomHorizontalFlip")
    if p == 0:
        assert not flips
    else:
        assert len(flips) == 1 and flips[0].p == p


def test_scale_and_ratio(small_data):
    tr = make_trainer(small_data, "--scale", "0.5", "0.9", "--ratio", "0.8", "1.25")
    (crop,) = _of(tr, "RandomResizedCropAndInterpolation")
    assert tuple(crop.scale) == (0.5, 0.9) and tuple(crop.ratio) == (0.8, 1.25)
    assert tuple(crop.size) == (32, 32)


def test_color_jitter(small_data):
    tr = make_trainer(small_data, "--color-jitter", "0.2")
    (cj,) = _of(tr, "ColorJitter")
    assert cj.brightness == pytest.approx((0.8, 1.2))
    assert cj.contrast == pytest.approx((0.8, 1.2))
    assert cj.saturation == pytest.approx((0.8, 1.2))
    # 0 turns it off: timm keeps a ColorJitter that changes nothing.
    off = _of(make_trainer(small_data, "--color-jitter", "0"), "ColorJitter")
    assert all(c.brightness is c.contrast is c.saturation is c.hue is None for c in off)


def test_no_aug(small_data):
    tr = make_trainer(small_data, "--no-aug", "--aa", "rand-m9-mstd0.5", "--reprob", "0.5")
    names = {type(t).__name__ for t in _transforms(tr)}
    assert not names & {"RandAugment", "RandomErasing", "RandomHorizontalFlip", "ColorJitter",
                        "RandomResizedCropAndInterpolation"}


# ----------------------------------------------------------------------------- regularization
def test_drop_and_drop_path_resnet(small_data):
    tr = make_trainer(small_data, "--drop", "0.3", "--drop-path", "0.1")
    model = tr.run.model
    assert model.drop_rate == 0.3
    probs = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert probs and max(probs) == pytest.approx(0.1)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x)), "dropout/drop-path inactive in training"
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = make_trainer(small_data).run.model
    assert plain.drop_rate == 0.0
    assert not [m for m in plain.modules() if type(m).__name__ == "DropPath"]
    plain.train()
    assert torch.equal(plain(x), plain(x))


def test_drop_and_drop_path_vit(small_data):
    tr = make_trainer(small_data, "--model", "test_vit", "--model-kwargs", "img_size=32",
                      "--drop", "0.3", "--drop-path", "0.1")
    assert tr.run.model.head_drop.p == 0.3
    assert tr.run.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


# ----------------------------------------------------------------------------- schedules
TIMM_SCHEDULERS = ["cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "wsd",
                   "rsqrt"]


def test_scheduler_list_matches_timm():
    from timm.scheduler import scheduler_factory
    src = inspect.getsource(scheduler_factory.create_scheduler_v2)
    names = set(re.findall(r"sched == '(\w+)'", src))
    for group in re.findall(r"sched in \(([^)]*)\)", src):
        names |= set(re.findall(r"'(\w+)'", group))
    if not names:
        pytest.skip("cannot read timm's scheduler names from its source")
    untested = names - set(TIMM_SCHEDULERS)
    assert not untested, f"timm knows schedulers not tested here: {sorted(untested)}"


def _lr_curve(tr, metric=50.0):
    lrs = []
    for epoch in range(tr.run.num_epochs + 1):
        lrs.append(tr.run.optimizer.param_groups[0]["lr"])
        tr.run.scheduler.step(epoch + 1, metric)
    return lrs


@pytest.mark.filterwarnings("ignore:PlateauLRScheduler is deprecated")
@pytest.mark.parametrize("sched", TIMM_SCHEDULERS)
def test_every_timm_scheduler(small_data, sched):
    extra = ["--sched", sched, "--epochs", "4", "--lr", "0.1", "--decay-epochs", "1",
             "--decay-rate", "0.5", "--min-lr", "0.001"]
    if sched == "rsqrt":
        extra += ["--warmup-epochs", "1"]  # its timescale defaults to the warmup length
    tr = make_trainer(small_data, *extra)
    assert tr.run.num_epochs == 4
    lrs = _lr_curve(tr)
    assert all(math.isfinite(x) and x >= 0 for x in lrs)
    body = lrs[1:] if sched == "rsqrt" else lrs
    assert body[0] == pytest.approx(0.1)
    assert all(b <= a + 1e-12 for a, b in zip(body, body[1:])), lrs
    expected = {
        "cosine": [0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi * e / 4)) for e in range(5)],
        "step": [0.1 * 0.5 ** e for e in range(5)],
        "constant": [0.1] * 5,
        "multistep": [0.1] * 5,  # timm's default milestones 90, 180, 270
        "plateau": [0.1] * 5,  # patience 10 epochs
    }
    if sched in expected:
        assert lrs == pytest.approx(expected[sched])
    if sched in ("cosine", "tanh", "poly", "wsd"):
        assert lrs[-1] == pytest.approx(0.001)  # ends at --min-lr


def test_plateau_mode_follows_eval_metric(small_data):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        plateau = make_trainer(small_data, "--sched", "plateau").run.scheduler
        assert plateau.lr_scheduler.mode == "max"
        tr = make_trainer(small_data, "--sched", "plateau", "--eval-metric", "loss")
    assert tr.run.scheduler.lr_scheduler.mode == "min"


def test_unknown_scheduler_refused(small_data):
    with pytest.raises(UserError, match="scheduler 'nope'"):
        make_trainer(small_data, "--sched", "nope")


def test_sched_none_trains_at_constant_lr(small_data, tmp_path):
    tr = make_trainer(small_data, "--sched", "none", "--lr", "0.05", "--epochs", "2")
    probe = StepProbe(tr)
    run_epochs(tr, tmp_path, epochs=2)
    assert {lrs[0] for lrs in probe.lrs} == {0.05}


def test_step_schedule_in_training(small_data, tmp_path):
    tr = make_trainer(small_data, "--sched", "step", "--decay-epochs", "1", "--decay-rate", "0.5",
                      "--lr", "0.08", "--epochs", "3")
    probe = StepProbe(tr)
    rows = run_epochs(tr, tmp_path, epochs=3)
    per_epoch = {e: {lrs[0] for lrs, ep in zip(probe.lrs, probe.epochs) if ep == e}
                 for e in range(3)}
    assert per_epoch == {0: {0.08}, 1: {0.04}, 2: {0.02}}
    assert [r["lr"] for r in rows] == pytest.approx([0.08, 0.04, 0.02])


def test_warmup_epochs_and_warmup_lr(small_data, tmp_path):
    tr = make_trainer(small_data, "--warmup-epochs", "2", "--warmup-lr", "1e-4", "--lr", "0.1",
                      "--epochs", "5")
    probe = StepProbe(tr)
    run_epochs(tr, tmp_path, epochs=2)
    per_epoch = [{lrs[0] for lrs, ep in zip(probe.lrs, probe.epochs) if ep == e} for e in (0, 1)]
    assert len(per_epoch[0]) == len(per_epoch[1]) == 1
    assert per_epoch[0].pop() == pytest.approx(1e-4)  # the first epoch trains at --warmup-lr
    assert per_epoch[1].pop() == pytest.approx(1e-4 + (0.1 - 1e-4) / 2)  # linear warmup


def test_cooldown_epochs_added(small_data):
    assert make_trainer(small_data, "--epochs", "3").run.num_epochs == 3
    tr = make_trainer(small_data, "--epochs", "3", "--cooldown-epochs", "2", "--min-lr", "0.001",
                      "--lr", "0.1")
    assert tr.run.num_epochs == 5
    lrs = _lr_curve(tr)
    assert lrs[3:5] == pytest.approx([0.001, 0.001])  # the cooldown epochs sit at --min-lr


def test_sched_on_updates(small_data, tmp_path):
    tr = make_trainer(small_data, "--sched-on-updates", "--lr", "0.1", "--epochs", "2")
    probe = StepProbe(tr)
    run_epochs(tr, tmp_path)
    lrs = [x[0] for x in probe.lrs]
    assert len(lrs) == STEPS and len(set(lrs)) == STEPS
    assert all(b < a for a, b in zip(lrs, lrs[1:])), lrs
    # t counts updates: after 6 of 12 the cosine is half way.
    assert tr.run.optimizer.param_groups[0]["lr"] == pytest.approx(0.05, rel=1e-6)
    tr = make_trainer(small_data, "--lr", "0.1", "--epochs", "2")
    probe = StepProbe(tr)
    run_epochs(tr, tmp_path / "epochs")
    assert {x[0] for x in probe.lrs} == {0.1}


def test_plateau_refuses_sched_on_updates(small_data):
    with pytest.raises(UserError, match="plateau"):
        make_trainer(small_data, "--sched", "plateau", "--sched-on-updates")


def test_build_scheduler_on_updates_scales_lengths(small_data):
    spec = settings(small_data, "--sched", "step", "--decay-epochs", "1", "--decay-rate", "0.5",
                    "--sched-on-updates", "--lr", "0.1").schedule
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched, epochs = build_scheduler(spec, opt, updates_per_epoch=10, seed=0, eval_metric="top1")
    assert sched.t_in_epochs is False and sched.decay_t == 10 and epochs == 1


# ----------------------------------------------------------------------------- optimisers
ALL_OPTIMIZERS = timm.optim.list_optimizers()


@pytest.fixture(scope="module")
def opt_model():
    return timm.create_model("test_resnet", num_classes=3)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ALL_OPTIMIZERS)
def test_every_timm_optimizer_builds(small_data, opt_model, name):
    spec = settings(small_data, "--opt", name).optim
    try:
        opt = build_optimizer(spec, opt_model, 1e-3)
    except UserError as exc:
        # Refused as a one-line user error (exit 2), never a traceback.
        if "CUDA" in str(exc) or "install" in str(exc).lower():
            pytest.skip(f"--opt {name}: {str(exc).split(': ', 1)[-1]} (not on this machine)")
        raise
    assert isinstance(opt, torch.optim.Optimizer)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(opt_model.parameters()))
    assert {g["lr"] for g in opt.param_groups} == {1e-3}


@pytest.mark.parametrize("name", ["sgd", "adamw", "lamb", "lion"])
def test_optimizer_step_changes_weights(small_data, tmp_path, name):
    tr = make_trainer(small_data, "--opt", name, "--lr", "1e-3")
    assert type(tr.run.optimizer).__name__.lower().startswith({"sgd": "sgd", "adamw": "adamw",
                                                           "lamb": "lamb", "lion": "lion"}[name])
    before = snapshot(tr.run.model)
    rows = run_epochs(tr, tmp_path)
    assert math.isfinite(rows[0]["train_loss"]) and changed(before, tr.run.model)


def test_second_order_optimizer_trains(small_data, tmp_path):
    tr = make_trainer(small_data, "--opt", "adahessian", "--lr", "1e-3")
    before = snapshot(tr.run.model)
    run_epochs(tr, tmp_path)
    assert changed(before, tr.run.model)


def test_unknown_optimizer_refused(small_data):
    with pytest.raises(UserError, match="optimizer 'nope'"):
        make_trainer(small_data, "--opt", "nope")


def test_opt_eps_betas_momentum_weight_decay(small_data):
    tr = make_trainer(small_data, "--opt", "adamw", "--opt-eps", "1e-6", "--opt-betas", "0.8",
                      "0.95", "--weight-decay", "0.05")
    groups = tr.run.optimizer.param_groups
    assert {g["eps"] for g in groups} == {1e-6}
    assert {tuple(g["betas"]) for g in groups} == {(0.8, 0.95)}
    # timm: no weight decay on biases and norm weights, --weight-decay on the rest.
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}
    tr = make_trainer(small_data, "--opt", "sgd", "--momentum", "0.7")
    assert {g["momentum"] for g in tr.run.optimizer.param_groups} == {0.7}
    assert {g["nesterov"] for g in tr.run.optimizer.param_groups} == {True}  # timm's sgd


def test_layer_decay(small_data, tmp_path):
    tr = make_trainer(small_data, "--model", "test_vit", "--model-kwargs", "img_size=32", "--opt",
                      "adamw", "--layer-decay", "0.65", "--lr", "1e-3")
    depth = len(tr.run.model.blocks)
    scales = sorted({g["lr_scale"] for g in tr.run.optimizer.param_groups})
    assert len(scales) == depth + 2
    assert scales[-1] == pytest.approx(1.0)
    assert scales == pytest.approx([0.65 ** (depth + 1 - i) for i in range(depth + 2)])
    probe = StepProbe(tr)
    before = snapshot(tr.run.model)
    run_epochs(tr, tmp_path)
    # The schedule applies each group's scale to the LR it sets.
    for lrs in probe.lrs:
        for lr, g in zip(lrs, tr.run.optimizer.param_groups):
            assert lr == pytest.approx(1e-3 * g["lr_scale"])
    assert changed(before, tr.run.model)
    plain = make_trainer(small_data, "--model", "test_vit", "--model-kwargs", "img_size=32",
                         "--opt", "adamw")
    assert all("lr_scale" not in g or g["lr_scale"] == 1.0 for g in plain.run.optimizer.param_groups)


# ----------------------------------------------------------------------------- learning rate
def test_lr_from_lr_base():
    def lr(*flags):
        return train_settings(["d", *flags]).lr()
    base = ["--lr-base", "0.1", "--lr-base-size", "256", "-b", "64"]
    assert lr(*base) == pytest.approx(0.025)  # linear for sgd
    assert lr(*base, "--opt", "adamw") == pytest.approx(0.05)  # sqrt for adaptive optimizers
    assert lr(*base, "--opt", "lamb") == pytest.approx(0.05)
    assert lr(*base, "--grad-accum-steps", "2") == pytest.approx(0.05)  # the global batch
    assert train_settings(["d", *base]).lr(world_size=4) == pytest.approx(0.1)
    assert lr(*base, "--lr", "0.3") == 0.3  # --lr wins
    assert lr() == pytest.approx(0.1 * 128 / 256)  # timm defaults: --lr-base 0.1, -b 128


def test_lr_base_reaches_the_optimizer(small_data, tmp_path):
    tr = make_trainer(small_data, "--lr-base", "0.1", "--lr-base-size", "16")
    assert tr.run.lr == pytest.approx(0.025)
    probe = StepProbe(tr)
    run_epochs(tr, tmp_path)
    assert [x[0] for x in probe.lrs] == pytest.approx([0.025] * STEPS)


# ----------------------------------------------------------------------------- model set-up
@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(123)
    return timm.create_model("test_resnet", num_classes=3)


def _assert_weights(model, state, skip=()):
    own = unwrap_model(model).state_dict()
    for k, v in state.items():
        if not k.startswith(skip):
            assert torch.equal(own[k], v), k


@pytest.mark.parametrize("kind", ["ours", "state_dict", "safetensors"])
def test_initial_checkpoint(small_data, tmp_path, source_model, kind):
    state = source_model.state_dict()
    fresh = make_trainer(small_data).run.model.state_dict()
    assert not torch.equal(fresh["fc.weight"], state["fc.weight"])
    if kind == "ours":
        donor = make_trainer(small_data, "--seed", "7")
        donor.run.model.load_state_dict(state)
        path = tmp_path / "donor.pth.tar"
        files.write_file(path, schema.save(donor.run))
    elif kind == "state_dict":
        path = tmp_path / "weights.pth"
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    tr = make_trainer(small_data, "--initial-checkpoint", path, "--model-ema", "--model-ema-decay",
                      "0.9")
    _assert_weights(tr.run.model, state)
    _assert_weights(tr.run.emas.regular.shadows[0], state)  # the EMA starts from them too


def test_initial_checkpoint_wrong_model_refused(small_data, tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit", num_classes=3).state_dict(), path)
    with pytest.raises(UserError, match="does not fit"):
        make_trainer(small_data, "--initial-checkpoint", path)


def test_pretrained_path(small_data, tmp_path, source_model):
    path = tmp_path / "pretrained.pth"
    torch.save(source_model.state_dict(), path)
    tr = make_trainer(small_data, "--pretrained-path", path)
    # The file's classifier has the data's class count, so it is kept (timm alone would compare
    # with its pretrained config's 1000 classes and re-initialise it); test_start_weights covers
    # a classifier of another class count.
    _assert_weights(tr.run.model, source_model.state_dict())
    with pytest.raises(UserError, match="not found"):
        make_trainer(small_data, "--pretrained-path", tmp_path / "missing.pth")


@pytest.mark.parametrize("pool", ["max", "avgmax"])
def test_global_pool(small_data, pool):
    tr = make_trainer(small_data, "--gp", pool)
    assert tr.run.model.global_pool.pool_type == pool
    feats = torch.randn(2, tr.run.model.num_features, 3, 3)
    pooled = tr.run.model.forward_head(feats, pre_logits=True)
    expected = {"max": feats.amax((2, 3)),
                "avgmax": 0.5 * (feats.amax((2, 3)) + feats.mean((2, 3)))}[pool]
    torch.testing.assert_close(pooled, expected)
    assert make_trainer(small_data).run.model.global_pool.pool_type == "avg"


def test_model_kwargs(small_data, tmp_path):
    tr = make_trainer(small_data, "--model-kwargs", "stem_width=8", "stem_type=deep")
    assert tr.run.settings.args.model_kwargs == {"stem_width": 8, "stem_type": "deep"}
    assert tr.run.model.conv1[0].out_channels == 8
    assert make_trainer(small_data).run.model.conv1[0].out_channels != 8
    before = snapshot(tr.run.model)
    run_epochs(tr, tmp_path)
    assert changed(before, tr.run.model)


def test_model_kwargs_bad_key_refused(small_data):
    with pytest.raises(UserError):
        make_trainer(small_data, "--model-kwargs", "no_such_kwarg=1")


# ----------------------------------------------------------------------------- housekeeping
def test_checkpoint_hist(small_data, tmp_path):
    tr = make_trainer(small_data, "--epochs", "3", "--checkpoint-hist", "1", "--output", tmp_path,
                      "--experiment", "hist")
    assert tr.fit() == 0
    kept = sorted(p.name for p in tr.run_dir.glob("checkpoint-*.pth.tar"))
    assert len(kept) == 1 and len(tr.run.keeper.history) == 1
    assert kept == [f"checkpoint-{tr.run.keeper.history[0][1]}.pth.tar"]


def test_recovery_interval(small_data, tmp_path):
    tr = make_trainer(small_data, "--recovery-interval", "2", "--model-ema", "--model-ema-decay",
                      "0.9")
    seen = []
    real_write = tr.run.keeper._write

    def write(name, ckpt):  # in the background writer, as each file is written
        path = real_write(name, ckpt)
        if name == "recovery.pth.tar":
            on_disk = files.load_file(path)
            seen.append((on_disk["counters"]["epoch_step"], on_disk["counters"]["num_updates"],
                         "state_dict_ema" in on_disk))
        return path

    tr.run.keeper._write = write
    run_epochs(tr, tmp_path)
    assert seen == [(2, 2, True), (4, 4, True)]  # the last step is covered by last.pth.tar
    assert not (tmp_path / "recovery.pth.tar").exists()  # superseded at the epoch's end
    assert (tmp_path / "last.pth.tar").is_file()


def test_recovery_interval_off_by_default(small_data, tmp_path):
    tr = make_trainer(small_data)
    names = []
    real_write = tr.run.keeper._write
    tr.run.keeper._write = lambda name, ckpt: (names.append(name), real_write(name, ckpt))[1]
    run_epochs(tr, tmp_path)
    assert "recovery.pth.tar" not in names


def test_no_prefetcher_accepted(small_data):
    tr = make_trainer(small_data, "--no-prefetcher")
    assert tr.run.settings.args.no_prefetcher is True


# ----------------------------------------------------------------------------- end to end
def _run_all(jobs: dict) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        with ThreadPoolExecutor(2) as pool:
            futures = {k: pool.submit(run_cli, "train.py", *v) for k, v in jobs.items()}
            return {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope="module")
def cli_runs(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("flags_e2e")
    common = [small_data, *TINY, "--output", out]
    procs = _run_all({
        "combined": [*common, "--experiment", "combined", "--epochs", "2",
                     "--amp", "--amp-dtype", "bfloat16", "--channels-last",
                     "--grad-accum-steps", "2", "--clip-grad", "1.0", "--clip-mode", "norm",
                     "--mixup", "0.8", "--cutmix", "1.0", "--mixup-off-epoch", "1",
                     "--aa", "rand-m9-mstd0.5", "--reprob", "0.25",
                     "--sched", "step", "--decay-epochs", "1", "--decay-rate", "0.5",
                     "--lr", "0.05", "--opt", "adamw", "--opt-betas", "0.9", "0.99",
                     "--drop-path", "0.05", "--model-ema", "--model-ema-decay", "0.9",
                     "--checkpoint-hist", "1", "--recovery-interval", "1", "--no-prefetcher"],
        "compiled": [*common, "--experiment", "compiled", "--torchcompile", "eager",
                     "--model-ema", "--model-ema-decay", "0.9"],
        "fp16": [*common, "--experiment", "fp16", "--amp", "--amp-dtype", "float16",
                 "--device", "cpu"],
    })
    return out, procs


def test_cli_combined_flags(cli_runs):
    out, procs = cli_runs
    proc = procs["combined"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / "combined"
    saved = yaml.safe_load((run / "args.yaml").read_text())
    assert saved["amp"] and saved["amp_dtype"] == "bfloat16" and saved["channels_last"]
    assert saved["grad_accum_steps"] == 2 and saved["mixup"] == 0.8
    assert saved["aa"] == "rand-m9-mstd0.5" and saved["recovery_interval"] == 1
    ckpt = files.load_file(run / "last.pth.tar")
    assert ckpt["epoch"] == 1 and ckpt["counters"]["num_updates"] == 2 * STEPS // 2
    assert ckpt["ema"]["steps"] == 2 * STEPS // 2
    assert tuple(ckpt["optimizer"]["param_groups"][0]["betas"]) == (0.9, 0.99)
    lrs = [float(r["lr"]) for r in outputs.read_summary(run)]
    assert lrs == pytest.approx([0.05, 0.025])
    assert len(list(run.glob("checkpoint-*.pth.tar"))) == 1
    assert not (run / "recovery.pth.tar").exists()


def test_cli_torchcompile_checkpoint_keys(cli_runs):
    out, procs = cli_runs
    proc = procs["compiled"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = files.load_file(out / "compiled" / "last.pth.tar")
    for key in ("state_dict", "state_dict_ema"):
        assert ckpt[key] and not [k for k in ckpt[key] if k.startswith("_orig_mod.")]
    model = timm.create_model("test_resnet", num_classes=3)
    model.load_state_dict(ckpt["state_dict"])  # loads into a plain timm model


def test_cli_amp_float16_on_cpu_exit_2(cli_runs):
    _, procs = cli_runs
    proc = procs["fp16"]
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("train.py: error:") and "float16" in lines[-1]
    assert "Traceback" not in proc.stderr
