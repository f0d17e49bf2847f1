"""Settings from layers: the YAML recipes in configs/ (every key reaches the settings,
command-line flags win, each trains for real once shrunk to a tiny model and data set), timm's own
args.yaml as a recipe, and recipe values checked exactly as the command line's are.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, make_training, run_epochs

from ematrain.settings.timm_unsupported import why_refused
from ematrain.settings.train_specs import train_settings
from ematrain.util.errors import UserError

CONFIGS = REPO_ROOT / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
EXPECTED = {"demo.yaml", "resnet34-imagenette-ema.yaml", "vit-small-mixup.yaml"}
# The tiny stand-in for each recipe's model (same family: the recipe's flags keep their meaning).
TINY_MODEL = {"vit": ["--model", "test_vit", "--model-kwargs", "img_size=32"]}
SHRINK = ["--img-size", "32", "-b", "4", "--epochs", "1", "-j", "0"]


pytestmark = pytest.mark.usefixtures("one_thread_no_plots")


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
def test_recipe_keys_applied(small_data, name):
    values = recipe(name)
    assert isinstance(values, dict) and values
    args = train_settings([str(small_data), "-c", str(CONFIGS / name)]).args
    assert_applied(args, values)
    # Command-line flags win over the recipe; the other keys still apply.
    args = train_settings([str(small_data), "-c", str(CONFIGS / name), "--epochs", "1",
                           "-b", "2"]).args
    assert args.epochs == 1 and args.batch_size == 2
    assert_applied(args, values, skip=("epochs", "batch_size"))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_when_shrunk(small_data, tmp_path, name):
    values = recipe(name)
    argv = [str(small_data), "-c", str(CONFIGS / name), *tiny_flags(name)]
    args = train_settings(argv).args
    overridden = {"model", "img_size", "batch_size", "epochs", "workers", "model_kwargs"}
    assert_applied(args, values, skip=overridden)
    tr = make_training(argv)
    run = tr.run
    if values.get("model_ema"):
        assert run.emas.regular is not None
        assert run.emas.regular.decays == pytest.approx(values.get("model_ema_decay", [0.9998]))
        warmup = bool(values.get("model_ema_warmup", False))
        assert (run.emas.regular.schedule.name == "timm") == warmup
    if values.get("mixup") or values.get("cutmix"):
        assert run.mixup_fn is not None and run.mixup_fn.mixup_alpha == values.get("mixup", 0.0)
    if values.get("amp"):
        assert str(run.precision.autocast) == f"torch.{values.get('amp_dtype', 'float16')}"
    assert type(run.optimizer).__name__.lower().startswith(values.get("opt", "sgd"))
    before = {k: v.detach().clone() for k, v in run.module.state_dict().items()}
    shadow = ({k: v.clone() for k, v in run.emas.regular.shadow_state_dict(0).items()}
              if run.emas.regular is not None else None)
    row = run_epochs(tr, tmp_path)[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["eval_loss"])
    after = run.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before
               if before[k].is_floating_point()), "no weight changed"
    if shadow is not None:
        now = run.emas.regular.shadow_state_dict(0)
        assert any(not torch.equal(shadow[k], now[k]) for k in shadow
                   if shadow[k].is_floating_point()), "EMA did not move"
    assert (tmp_path / "last.pth.tar").is_file()


def test_vit_recipe_builds_its_real_model(small_data):
    """The recipe as written (real ViT-S/16 at 224 px) builds: model, layer decay, transforms."""
    values = recipe("vit-small-mixup.yaml")
    run = make_training([small_data, "-c", CONFIGS / "vit-small-mixup.yaml", "-j", "0"]).run
    assert run.data.data_config["input_size"] == (3, 224, 224)
    assert type(run.model).__name__ == "VisionTransformer" and len(run.model.blocks) == 12
    assert run.model.blocks[-1].drop_path1.drop_prob == pytest.approx(values["drop_path"])
    scales = sorted({g["lr_scale"] for g in run.optimizer.param_groups})
    assert scales == pytest.approx([0.65 ** (13 - i) for i in range(14)])  # embed, 12 blocks, head
    names = {type(t).__name__ for t in run.data.train_set.dataset.transform.transforms}
    names.add(type(run.data.erase).__name__)  # random erasing runs on the normalized batch
    assert {"RandAugment", "RandomErasing"} <= names
    assert run.lr == pytest.approx(5e-4)
    assert run.num_epochs == 300


# ------------------------------------------------------------------ timm's args.yaml as a recipe
FIXTURES = Path(__file__).parent / "fixtures"
# Generated from the argument parser of timm's train.py at its main branch (see the script).
TIMM_ARGS = FIXTURES / "timm_args.yaml"
TIMM_ARGS_OLDER = FIXTURES / "timm_args_older.yaml"


@pytest.mark.parametrize("fixture", [TIMM_ARGS, TIMM_ARGS_OLDER], ids=["timm-main", "timm-1.0"])
def test_timm_args_yaml_is_a_recipe(tmp_path, fixture):
    args = train_settings(["-c", fixture, str(tmp_path)]).args
    assert args.model == "resnet50" and args.batch_size == 128 and args.val_split == "validation"
    assert args.decay_milestones == [90, 180, 270] and args.data_dir == str(tmp_path)
    # model_ema: false in the recipe keeps the EMA off although model_ema_decay is recorded...
    assert args.model_ema is False
    # ...and an EMA flag on the command line still turns it on, at the recipe's decay.
    on = train_settings(["-c", fixture, str(tmp_path), "--model-ema-warmup"]).args
    assert on.model_ema is True and on.model_ema_decay == [0.9998]


def test_the_timm_fixture_is_what_timms_parser_writes(tmp_path):
    """The generator runs a train.py's parser-building statements only, and dumps its defaults
    as timm's _parse_args does; the fixture carries the variable-size keys of timm's main."""
    fake = tmp_path / "train.py"
    fake.write_text("import torch\nfrom timm import utils\n"
                    "config_parser = parser = argparse.ArgumentParser(add_help=False)\n"
                    "parser.add_argument('-c', '--config', default='')\n"
                    "parser = argparse.ArgumentParser()\n"
                    "group = parser.add_argument_group('x')\n"
                    "group.add_argument('--val-interval', type=int, default=1)\n"
                    "group.add_argument('--model-kwargs', nargs='*', default={}, "
                    "action=utils.ParseKwargs)\n"
                    "def main():\n    raise SystemExit('not run')\n")
    out = subprocess.run([sys.executable, FIXTURES / "make_timm_args.py", fake, "abc"],
                         capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(out) == {"val_interval": 1, "model_kwargs": {}}
    assert "abc" in out.splitlines()[0]
    keys = yaml.safe_load(TIMM_ARGS.read_text())
    assert {"val_interval", "train_img_sizes", "variable_batch_loss_scale"} <= set(keys)


@pytest.mark.parametrize("line,shown", [("tta: 2", "tta=2"),
                                        ("amp_impl: apex", "amp_impl='apex'"),
                                        ("fuser: te", "fuser='te'"),
                                        ("torchscript: true", "torchscript=True")])
def test_timm_settings_we_lack_are_refused_when_switched_on(tmp_path, line, shown):
    key = line.split(":")[0]
    text = "\n".join(l for l in TIMM_ARGS.read_text().splitlines() if not l.startswith(key + ":"))
    recipe = tmp_path / "timm.yaml"
    recipe.write_text(text + f"\n{line}\n")
    with pytest.raises(UserError) as err:
        train_settings(["-c", recipe, str(tmp_path)])
    assert str(err.value) == (f"config file {recipe}: timm setting(s) ematrain does not support: "
                              f"{shown} ({why_refused(key)})")


def test_a_recipe_typo_is_still_an_unknown_key(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("modle: resnet18\ntta: 0\n")
    with pytest.raises(UserError, match=r"unknown key\(s\): modle$"):
        train_settings(["-c", recipe, str(tmp_path)])


def test_timm_flags_we_lack_are_named_on_the_command_line(tmp_path):
    tta = why_refused("tta")
    with pytest.raises(UserError) as err:
        train_settings([str(tmp_path), "--tta=2", "--torchscript"])
    assert str(err.value) == (f"timm setting(s) ematrain does not support: --tta "
                              f"({tta}); --torchscript ({why_refused('torchscript')})")
    with pytest.raises(UserError, match=r"^unrecognized arguments: --bogus$"):
        train_settings([str(tmp_path), "--bogus"])
    with pytest.raises(UserError) as err:
        train_settings([str(tmp_path), "--tta=2", "--modle", "x"])
    assert str(err.value).endswith(f"({tta}); unrecognized arguments: --modle")


def test_a_half_life_on_the_command_line_replaces_the_recipe_decay(tmp_path):
    args = train_settings(["-c", TIMM_ARGS, str(tmp_path), "--model-ema-half-life", "1ep"]).args
    assert args.model_ema and args.model_ema_half_life == ["1ep"] and args.model_ema_decay is None
    recipe = tmp_path / "hl.yaml"
    recipe.write_text("model_ema_half_life: 2ep\n")
    args = train_settings(["-c", recipe, str(tmp_path), "--model-ema-decay", "0.99"]).args
    assert args.model_ema_decay == [0.99] and args.model_ema_half_life is None
    with pytest.raises(UserError, match="not both"):
        train_settings([str(tmp_path), "--model-ema-decay", "0.99", "--model-ema-half-life", "1ep"])


@pytest.mark.parametrize("line,value", [("lr: 1e-3", 0.001), ("weight_decay: 5e-5", 5e-5),
                                        ("mean: [-1.0e-5, 0.5, 2.5e-7]", [-1e-5, 0.5, 2.5e-7]),
                                        ("opt_kwargs: {'foo': -3.0e-9}", {"foo": -3e-9}),
                                        ("model_ema_decay: 0.99", [0.99]),
                                        ("model_ema_half_life: 2ep", ["2ep"]),
                                        ("torchcompile: true", "inductor"),
                                        ("torchcompile: false", None),
                                        ("opt_fused: false", False), ("opt_fused: true", True)])
def test_recipe_values_are_converted_as_the_command_line_would(tmp_path, line, value):
    """Each value as the command line gives it, and the data root after it still read as one
    (a recipe's list or bare flag must not swallow it)."""
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(line + "\n")
    args = train_settings(["-c", recipe, str(tmp_path)]).args
    assert getattr(args, line.split(":")[0]) == value
    assert args.data_dir == str(tmp_path)


@pytest.mark.parametrize("line,message", [
    # Recipe values are parsed by argparse itself, with the command line's checks, and named as
    # the recipe's when they fail; what only YAML can say is checked on the way to argparse.
    ("aug_repeats: null", "config file {}: aug_repeats cannot be empty"),
    ("model_dtype: half", "config file {}: model_dtype: invalid choice: 'half' (choose from "
                          "'float32', 'bfloat16', 'float16')"),
    ("lr_base_scale: cube", "config file {}: lr_base_scale: invalid choice: 'cube'"),
    ("model_ema: 0", "config file {}: model_ema must be true or false, got 0"),
    ("opt_fused: 1", "config file {}: opt_fused must be true or false, got 1"),
    ("epochs: 2.5", "config file {}: epochs: invalid int value: '2.5'"),
    ("lr: fast", "config file {}: lr: expected a number, got 'fast'"),
    ("lr: .nan", "config file {}: lr: expected a finite number, got 'nan'"),
    ("input_size: [3, 32]", "config file {}: input_size: expected 3 arguments"),
    ("scale: [0.5]", "--scale takes MIN MAX (2 values), got 1"),
    ("lr: [0.1, 0.2]", "config file {}: lr takes one value, got [0.1, 0.2]"),
    ("model_kwargs: drop_rate=0.1", "config file {}: model_kwargs must be a mapping"),
    ("lr: 0.1\nlr: 0.2", "config file {}: key 'lr' is given twice (line 2)"),
    # And the checks after parsing, which recipe values reach like command-line ones.
    ("model_ema_half_life: 2000", "bad half-life '2000'"),
    ("interpolation: 3", "--interpolation must be one of"),
    ("torchcompile: 3", "--torchcompile: unknown backend '3'"),
    ("opt_betas: 0.9", "--opt-betas takes 2"),
    ("mean: [0.5, 0.5]", "--mean takes 1 or 3 values"),
])
def test_bad_recipe_values_are_one_line_errors(tmp_path, line, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(UserError, match=re.escape(message.format(recipe))):
        train_settings(["-c", recipe, str(tmp_path)])
