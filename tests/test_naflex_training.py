"""train.py --naflex-loader: a NaFlexVit trains on timm's NaFlex batches of patch sequences
(several lengths an epoch, each batch's loss scaled as timm's train loop scales it), its raw and
EMA weights are validated through timm's NaFlex evaluation every epoch, a run stopped in the
middle of an epoch resumes to the uninterrupted run's weights bit for bit, and validate.py
scores the saved weights as training did. What NaFlex training cannot take is one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import (
    REPO_ROOT,
    make_imagefolder,
    make_training,
    run_epochs,
    run_in_process,
)

from ematrain.cli import train, validate
from ematrain.run import training
from ematrain.settings.train_specs import resolve_train, train_settings
from ematrain.util.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")

TINY_NAFLEX = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
SEQ_LENS = (4, 9, 16)
NAFLEX = ["--model", "naflexvit_base_patch16_gap", "--model-kwargs",
          *(f"{k}={v}" for k, v in TINY_NAFLEX.items()), "--naflex-loader",
          "--naflex-train-seq-lens", *map(str, SEQ_LENS), "--naflex-max-seq-len", "16",
          "-b", "4", "-j", "0", "--lr", "0.01", "--warmup-epochs", "0", "--model-ema",
          "--model-ema-decay", "0.9", "--seed", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("naflex_training") / "data", num_classes=2,
                            train_per_class=12, val_per_class=4, size=40)


def test_a_naflexvit_trains_on_naflex_batches_with_timms_loss_scale(data, tmp_path):
    tr = make_training([data, *NAFLEX, "--epochs", "2", "--naflex-loss-scale", "sqrt"])
    module, recipe = tr.run.module, tr.loop.recipe
    seen = {"train": [], "eval": []}
    module.register_forward_pre_hook(lambda m, args: None if m.training else seen["eval"]
                                     .append(tuple(args[0]["patches"].shape)))
    losses = []
    loss_of, plain = recipe.loss, recipe.loss_fn

    def loss(model, images, targets):  # the step's loss beside the unscaled one, same output
        seen["train"].append(tuple(images["patches"].shape))
        scaled = loss_of(model, images, targets)
        with torch.no_grad():
            losses.append((images["patches"].shape[0], scaled.item(),
                           plain(model(images).float(), targets).item()))
        return scaled
    recipe.loss = loss
    rows = run_epochs(tr, tmp_path / "run", epochs=2)
    # Whole batches of patch sequences, of several lengths, within the token budget of -b 4.
    assert len(seen["train"]) == 2 * tr.run.data.steps_per_epoch == 2 * tr.run.data.naflex.batches
    assert {n for _, n, _ in seen["train"]} == set(SEQ_LENS)
    assert all(b * n <= 4 * 16 and d == 8 * 8 * 3 for b, n, d in seen["train"])
    # timm's --naflex-loss-scale sqrt: the loss times sqrt(images / -b).
    assert len({b for b, _, _ in losses}) > 1
    for images, scaled, unscaled in losses:
        assert scaled == pytest.approx(unscaled * (images / 4) ** 0.5, rel=1e-5)
    # Every epoch validates the raw weights and the EMA at 16 patches per image, 8 images.
    assert {n for _, n, _ in seen["eval"]} == {16}
    assert len(rows) == 2 and rows[-1]["raw_eval_top1"] > 50
    assert rows[-1]["eval_loss"] != rows[-1]["raw_eval_loss"]  # two weight sets scored
    # The epoch's train_loss weighs each batch's loss by its images (24 in all).
    last = losses[len(losses) // 2:]
    assert sum(n for n, _, _ in last) == 24
    assert rows[-1]["train_loss"] == pytest.approx(sum(n * v for n, v, _ in last) / 24, rel=1e-5)
    ckpt = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)
    fresh = timm.create_model("naflexvit_base_patch16_gap", num_classes=2, **TINY_NAFLEX)
    fresh.load_state_dict(ckpt["state_dict_ema"])
    assert torch.equal(fresh.embeds.proj.weight, tr.run.emas.shadows[0].embeds.proj.weight)


def _train(data, out, *extra):
    return run_in_process(train.main, "train.py", data, *NAFLEX, "--epochs", "2", "--mixup",
                          "0.5", "--reprob", "0.5", "--output", out, "--experiment", "r", *extra)


def test_a_stop_mid_epoch_resumes_to_the_uninterrupted_runs_weights(data, tmp_path,
                                                                     monkeypatch):
    ref = _train(data, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    steps = training.Training.train

    def train_until(self, loader, stop):  # a Ctrl-C seen after epoch 1's second update
        c = self.run.counters
        return steps(self, loader, lambda: (c.epoch, c.epoch_step) == (1, 2) or stop())
    with monkeypatch.context() as mp:
        mp.setattr(training.Training, "train", train_until)
        mid = _train(data, tmp_path / "out")
    assert mid.returncode == 130, mid.stderr[-2000:]
    last = tmp_path / "out" / "r" / "last.pth.tar"
    counters = torch.load(last, weights_only=True)["counters"]
    assert (counters["epoch"], counters["epoch_step"]) == (1, 2)
    resumed = run_in_process(train.main, "train.py", "--resume", last)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "ref" / "r" / "last.pth.tar", weights_only=True)
    b = torch.load(last, weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    assert a["counters"] == b["counters"]
    assert ((tmp_path / "ref" / "r" / "summary.csv").read_text()
            == (tmp_path / "out" / "r" / "summary.csv").read_text())
    _validate_as_training_did(data, tmp_path / "ref" / "r", tmp_path)
    with pytest.raises(UserError, match="records --naflex-patchify-channels-first off.*recorded layout"):
        resolve_train(["--resume", str(last), "--naflex-patchify-channels-first"])


def _validate_as_training_did(data, run_dir, tmp_path):
    """validate.py on the last checkpoint (raw, and --use-ema) gives the last validation's
    numbers: the NaFlex evaluation is taken from the checkpoint, and --naflex-loader and
    --naflex-max-seq-len say the same."""
    last = (run_dir / "summary.csv").read_text().splitlines()
    header, row = last[0].split(","), dict(zip(last[0].split(","), last[-1].split(",")))
    assert "raw_eval_top1" in header
    for extra, prefix in (([], "raw_"), (["--use-ema", "--naflex-loader",
                                          "--naflex-max-seq-len", "16"], "")):
        out = tmp_path / f"{prefix or 'ema'}.json"
        r = run_in_process(validate.main, "validate.py", data, "--checkpoint",
                           run_dir / "last.pth.tar", "-j", "0", "--results-file", out, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        result = json.loads(out.read_text())
        assert result["top1"] == pytest.approx(float(row[f"{prefix}eval_top1"]), abs=1e-9)
        assert result["loss"] == pytest.approx(float(row[f"{prefix}eval_loss"]), rel=1e-9)
    shorter = run_in_process(validate.main, "validate.py", data, "--checkpoint",
                             run_dir / "last.pth.tar", "-j", "0", "--naflex-max-seq-len", "4")
    assert shorter.returncode == 0 and f"loss {float(row['raw_eval_loss']):.4f}" not in shorter.stdout


@pytest.mark.parametrize("extra,message", [
    (["--train-img-sizes", "24", "32"], "--naflex-loader with --train-img-sizes"),
    (["--aug-splits", "3"], "--naflex-loader with --aug-splits"),
    (["--no-aug"], "--naflex-loader with --no-aug: timm's NaFlex training transform"),
    (["--use-multi-epochs-loader"], "--naflex-loader with --use-multi-epochs-loader"),
    (["--mixup", "0.2", "--mixup-mode", "elem"], "--naflex-loader with --mixup-mode elem"),
    (["--naflex-patch-sizes", "8", "16", "--naflex-patch-size-probs", "1"], "2 --naflex-patch-sizes"),
    (["--naflex-patch-sizes", "8", "--naflex-patch-size-probs", "-1"], "must be >= 0"),
    (["--naflex-train-seq-lens", "0"], "--naflex-train-seq-lens must be >= 1"),
])
def test_what_naflex_training_cannot_take_is_one_line(data, extra, message):
    with pytest.raises(UserError, match=message):
        train_settings([str(data), *NAFLEX, *extra])


def test_a_model_without_patches_is_refused_before_any_work(data, tmp_path):
    r = run_in_process(train.main, "train.py", data, "--model", "test_resnet", "--img-size", "32",
                       "--naflex-loader", "--output", tmp_path, "--experiment", "x")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(
        "train.py: error: --naflex-loader needs a NaFlex model")
    assert not (tmp_path / "x").exists()
    r = run_in_process(train.main, "train.py", data, *NAFLEX, "--naflex-patch-sizes", "8", "16",
                       "--output", tmp_path, "--experiment", "x")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "give --model-kwargs enable_patch_interpolator=True to train it at other patch sizes")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="give --naflex-loader"):
        train_settings([str(data), "--naflex-patch-sizes", "8"])


def test_a_recipe_gives_the_naflex_settings_and_args_yaml_records_them(data, tmp_path):
    recipe = tmp_path / "naflex.yaml"
    recipe.write_text("naflex_loader: true\nnaflex_train_seq_lens: [64, 144]\n"
                      "naflex_loss_scale: none\nnaflex_patch_sizes: [8, 16]\n"
                      "naflex_patch_size_probs: [1, 3]\n")
    s = train_settings(["-c", recipe, str(data), "--naflex-max-seq-len", "100"])
    assert s.naflex.enabled and s.naflex.naflex_train_seq_lens == [64, 144]
    assert (s.naflex.naflex_loss_scale, s.naflex.naflex_max_seq_len) == ("none", 100)
    assert vars(s.args)["naflex_patch_size_probs"] == [1.0, 3.0]  # args.yaml's record


@pytest.mark.parametrize("mode,local", [("none", 1.0), ("sqrt", 0.5), ("linear", 0.25)])
def test_under_torchrun_a_batch_is_also_scaled_by_its_share_of_the_images(data, monkeypatch,
                                                                           mode, local):
    """timm's NaFlex arithmetic: (images / -b) ** {0, 1/2, 1}, times world_size x images / the
    images of all processes (their batches differ); here a second process holds 12 images."""
    from ematrain.run import naflex_parts
    from ematrain.util.distributed import DistInfo
    s = train_settings([str(data), *NAFLEX, "-b", "16", "--naflex-loss-scale", mode])
    monkeypatch.setattr(naflex_parts, "all_reduce_sum", lambda t, info: t + 12)
    scale = naflex_parts.naflex_loss_scale(s, DistInfo(rank=0, world_size=2), torch.device("cpu"))
    assert scale(4) == pytest.approx(local * 2 * 4 / (4 + 12))
    alone = naflex_parts.naflex_loss_scale(s, DistInfo(), torch.device("cpu"))
    assert alone is None if mode == "none" else alone(4) == pytest.approx(local)


def test_ema_horizons_in_images_count_the_images_naflex_steps_hold(data):
    """A NaFlex step holds more images at shorter sequences than -b: a half-life in images is
    counted in the epoch's images per step (its 24 images over its steps), not in -b's."""
    flags = list(NAFLEX)
    at = flags.index("--model-ema-decay")
    flags[at:at + 2] = ["--model-ema-half-life", "12img"]
    tr = make_training([data, *flags, "--naflex-train-seq-lens", "4", "16"])
    steps = tr.run.data.steps_per_epoch
    assert steps == 2  # timm's schedule: 16 and 8 images at 4 patches (a budget of 4 x 16)
    assert tr.run.images_per_step() == 12  # not -b 4
    assert tr.run.decays == [pytest.approx(0.5 ** (12 / 12))]


def test_under_torchrun_two_processes_train_one_run_that_validate_py_scores_the_same(data,
                                                                                     tmp_path):
    """Two processes: each trains on its share of the NaFlex batches (loss scaled by timm's
    arithmetic, the shadows checked equal every epoch), validation scores each image once, and
    validate.py in one process gives the run's last figures for the raw and the EMA weights."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(REPO_ROOT / "train.py"), str(data), *NAFLEX,
                        "--epochs", "2", "--naflex-loss-scale", "sqrt", "--output", str(tmp_path),
                        "--experiment", "r"], env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (r.stdout + r.stderr).count("EMA checksums (equal on all ranks)") == 2  # per epoch
    _validate_as_training_did(data, tmp_path / "r", tmp_path)
