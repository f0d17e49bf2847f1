"""timm's newer train.py flags, each with its effect measured in a tiny run: --val-interval,
--start-epoch, the augmentation probabilities and crop mode, --bce-sum/--bce-pos-weight, the
layer-decay bounds, --drop-connect, --synchronize-step, --fast-norm; and timm's args.yaml with
them set runs here as a `-c` recipe."""
from __future__ import annotations

import pytest
import timm
import torch
import yaml
from conftest import REPO_ROOT, make_training, run_epochs, run_in_process, tiny_args
from timm.layers import is_fast_norm
from timm.loss import BinaryCrossEntropy
from torchvision import transforms as T

from ematrain.cli import train
from ematrain.run.build import build_train_loss
from ematrain.settings.train_specs import train_settings
from ematrain.util.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")
TINY = tiny_args()
TIMM_ARGS = REPO_ROOT / "tests" / "fixtures" / "timm_args.yaml"


def _train(small_data, out, *extra):
    r = run_in_process(train.main, "train.py", small_data, *TINY, "--output", out,
                       "--experiment", "run", *extra)
    assert r.returncode == 0, r.stderr
    return out / "run", r


def _summary_epochs(run_dir) -> list[int]:
    lines = (run_dir / "summary.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


def test_val_interval_validates_every_other_epoch_and_the_best_files_follow(small_data, tmp_path):
    run_dir, r = _train(small_data, tmp_path, "--epochs", "3", "--val-interval", "2",
                        "--model-ema", "--model-ema-decay", "0.9")
    # timm: after epochs 1 (the second) and 2 (the last); epoch 0 is not validated.
    assert _summary_epochs(run_dir) == [1, 2]
    assert "epoch 0 (1/3)" in r.stdout and "not validated (--val-interval 2)" in r.stdout
    assert r.stdout.count("ema 0.9") == 2  # the EMA is validated each time the raw weights are
    ckpt = torch.load(run_dir / "last.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 2
    for name in ("model_best.pth.tar", "model_best_raw.pth.tar"):
        assert torch.load(run_dir / name, weights_only=True)["epoch"] in (1, 2)
    assert not (run_dir / "checkpoint-0.pth.tar").exists()


def test_start_epoch_trains_from_that_epoch_at_its_scheduled_lr(small_data, tmp_path):
    run_dir, r = _train(small_data, tmp_path, "--epochs", "3", "--start-epoch", "2",
                        "--sched", "step", "--decay-epochs", "1", "--decay-rate", "0.5")
    assert _summary_epochs(run_dir) == [2]
    lr = float((run_dir / "summary.csv").read_text().splitlines()[1].split(",")[5])
    assert lr == pytest.approx(0.05 * 0.5 ** 2)  # timm's step schedule at epoch 2
    ckpt = torch.load(run_dir / "last.pth.tar", weights_only=True)
    assert ckpt["counters"]["num_updates"] == 3 * 6  # epochs 0-1 counted as timm's position
    with pytest.raises(UserError, match="--start-epoch 3 is not before the run's end"):
        train_settings([str(small_data), *TINY, "--epochs", "3", "--start-epoch", "3"])


def test_augmentation_probabilities_and_crop_mode_reach_the_transform(small_data):
    tr = make_training([small_data, *TINY, "--grayscale-prob", "1", "--gaussian-blur-prob",
                        "0.3", "--color-jitter-prob", "0.7", "--train-crop-mode", "rkrr"])
    steps = tr.run.data.train_set.dataset.transform.transforms
    names = [type(t).__name__ for t in steps]
    gray = next(t for t in steps if isinstance(t, T.RandomGrayscale))
    assert gray.p == 1.0
    blur = next(t for t in steps if isinstance(t, T.RandomApply)
                and isinstance(t.transforms[0], T.GaussianBlur))
    assert blur.p == 0.3
    jitter = next(t for t in steps if isinstance(t, T.RandomApply)
                  and isinstance(t.transforms[0], T.ColorJitter))
    assert jitter.p == 0.7
    assert "RandomResizedCropAndInterpolation" not in names  # rkrr: timm's resize-keep-ratio
    # --grayscale-prob 1: every training image has equal channels.
    image, _ = tr.run.data.train_set[0]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    with pytest.raises(UserError, match="--train-crop-mode must be one of rrc, rkrc, rkrr"):
        train_settings([str(small_data), *TINY, "--train-crop-mode", "xyz"])
    with pytest.raises(UserError, match=r"--grayscale-prob must be in \[0, 1\]"):
        train_settings([str(small_data), *TINY, "--grayscale-prob", "2"])


def test_bce_sum_and_pos_weight_are_timms_bce(small_data):
    logits, target = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    plain = build_train_loss(train_settings([str(small_data), *TINY, "--bce-loss",
                                             "--smoothing", "0"]).labels)(logits, target)
    summed = build_train_loss(train_settings([str(small_data), *TINY, "--bce-loss", "--bce-sum",
                                              "--smoothing", "0"]).labels)(logits, target)
    assert summed == pytest.approx(3 * plain)  # summed over the 3 classes, not averaged
    weighted = build_train_loss(train_settings([str(small_data), *TINY, "--bce-loss",
                                                "--bce-pos-weight", "2", "--smoothing", "0"]
                                               ).labels)(logits, target)
    expected = BinaryCrossEntropy(smoothing=0.0, pos_weight=torch.tensor(2.0))(logits, target)
    assert weighted == pytest.approx(float(expected)) and weighted != pytest.approx(float(plain))
    with pytest.raises(UserError, match="give --bce-loss"):
        train_settings([str(small_data), *TINY, "--bce-sum"])


def test_layer_decay_bounds_reach_the_optimizer(small_data):
    def scales(*extra):
        tr = make_training([small_data, *TINY, "--opt", "adamw", "--layer-decay", "0.5", *extra])
        return sorted(g["lr_scale"] for g in tr.run.optimizer.param_groups)
    free = scales()
    assert free[0] < 0.25
    assert scales("--layer-decay-min-scale", "0.25")[0] == 0.25
    frozen = scales("--layer-decay-no-opt-scale", "0.2")
    assert len(frozen) < len(free) and min(frozen) >= 0.2  # the layers below are not trained
    with pytest.raises(UserError, match="give --layer-decay"):
        train_settings([str(small_data), *TINY, "--layer-decay-min-scale", "0.1"])


def test_speed_and_old_flags(small_data, monkeypatch):
    assert train_settings([str(small_data), *TINY, "--drop-connect", "0.2"]
                          ).model.create_kwargs()["drop_path_rate"] == 0.2
    assert not is_fast_norm()  # the switch is put back once the model is built
    with pytest.raises(UserError, match="--drop-connect is timm's old name of --drop-path"):
        train_settings([str(small_data), *TINY, "--drop-connect", "0.2", "--drop-path", "0.1"])
    with pytest.raises(UserError, match="--torchcompile-mode .* give --torchcompile too"):
        train_settings([str(small_data), *TINY, "--torchcompile-mode", "default"])
    with pytest.raises(UserError, match="--worker-seeding part"):
        train_settings([str(small_data), *TINY, "--worker-seeding", "part"])
    calls = []
    tr = make_training([small_data, *TINY, "--synchronize-step"])
    tr.loop.recipe.synchronize = lambda: calls.append(1)  # the CPU has nothing to wait for
    run_epochs(tr, small_data.parent / "sync")
    assert len(calls) == tr.run.data.steps_per_epoch


def test_fast_norm_builds_timms_fast_norm_layers(small_data):
    tr = make_training([small_data, *tiny_args(), "--model", "test_vit", "--fast-norm"])
    norms = [m for m in tr.run.module.modules() if isinstance(m, timm.layers.LayerNorm)]
    assert norms and all(m._fast_norm for m in norms)
    assert not is_fast_norm()


def test_timm_args_yaml_with_the_new_flags_runs_here(small_data, tmp_path):
    recipe = yaml.safe_load(TIMM_ARGS.read_text())
    recipe.update(val_interval=2, start_epoch=1, color_jitter_prob=0.5, grayscale_prob=0.2,
                  gaussian_blur_prob=0.1, train_crop_mode="rrc", bce_loss=True, bce_sum=True,
                  bce_pos_weight=1.5, layer_decay=0.8, layer_decay_min_scale=0.1,
                  fast_norm=True, synchronize_step=True, drop_connect=0.1, worker_seeding="all",
                  use_multi_epochs_loader=True, local_rank=0, torchcompile_mode=None)
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir, _ = _train(small_data, tmp_path, "-c", path, "--epochs", "3", "--device", "cpu",
                        "--model-ema-decay", "0.9")
    assert _summary_epochs(run_dir) == [1, 2]
    written = yaml.safe_load((run_dir / "args.yaml").read_text())
    assert written["val_interval"] == 2 and written["bce_pos_weight"] == 1.5
    assert written["start_epoch"] == 1 and written["layer_decay_min_scale"] == 0.1


def test_augmix_jsd_loss_is_three_way_through_train_py(small_data, tmp_path):
    tr = make_training([small_data, *TINY, "--aug-splits", "3", "--jsd-loss", "--split-bn",
                        "--aa", "augmix-m3-w1", "--smoothing", "0"])
    seen = []
    tr.run.module.register_forward_hook(lambda m, i, out: seen.append((i[0].shape, out.detach()))
                                        if m.training else None)
    losses = []
    loss_fn = tr.loop.recipe.loss_fn
    tr.loop.recipe.loss_fn = lambda out, y: losses.append((out.detach(), y, loss_fn(out, y))) \
        or losses[-1][2]
    run_epochs(tr, tmp_path)
    assert type(loss_fn).__name__ == "JsdCrossEntropy" and loss_fn.num_splits == 3
    (shape, _), (logits, targets, loss) = seen[0], losses[0]
    assert shape[0] == 3 * 4  # -b 4: the clean split and two AugMix splits
    assert torch.equal(targets, targets[:4].repeat(3))
    splits = logits.split(4)
    probs = [torch.softmax(s, dim=1) for s in splits]
    mixture = torch.stack(probs).mean(0).clamp(1e-7, 1)
    kl = sum((p * (p.log() - mixture.log())).sum(1).mean() for p in probs) / 3
    expected = torch.nn.functional.cross_entropy(splits[0], targets[:4]) + 12 * kl
    torch.testing.assert_close(loss.detach(), expected)
    bn = tr.run.module.bn1
    assert type(bn).__name__ == "SplitBatchNorm2d" and len(bn.aux_bn) == 2
    shadow = tr.run.emas.shadows[0] if tr.run.emas.shadows else None
    assert shadow is None or type(shadow.bn1).__name__ == "SplitBatchNorm2d"
    with pytest.raises(UserError, match="--jsd-loss takes class labels"):
        train_settings([str(small_data), *TINY, "--aug-splits", "3", "--jsd-loss", "--mixup",
                        "0.2"])


def test_save_images_writes_the_input_at_each_log_interval(small_data, tmp_path):
    from PIL import Image
    run_dir, _ = _train(small_data, tmp_path, "--save-images", "--log-interval", "4")
    names = sorted(p.name for p in run_dir.glob("train-batch-*.jpg"))
    assert names == ["train-batch-0.jpg", "train-batch-4.jpg", "train-batch-5.jpg"]  # 6 steps
    assert Image.open(run_dir / names[0]).size == (4 * 32, 32)  # -b 4 at 32 px, one row


def test_variable_size_training_batches_lr_and_loss_scale(small_data, tmp_path):
    tr = make_training([small_data, *tiny_args(lr=None), "--train-img-sizes", "24", "32",
                        "--train-batch-sizes", "6", "2", "--variable-batch-loss-scale", "linear",
                        "--lr-base", "0.1", "--lr-base-size", "4"])
    data = tr.run.data
    shapes = []
    tr.run.module.register_forward_hook(
        lambda m, i, o: shapes.append(tuple(i[0].shape)) if m.training else None)
    scaled = []
    scale = tr.loop.recipe.loss_scale
    tr.loop.recipe.loss_scale = lambda n: scaled.append((n, scale(n))) or scaled[-1][1]
    run_epochs(tr, tmp_path)
    assert set(shapes) <= {(6, 3, 24, 24), (2, 3, 32, 32)} and len(set(shapes)) == 2
    assert len(shapes) == data.steps_per_epoch == data.batch_sampler.batches
    average = data.batch_sampler.average_batch_size
    assert average == pytest.approx(4.0)
    assert all(f == pytest.approx(n / average) for n, f in scaled)  # linear: batch / average
    assert tr.run.lr == pytest.approx(0.1 * 4 / 4)  # --lr-base at timm's average batch
    # Resume part-way: the epoch's batches after the 2nd are the whole epoch's, pixel for pixel.
    whole = [(x.clone(), y.clone()) for x, y in data.loaders(1, 0, 42)[0]]
    rest = list(data.loaders(1, 2, 42)[0])
    assert len(rest) == len(whole) - 2
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(whole[2:], rest))
    with pytest.raises(UserError, match="--train-batch-sizes gives 1 batch sizes for 2"):
        train_settings([str(small_data), *TINY, "--train-img-sizes", "24", "32",
                        "--train-batch-sizes", "4"])
