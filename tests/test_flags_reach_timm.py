"""The rest of timm's schedule, optimizer, augmentation and model flags: each reaches timm's
building block and changes what it builds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_imagefolder, make_training, run_cli, tiny_args
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from ematrain.run.training import Training
from ematrain.settings.train_specs import train_settings

TINY = tiny_args(epochs=4, lr="0.1")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("more") / "data", num_classes=3,
                            train_per_class=4, val_per_class=2)


def trainer(data, *extra) -> Training:
    return make_training([data, *TINY, *extra])


def epoch_lrs(tr: Training, epochs: int) -> list[float]:
    """LR at the start of each epoch as the scheduler sets it."""
    lrs = []
    for epoch in range(epochs):
        tr.run.scheduler.step(epoch)
        lrs.append(tr.run.optimizer.param_groups[0]["lr"])
    return lrs


def test_decay_milestones_set_multistep_epochs(data):
    tr = trainer(data, "--sched", "multistep", "--decay-milestones", "1", "3", "--decay-rate", "0.5")
    assert list(tr.run.scheduler.decay_t) == [1, 3]
    # timm's MultiStepLRScheduler decays one epoch ahead of each milestone (bisect on t + 1).
    assert epoch_lrs(tr, 4) == pytest.approx([0.05, 0.05, 0.025, 0.025])
    default = trainer(data, "--sched", "multistep")
    assert list(default.run.scheduler.decay_t) == [90, 180, 270]


def test_warmup_prefix_runs_warmup_before_the_schedule(data):
    inside = epoch_lrs(trainer(data, "--warmup-epochs", "1", "--warmup-lr", "0.01"), 3)
    prefix = epoch_lrs(trainer(data, "--warmup-epochs", "1", "--warmup-lr", "0.01",
                               "--warmup-prefix"), 3)
    assert inside[0] == prefix[0] == pytest.approx(0.01)
    # With the prefix the cosine starts after the warmup: epoch 1 is at the peak LR.
    assert prefix[1] == pytest.approx(0.1) and inside[1] < 0.1


def test_lr_cycle_limit_restarts_the_cosine(data):
    one = epoch_lrs(trainer(data, "--epochs", "4"), 4)
    two = epoch_lrs(trainer(data, "--epochs", "4", "--lr-cycle-limit", "2",
                            "--lr-cycle-decay", "0.5"), 4)
    assert tr_num_epochs(data, "--lr-cycle-limit", "2") > 4 or two != one


def tr_num_epochs(data, *extra) -> int:
    return trainer(data, *extra).run.num_epochs


def test_lr_k_decay_changes_the_cosine_shape(data):
    plain = epoch_lrs(trainer(data), 4)
    k = epoch_lrs(trainer(data, "--lr-k-decay", "2.0"), 4)
    assert plain[0] == k[0] and plain[2] != pytest.approx(k[2])


def test_lr_noise_perturbs_the_schedule(data):
    plain = epoch_lrs(trainer(data), 4)
    noisy = epoch_lrs(trainer(data, "--lr-noise", "0.25", "--lr-noise-pct", "0.5"), 4)
    assert noisy[0] == plain[0] and noisy[1:] != pytest.approx(plain[1:])


def test_patience_epochs_reach_the_plateau_scheduler(data):
    tr = trainer(data, "--sched", "plateau", "--patience-epochs", "3")
    assert tr.run.scheduler.lr_scheduler.patience == 3


def test_opt_kwargs_reach_the_optimizer(data):
    tr = trainer(data, "--opt", "sgd", "--opt-kwargs", "nesterov=True", "dampening=0")
    assert tr.run.optimizer.param_groups[0]["nesterov"] is True


def _train_ops(tr):
    erase = [tr.run.data.erase] if tr.run.data.erase is not None else []
    return list(tr.run.data.train_set.dataset.transform.transforms) + erase


def test_train_interpolation_vflip_and_recount_reach_the_transform(data):
    ops = _train_ops(trainer(data, "--train-interpolation", "bicubic", "--vflip", "0.3",
                             "--reprob", "0.5", "--recount", "3"))
    crop = next(o for o in ops if isinstance(o, RandomResizedCropAndInterpolation))
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    vflip = next(o for o in ops if isinstance(o, T.RandomVerticalFlip))
    assert vflip.p == 0.3
    erase = next(o for o in ops if isinstance(o, RandomErasing))
    assert erase.max_count == 3
    default = _train_ops(trainer(data))
    crop = next(o for o in default if isinstance(o, RandomResizedCropAndInterpolation))
    assert isinstance(crop.interpolation, (tuple, list))  # timm's 'random': several modes
    assert not any(isinstance(o, T.RandomVerticalFlip) for o in default)


def test_grad_checkpointing_is_switched_on(data):
    tr = trainer(data, "--grad-checkpointing")
    assert tr.run.model.grad_checkpointing is True
    assert trainer(data).run.model.grad_checkpointing is False


def test_in_chans_other_than_three_is_refused(data, tmp_path):
    r = run_cli("train.py", data, *TINY, "--in-chans", "1", "--output", tmp_path)
    assert r.returncode == 2 and "only 3 channels" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flag", ["--pin-mem", "--no-prefetcher"])
def test_compatibility_flags_are_accepted(data, flag):
    assert getattr(train_settings([str(data), flag]).args, flag[2:].replace("-", "_")) is True


# ------------------------------------------------------------------ data root and model flags
def test_data_dir_flag_is_the_positional_root(data, tmp_path):
    assert train_settings(["--data-dir", str(data)]).data.data_dir == str(data)
    assert train_settings([str(data), "--data-dir", str(data)]).data.data_dir == str(data)
    tr = make_training(["--data-dir", str(data), *TINY])
    assert tr.run.data.class_names == trainer(data).run.data.class_names == [
        "class_0", "class_1", "class_2"]
    r = run_cli("train.py", data, "--data-dir", tmp_path, *TINY, "--output", tmp_path / "out")
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    assert r.stderr.strip() == f"train.py: error: two data roots given: {data} and --data-dir {tmp_path}"


def test_data_root_on_the_command_line_wins_over_a_recipe(data, tmp_path):
    other = make_imagefolder(tmp_path / "other", num_classes=2, train_per_class=2,
                             val_per_class=1)
    recipe = tmp_path / "args.yaml"
    recipe.write_text(f"data_dir: {data}\nmodel: test_resnet\n")
    assert train_settings(["-c", recipe]).data.data_dir == str(data)
    assert train_settings(["-c", recipe, str(other)]).data.data_dir == str(other)
    assert train_settings(["-c", recipe, "--data-dir", str(other)]).data.data_dir == str(other)


def test_validate_takes_data_dir_too(tmp_path):
    from ematrain.settings.validate_specs import validate_settings
    assert validate_settings(["--data-dir", str(tmp_path), "--checkpoint", "x"]).data_dir == str(
        tmp_path)
    assert validate_settings([str(tmp_path), "--checkpoint", "x"]).data_dir == str(tmp_path)
    r = run_cli("validate.py", "--checkpoint", tmp_path / "x.pth.tar")
    assert r.returncode == 2 and "no data root given" in r.stderr and "Traceback" not in r.stderr


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_bn_momentum_and_eps_reach_every_batchnorm(data):
    default = _batchnorms(trainer(data).run.model)
    assert default and {(m.momentum, m.eps) for m in default} == {(0.1, 1e-5)}
    changed = _batchnorms(trainer(data, "--bn-momentum", "0.01", "--bn-eps", "1e-3").run.model)
    assert len(changed) == len(default)
    assert {(m.momentum, m.eps) for m in changed} == {(0.01, 1e-3)}
    # The running mean moves at the new momentum: one training forward of a constant batch.
    layer = changed[0]
    before = layer.running_mean.clone()
    layer.train()
    x = torch.randn(4, layer.num_features, 2, 2)
    layer(x)
    expected = 0.99 * before + 0.01 * x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(layer.running_mean, expected)


def test_bn_flags_on_a_model_without_batchnorm_are_refused(data, tmp_path):
    r = run_cli("train.py", data, *TINY, "--model", "test_vit", "--bn-eps", "1e-3",
                "--output", tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "train.py: error: --bn-eps given but the model has no BatchNorm layers"


def test_drop_block_reaches_the_model(data, tmp_path):
    from timm.layers import DropBlock2d
    blocks = [m for m in trainer(data, "--drop-block", "0.2").run.model.modules()
              if isinstance(m, DropBlock2d)]
    assert blocks and all(b.drop_prob == pytest.approx(0.2) for b in blocks)
    assert not any(isinstance(m, DropBlock2d) for m in trainer(data).run.model.modules())
    r = run_cli("train.py", data, *TINY, "--model", "test_vit", "--drop-block", "0.2",
                "--output", tmp_path)
    assert r.returncode == 2 and "drop_block_rate" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train.py", data, *TINY, "--drop-block", "1.5", "--output", tmp_path)
    assert r.returncode == 2 and "--drop-block must be in [0, 1), got 1.5" in r.stderr


def test_model_kwargs_win_over_the_named_flags(data):
    from timm.layers import DropBlock2d
    model = trainer(data, "--drop-block", "0.2", "--model-kwargs", "drop_block_rate=0.3").run.model
    blocks = [m for m in model.modules() if isinstance(m, DropBlock2d)]
    assert blocks and all(b.drop_prob == pytest.approx(0.3) for b in blocks)
    assert trainer(data, "--drop", "0.1", "--model-kwargs",
                   "drop_rate=0.4").run.model.drop_rate == 0.4


def test_sync_bn_conversion_keeps_fused_activations():
    """timm's BatchNormAct2d applies its activation itself; torch's converter would drop it."""
    import timm
    from timm.layers import convert_sync_batchnorm
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    converted = convert_sync_batchnorm(timm.create_model("test_efficientnet", num_classes=3)).eval()
    converted.load_state_dict(model.state_dict())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))


def test_args_yaml_of_a_resumed_run_is_a_recipe_that_starts_afresh(data, tmp_path):
    import yaml

    from ematrain.run import folder as outputs
    tr = trainer(data, "--resume", "auto")
    outputs.write_args(tmp_path, tr.run.record())
    saved = yaml.safe_load((tmp_path / "args.yaml").read_text())
    assert "resume" not in saved and saved["model"] == "test_resnet"
    again = train_settings(["-c", tmp_path / "args.yaml"])
    assert again.loop.resume == "" and again.data.data_dir == str(Path(data).resolve())


def test_model_dtype_is_applied_and_its_conflicts_refused(data, tmp_path):
    tr = trainer(data, "--model-dtype", "bfloat16", "--model-ema")
    assert {p.dtype for p in tr.run.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tr.run.emas.regular.module.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer(data).run.model.parameters()} == {torch.float32}
    r = run_cli("train.py", data, *TINY, "--model-dtype", "bfloat16", "--amp", "--amp-dtype",
                "bfloat16", "--output", tmp_path)
    assert r.returncode == 2 and "give one of them" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train.py", data, *TINY, "--model-dtype", "float16", "--output", tmp_path)
    assert r.returncode == 2 and "--model-dtype float16 needs CUDA" in r.stderr


def test_lr_base_scale_overrides_the_optimizer_default(data):
    # -b 4 against --lr-base-size 256: ratio 1/64, sqrt 1/8.
    base = ["--lr-base", "0.64", "--lr-base-size", "256"]
    def lr(*extra):
        return make_training([data, *TINY[:-2], *base, *extra]).run.lr  # TINY[-2:] is --lr 0.1
    assert lr() == pytest.approx(0.01)                             # sgd: linear
    assert lr("--opt", "adamw") == pytest.approx(0.08)             # adaptive: sqrt
    assert lr("--lr-base-scale", "sqrt") == pytest.approx(0.08)
    assert lr("--opt", "adamw", "--lr-base-scale", "linear") == pytest.approx(0.01)


def test_head_init_scale_and_bias_reach_the_classifier(data, tmp_path):
    plain = trainer(data).run.model.get_classifier()
    head = trainer(data, "--head-init-scale", "0.5", "--head-init-bias",
                   "-2").run.model.get_classifier()
    torch.testing.assert_close(head.weight, plain.weight * 0.5, atol=0, rtol=0)
    assert torch.equal(head.bias, torch.full_like(head.bias, -2.0))
    scaled = trainer(data, "--head-init-scale", "0.5").run.model.get_classifier()
    torch.testing.assert_close(scaled.bias, plain.bias * 0.5, atol=0, rtol=0)
    import timm

    from ematrain.run.model import init_head
    from ematrain.util.errors import UserError
    with pytest.raises(UserError, match="no classifier layer"):
        init_head(timm.create_model("test_resnet", num_classes=0), scale=0.1)


@pytest.mark.parametrize("key,flag", [("num_classes", "--num-classes"),
                                      ("pretrained", "--pretrained")])
def test_model_kwargs_that_a_flag_owns_are_refused(data, tmp_path, key, flag):
    r = run_cli("train.py", data, *TINY, "--model-kwargs", f"{key}=1", "--output", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"--model-kwargs {key}: use {flag}" in r.stderr


def test_head_init_values_must_be_finite(data):
    from ematrain.util.errors import UserError
    with pytest.raises(UserError, match="--head-init-scale: expected a finite number, got 'nan'"):
        train_settings([str(data), "--head-init-scale", "nan"])
