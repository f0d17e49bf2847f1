"""The YAML recipes in configs/: every key reaches the parsed arguments, command-line flags win,
and each recipe trains for real once shrunk to a tiny model and data set (same flags otherwise).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO_ROOT, make_imagefolder, make_training, run_epochs, torch_threads
from ematrain import outputs
from ematrain.settings import train_settings

CONFIGS = REPO_ROOT / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
EXPECTED = {"demo.yaml", "resnet34-imagenette-ema.yaml", "vit-small-mixup.yaml"}
# The tiny stand-in for each recipe's model (same family: the recipe's flags keep their meaning).
TINY_MODEL = {"vit": ["--model", "test_vit", "--model-kwargs", "img_size=32"]}
SHRINK = ["--img-size", "32", "-b", "4", "--epochs", "1", "-j", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("recipes") / "data", num_classes=3,
                            train_per_class=8, val_per_class=4)


@pytest.fixture(autouse=True)
def _one_thread_no_plots(monkeypatch):
    monkeypatch.setattr(outputs, "plot_curves", lambda *a, **k: None)
    with torch_threads(1):
        yield


def recipe(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def tiny_flags(name: str) -> list[str]:
    model = recipe(name)["model"]
    family = "vit" if model.startswith("vit") else "resnet"
    return TINY_MODEL.get(family, ["--model", "test_resnet"]) + SHRINK


def assert_applied(args, values: dict, skip=()) -> None:
    for key, want in values.items():
        dest = key.replace("-", "_")
        if dest in skip:
            continue
        got = getattr(args, dest)
        if isinstance(want, list):
            assert list(got) == pytest.approx(want), key
        elif isinstance(want, float) or isinstance(got, float):
            assert float(got) == pytest.approx(float(want)), key
        else:
            assert got == want, key


def test_recipes_present():
    assert EXPECTED <= set(RECIPES), f"missing recipes: {EXPECTED - set(RECIPES)}"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_keys_applied(data, name):
    values = recipe(name)
    assert isinstance(values, dict) and values
    args = train_settings([str(data), "-c", str(CONFIGS / name)]).args
    assert_applied(args, values)
    # Command-line flags win over the recipe; the other keys still apply.
    args = train_settings([str(data), "-c", str(CONFIGS / name), "--epochs", "1", "-b", "2"]).args
    assert args.epochs == 1 and args.batch_size == 2
    assert_applied(args, values, skip=("epochs", "batch_size"))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_when_shrunk(data, tmp_path, name):
    values = recipe(name)
    argv = [str(data), "-c", str(CONFIGS / name), *tiny_flags(name)]
    args = train_settings(argv).args
    overridden = {"model", "img_size", "batch_size", "epochs", "workers", "model_kwargs"}
    assert_applied(args, values, skip=overridden)
    tr = make_training(argv)
    run = tr.run
    if values.get("model_ema"):
        assert run.ema is not None
        assert run.ema.decays == pytest.approx(values.get("model_ema_decay", [0.9998]))
        assert run.ema.warmup == bool(values.get("model_ema_warmup", False))
    if values.get("mixup") or values.get("cutmix"):
        assert run.mixup_fn is not None and run.mixup_fn.mixup_alpha == values.get("mixup", 0.0)
    if values.get("amp"):
        assert str(run.precision.autocast) == f"torch.{values.get('amp_dtype', 'float16')}"
    assert type(run.optimizer).__name__.lower().startswith(values.get("opt", "sgd"))
    before = {k: v.detach().clone() for k, v in run.module.state_dict().items()}
    shadow = ({k: v.clone() for k, v in run.ema.shadow_state_dict(0).items()}
              if run.ema is not None else None)
    row = run_epochs(tr, tmp_path)[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["eval_loss"])
    after = run.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before
               if before[k].is_floating_point()), "no weight changed"
    if shadow is not None:
        now = run.ema.shadow_state_dict(0)
        assert any(not torch.equal(shadow[k], now[k]) for k in shadow
                   if shadow[k].is_floating_point()), "EMA did not move"
    assert (tmp_path / "last.pth.tar").is_file()


def test_vit_recipe_builds_its_real_model(data):
    """The recipe as written (real ViT-S/16 at 224 px) builds: model, layer decay, transforms."""
    values = recipe("vit-small-mixup.yaml")
    run = make_training([data, "-c", CONFIGS / "vit-small-mixup.yaml", "-j", "0"]).run
    assert run.data.data_config["input_size"] == (3, 224, 224)
    assert type(run.model).__name__ == "VisionTransformer" and len(run.model.blocks) == 12
    assert run.model.blocks[-1].drop_path1.drop_prob == pytest.approx(values["drop_path"])
    scales = sorted({g["lr_scale"] for g in run.optimizer.param_groups})
    assert scales == pytest.approx([0.65 ** (13 - i) for i in range(14)])  # embed, 12 blocks, head
    names = {type(t).__name__ for t in run.data.train_set.dataset.transform.transforms}
    assert {"RandAugment", "RandomErasing"} <= names
    assert run.lr == pytest.approx(5e-4)
    assert run.num_epochs == 300
