"""timm validate.py's test-time flags here, each changing what is evaluated as timm's does:
--use-train-size, --input-size, --crop-mode, --mean/--std, --interpolation,
--crop-border-pixels, --test-pool, --gp, --reparam, --valid-labels, --metrics-avg, --retry."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import make_imagefolder, run_in_process

from ematrain.cli import validate
from ematrain.run import evaluation
from ematrain.settings.validate_specs import validate_settings
from ematrain.util.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("v") / "data", num_classes=3,
                            train_per_class=1, val_per_class=2, size=40)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A plain state dict: no recorded transform, so timm's validate.py default applies
    (resnet18's pretrained config: 224 px for training, 288 px at test time)."""
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), path)
    return path


def _validate(data, weights, tmp_path, *extra) -> dict:
    out = tmp_path / "r.json"
    r = run_in_process(validate.main, "validate.py", data, "--checkpoint", weights, "-m",
                       "resnet18", "-b", "6", "-j", "0", "--results-file", out, *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text()) | {"stderr": r.stderr}


def test_use_train_size_evaluates_at_the_training_size(data, resnet18_file, tmp_path):
    assert _validate(data, resnet18_file, tmp_path)["img_size"] == 288  # timm's test size
    train = _validate(data, resnet18_file, tmp_path, "--use-train-size")
    assert train["img_size"] == 224 and train["crop_pct"] == 0.95


def test_transform_flags_reach_the_transform(data, resnet18_file, tmp_path, monkeypatch):
    seen = {}
    real = evaluation.eval_transform

    def spy(config):
        seen.update(config)
        return real(config)
    monkeypatch.setattr(evaluation, "eval_transform", spy)
    r = _validate(data, resnet18_file, tmp_path, "--input-size", "3", "40", "36", "--crop-mode",
                  "squash", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "--interpolation",
                  "bilinear", "--crop-border-pixels", "2")
    assert seen["input_size"] == (3, 40, 36) and seen["crop_mode"] == "squash"
    assert seen["mean"] == (0.5, 0.5, 0.5) and seen["interpolation"] == "bilinear"
    assert seen["crop_border_pixels"] == 2
    transform = real(seen)
    assert "crop_border_pixels=2" in repr(transform) or any(
        "Trim" in type(t).__name__ for t in transform.transforms)
    assert r["img_size"] == 36 and r["interpolation"] == "bilinear"


def test_test_pool_and_gp_and_reparam_reach_the_model(data, resnet18_file, tmp_path,
                                                      monkeypatch):
    models = []
    real = validate.test_time_model

    def spy(s, model, config):
        model, config = real(s, model, config)
        models.append((model, config))
        return model, config
    monkeypatch.setattr(validate, "test_time_model", spy)
    r = _validate(data, resnet18_file, tmp_path, "--test-pool", "--gp", "max", "--reparam")
    model, config = models[-1]
    assert type(model).__name__ == "TestTimePoolHead"  # 288 px > resnet18's 224
    assert config["crop_pct"] == 1.0 and r["crop_pct"] == 1.0
    assert "--test-pool: test-time pooling at 288 px" in r["stderr"]
    assert model.base.global_pool.pool_type == "max"


def test_valid_labels_and_metrics(data, resnet18_file, tmp_path):
    six = tmp_path / "six.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model("resnet18", num_classes=6).state_dict(), six)
    labels = tmp_path / "labels.txt"
    labels.write_text("4\n0\n5\n")
    r = _validate(data, six, tmp_path, "--num-classes", "6", "--valid-labels", labels,
                  "--metrics-avg", "macro", "--use-train-size", "--img-size", "40")
    assert r["count"] == 6 and {"macro_precision", "macro_recall", "macro_f1_score"} <= r.keys()
    with pytest.raises(UserError, match="--num-gpu 2: one device per process"):
        validate_settings([str(data), "--checkpoint", str(six), "--num-gpu", "2"])
    with pytest.raises(UserError, match="--crop-mode must be one of center, squash, border"):
        validate_settings([str(data), "--checkpoint", str(six), "--crop-mode", "x"])


def test_retry_halves_the_batch_after_out_of_memory(data, resnet18_file, tmp_path, monkeypatch):
    real, sizes = validate.split_loader, []

    def flaky(s, info, dataset, ckpt, config, device, batch_size=None, **kwargs):
        sizes.append(batch_size)
        if len(sizes) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(s, info, dataset, ckpt, config, device, batch_size, **kwargs)
    monkeypatch.setattr(validate, "split_loader", flaky)
    r = _validate(data, resnet18_file, tmp_path, "--retry", "--use-train-size", "--img-size", "40")
    assert sizes[0] == 6 and 0 < sizes[1] < 6 and r["count"] == 6


def test_bulk_mode_a_results_row_per_checkpoint_best_first(data, tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for i in range(2):
        torch.manual_seed(i)
        torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(),
                   folder / f"m{i}.pth")
    (folder / "notes.txt").write_text("not a checkpoint")
    out = tmp_path / "rows.json"
    r = run_in_process(validate.main, "validate.py", data, "--checkpoint", folder, "-m",
                       "test_resnet", "-j", "0", "--img-size", "32", "--results-file", out)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert sorted(row["checkpoint"] for row in rows) == [str(folder / "m0.pth"),
                                                         str(folder / "m1.pth")]
    assert rows[0]["top1"] >= rows[1]["top1"]
    with pytest.raises(UserError, match="no timm model with pretrained weights matches"):
        validate.bulk_targets(validate_settings([str(data), "--pretrained", "-m", "nonesuch*"]))
