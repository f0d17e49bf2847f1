"""A value torch or timm would reject deep inside (a traceback at the first step, an overflow, a
hang) is one line naming it, exit code 2, before the run has created anything; the same check
lets through what does work (a batch of one where BatchNorm sees more than one value, a ViT told
its input size). Each case is one a user met as a traceback or a hang."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_imagefolder, make_training, run_in_process, tiny_args, torch_threads
from PIL import Image

from ematrain.checkpoint import files as ckpt_io
from ematrain.cli import train
from ematrain.data import folders as data_mod
from ematrain.settings.train_specs import train_settings
from ematrain.util import distributed
from ematrain.util.errors import UserError

COMMON = tiny_args()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("refused") / "data", train_per_class=4,
                            val_per_class=2)


def run(tmp_path, data, *flags):
    out = tmp_path / "out"
    with torch_threads(1):
        r = run_in_process(train.main, "train.py", data, *COMMON, *flags, "--output", out,
                           "--experiment", "e")
    return r, out


def refused(tmp_path, data, *flags) -> str:
    """The one error line of a run refused before it starts; nothing written."""
    r, out = run(tmp_path, data, *flags)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("train.py: error: ") and sum("error:" in x for x in lines) == 1
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    return lines[-1]


@pytest.mark.parametrize("flags,words", [
    # item 3: a BatchNorm model left one value per channel by a batch of one
    (["-b", "1"], ["a training batch of 1", "test_resnet's BatchNorm", "-b 2 or more"]),
    # item 4: sigma_rels whose exponent overflows
    (["--model-ema-posthoc", "1e-200"], ["--model-ema-posthoc: sigma_rel must be in [1e-12,",
                                         "got 1e-200"]),
    (["--model-ema-sigma-rel", "1e-200"], ["--model-ema-sigma-rel must be in [1e-12,"]),
    (["--model-ema-power-gamma", "1e308"], ["--model-ema-power-gamma must be in [0,"]),
    # item 5: an interval of infinitely many steps
    (["--model-ema-posthoc", "--model-ema-snapshot-every", "1e308ep"],
     ["--model-ema-snapshot-every 1e308ep is no shorter than the run (3 optimizer steps)"]),
    # item 6: the crop's aspect ratio goes through a logarithm
    (["--ratio", "0", "1"], ["--ratio takes MIN MAX with 0.01 <= MIN <= MAX <= 100", "got 0 1"]),
    (["--scale", "0.5", "1e308"], ["--scale takes MIN MAX with 0 < MIN <= MAX <= 1"]),
    # item 7: devices torch names but cannot train on
    (["--device", "meta"], ["--device meta: ematrain runs on cpu, cuda or mps, not 'meta'"]),
    # item 8: optimizer arguments torch rejects at creation or inside the first step
    (["--opt-kwargs", "fused=True", "foreach=True"],
     ["cannot create optimizer 'sgd'", "`fused` and `foreach` cannot be `True` together"]),
    (["--opt", "adamw", "--opt-kwargs", "maximize=b'x'"],
     ["--opt-kwargs maximize=b'x': adamw's maximize takes True or False"]),
    # item 9: model arguments that break the model, at creation or at its first input
    (["--model", "test_vit", "--model-kwargs", "img_size={32}"],
     ["cannot create model 'test_vit': tuple index out of range"]),
    (["--model", "test_vit", "--model-kwargs", "dynamic_img_size=False"],
     ["model 'test_vit' fails on a 3x32x32 input: Input height (32) doesn't match model (160)",
      "dynamic_img_size=True"]),
    # item 23: a fixed-size ViT at another --img-size
    (["--model", "vit_tiny_patch16_224"],
     ["model 'vit_tiny_patch16_224' fails on a 3x32x32 input", "img_size=N"]),
    # found by the flag-value table: no pooling before a classifier that needs it
    (["--gp", ""], ["model 'test_resnet' fails on a 3x32x32 input: mat1 and mat2 shapes",
                    "--gp"]),
    # item 13: a zero std makes every input non-finite
    (["--std", "0", "0", "0"], ["--std values must be > 0, got 0 0 0"]),
    # item 23: a crop fraction that resizes to thousands of pixels
    (["--crop-pct", "0.004"], ["--crop-pct 0.004 would resize every image to 8000 px before the "
                               "32 px center crop (at most 4096)"]),
    (["--mean", "1e308"], ["--mean 1e+308 with --std"]),
    # what the flag-value table found: a hang, and tracebacks inside timm's schedulers
    (["--lr-noise", "0.5", "--lr-noise-std", "1e308"], ["--lr-noise-std must be in [0, 100 x"]),
    (["--sched", "step", "--decay-epochs", "0"], ["--decay-epochs must be > 0, got 0"]),
    (["--lr-cycle-mul", "1e-200"], ["--lr-cycle-mul 1e-200: shrinking cycles add up to"]),
    (["--head-init-bias", "1e308"], ["--head-init-bias must be in"]),
    (["--layer-decay", "1e308"], ["--layer-decay must be in (0, 1], got 1e+308"]),
    (["--lr-noise", "0.5", "--lr-noise-pct", "0", "--lr-noise-std", "0"],
     ["--lr-noise-pct must be in (0, 1], got 0"]),
    (["--color-jitter", "1e308"], ["--color-jitter must be in [0, 100]"]),
    (["--seed", "99999999999"], ["--seed must be in [0, 2**32 - 1]"]),
    (["-b", "99999999999999999999"], ["argument -b/--batch-size: expected a whole number of at "
                                      "most 19 digits"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("-") else "")
def test_a_value_torch_or_timm_rejects_inside_is_one_line_before_the_run(tmp_path, tree, flags,
                                                                         words):
    line = refused(tmp_path, tree, *flags)
    for word in words:
        assert word in line, (word, line)


def test_mps_where_the_machine_has_none_is_one_line(tmp_path, tree):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert "device 'mps' requested but MPS is not available" in refused(
        tmp_path, tree, "--device", "mps")


@pytest.mark.parametrize("flags", [
    ["--model", "test_vit", "-b", "1"],                     # no BatchNorm
    ["-b", "1", "--img-size", "64"],                        # its last BatchNorm sees 2x2
    ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32"],  # as the hint says
])
def test_what_the_first_step_checks_let_through_trains(tmp_path, tree, flags):
    r, out = run(tmp_path, tree, *flags)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (out / "e" / "last.pth.tar").is_file()


@pytest.mark.parametrize("per_class,classes,flags,words", [
    # item 3: a last (here the only) batch of one image, where -b is larger than the split
    (1, 1, [], ["a training batch of 1 (the training split gives 1 image(s), fewer than -b 4)",
                "BatchNorm"]),
    # the same under mixup, which needs even batches
    (1, 3, ["--mixup", "0.2"], ["mixup/cutmix need an even training batch, got 3 (the training "
                                "split gives 3 image(s), fewer than -b 4)"]),
])
def test_the_smallest_training_batch_is_checked(tmp_path, per_class, classes, flags, words):
    data = make_imagefolder(tmp_path / "d", num_classes=classes, train_per_class=per_class,
                            val_per_class=1)
    line = refused(tmp_path, data, *flags)
    for word in words:
        assert word in line, (word, line)


def test_a_resume_with_an_endless_snapshot_interval_snapshots_the_end(tmp_path, tree):
    """Item 5, resumed: an interval longer than the run is the run (its end is snapshotted)."""
    r, out = run(tmp_path, tree, "--model-ema-posthoc", "--epochs", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    last = out / "e" / "last.pth.tar"
    with torch_threads(1):
        r = run_in_process(train.main, "train.py", "--resume", last, "--epochs", "3",
                           "--model-ema-snapshot-every", "1e308ep")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    steps = sorted(int(p.name[9:19]) for p in (out / "e" / "posthoc").glob("snapshot-*"))
    assert steps[-1] == 9 and 8 not in steps  # 3 steps an epoch: the end, nothing between


# ----------------------------------------------------------------------------- data trees
def test_a_named_pipe_in_a_split_is_skipped_and_counted(tmp_path, caplog):
    """Item 12: reading a FIFO blocks forever; it is no image, so the scan skips it."""
    data = make_imagefolder(tmp_path / "d", num_classes=2, train_per_class=2, val_per_class=1)
    os.mkfifo(data / "train" / "class_1" / "0002.png")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("ematrain").addHandler(handler)
    try:
        folder = data_mod.load_image_folder(data / "train")
    finally:
        logging.getLogger("ematrain").removeHandler(handler)
    assert [Path(p).name for p, _ in folder.samples] == ["0000.png", "0001.png"] * 2
    assert seen == [f"warning: {data / 'train'}: skipped 1 image name(s) that are not regular "
                    f"files (named pipes, sockets, devices or broken links)"]


def _png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def test_a_16_bit_grayscale_png_reads_as_its_8_bit_picture(tmp_path):
    """Item 21: PIL's convert("RGB") clips 16-bit pixels at 255 (a white image)."""
    eight = np.random.default_rng(0).integers(0, 256, size=(16, 16), dtype=np.uint8)
    sixteen = eight.astype(np.uint16) * 257  # the same picture, 16 bits per pixel
    a = data_mod._load_rgb(str(_png(tmp_path / "a.png", eight)))
    b = data_mod._load_rgb(str(_png(tmp_path / "b.png", sixteen)))
    assert Image.open(tmp_path / "b.png").mode == "I;16"
    assert b.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    assert abs(np.asarray(b).mean() - eight.mean()) < 1e-9  # not 255


def test_32_bit_float_pixels_are_refused_by_name(tmp_path):
    path = tmp_path / "f.tiff"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(path)
    with pytest.raises(UserError, match="f.tiff: its pixels are 32-bit floats with no fixed range"):
        data_mod._load_rgb(str(path))


def test_output_inside_a_split_is_refused(tmp_path, tree):
    """Item 23: the runs would become a class folder of the training split."""
    with pytest.raises(UserError, match=r"--output .*train/runs is inside the data's train split"):
        train_settings([tree, "--output", tree / "train" / "runs"])
    with pytest.raises(UserError, match="inside the data's val split"):
        train_settings([tree, "--output", tree / "val"])
    train_settings([tree, "--output", tree / "runs"])  # beside the splits: fine


# ----------------------------------------------------------------------------- files, hints
def test_a_file_of_random_bytes_is_not_called_pickled_code(tmp_path):
    """Item 23: only a file whose pickle names code is refused as such."""
    path = tmp_path / "random.pth.tar"
    path.write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(UserError) as err:
        ckpt_io.load_file(path)
    assert "pickled code" not in str(err.value)
    assert "truncated, corrupt or not a PyTorch checkpoint (Unsupported operand" in str(err.value)
    import datetime
    torch.save({"when": datetime.date(2020, 1, 1)}, tmp_path / "code.pth")
    with pytest.raises(UserError, match=r"would run pickled code \(datetime.date\)"):
        ckpt_io.load_file(tmp_path / "code.pth")


def test_a_recipe_that_spells_a_setting_twice_is_refused(tmp_path, tree):
    """Item 23: batch_size and batch-size are one setting; the later would win silently."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch_size: 4\nbatch-size: 8\n")
    with pytest.raises(UserError, match="'batch_size' and 'batch-size' both set batch_size"):
        train_settings(["-c", recipe, tree])


@pytest.mark.parametrize("folder", ["my runs", "résultats d'été"])
def test_the_resume_hint_is_quoted_for_the_shell(tmp_path, tree, folder):
    """Item 23: the hint pastes as it is, with spaces, quotes or non-ASCII letters."""
    with torch_threads(1):
        tr = make_training([tree, *COMMON])
    tr.run_dir = tmp_path / folder
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        tr.print_stop("stopped after epoch 0")
    command = err.getvalue().split("Resume with: ")[1]
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"] and words[2:] == [
        "--resume", str(tmp_path / folder / "last.pth.tar")]


def test_nccl_on_the_cpu_under_torchrun_is_one_line(monkeypatch):
    """Item 23: each rank would fail inside init_process_group with its own traceback."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nccl is its backend")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="--dist-backend nccl needs CUDA devices"):
        distributed.init_distributed(None, "nccl")
    assert not torch.distributed.is_initialized()
