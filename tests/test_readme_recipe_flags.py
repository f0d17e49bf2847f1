"""The README's recipe-flag commands run as written, on tiny data and models: the flags given
last (tiny sizes, a tiny model, a short run) win, as on any command line."""
from __future__ import annotations

import re
import shlex

import pytest
import timm
import torch
from conftest import REPO_ROOT, run_in_process, tiny_args

from ematrain.cli import train, validate

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")
README = (REPO_ROOT / "README.md").read_text()
BLOCK = re.search(r"<!-- recipe-flag-commands -->\n```bash\n(.*?)```", README, re.S).group(1)
COMMANDS = [line for line in BLOCK.splitlines() if line and not line.startswith("#")]
# What each command's model becomes here, and the run's length.
TINY_MODEL = {"vit_small_patch16_224": "test_vit",
              "naflexvit_base_patch16_gap": "naflexvit_base_patch16_gap"}
# A NaFlexVit of one small block, on sequences that fit 32 px images.
TINY_NAFLEX = ["--model-kwargs", "patch_size=8", "embed_dim=32", "depth=1", "num_heads=2",
               "--naflex-train-seq-lens", "4", "9", "16", "--naflex-max-seq-len", "16"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), folder / "t.pth")
    return {"teacher.pth": folder / "t.pth", "weights.pth": folder / "t.pth"}


def test_the_readme_lists_a_command_per_family():
    assert len(COMMANDS) == 6
    for flag in ("--kd-model-name", "--val-interval", "--grayscale-prob", "--fast-norm",
                 "--use-train-size", "--naflex-loader"):
        assert any(flag in c for c in COMMANDS), flag


@pytest.mark.parametrize("command", COMMANDS, ids=["distill", "loop", "augment", "speed",
                                                     "validate", "naflex"])
def test_the_readme_recipe_flag_command_runs(command, small_data, files, tmp_path):
    words = shlex.split(command)
    assert words[0] == ".venv/bin/python"
    script, args = words[1], [str(files.get(w, w)) for w in words[2:]]
    args = [str(small_data) if a == "data/" else a for a in args]
    model = args[args.index("--model") + 1]
    if script == "train.py":
        extra = tiny_args("--output", tmp_path)
        extra[1] = TINY_MODEL.get(model, "test_resnet")
        if "--start-epoch" in args:
            extra += ["--epochs", "3", "--start-epoch", "1"]
        if "--kd-model-name" in args:
            extra += ["--kd-model-name", "test_resnet"]
        if "--naflex-loader" in args:
            extra += TINY_NAFLEX
        r = run_in_process(train.main, script, *args, *extra)
    else:
        r = run_in_process(validate.main, script, *args, "--model", "test_resnet", "-j", "0",
                           "--img-size", "32")
    assert r.returncode == 0, r.stderr
