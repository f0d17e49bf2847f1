"""The EMA as the training loop uses it: one validation pass for every weight set, the CPU-shadow
swap, shadows in another dtype, and half-lives that survive a change of batch size."""
from __future__ import annotations

import csv
import logging
import math

import pytest
import timm
import torch
from conftest import make_imagefolder, tiny_args, torch_threads

from ematrain.cli import train as train_mod
from ematrain.data import folders, loaders, transforms
from ematrain.ema import ModelEma, WeightSwapper, half_life_from_decay
from ematrain.run.evaluation import validate
from ematrain.settings.train_specs import train_settings


@pytest.fixture(scope="module")
def val_loader(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("emaval") / "d", num_classes=3,
                            train_per_class=2, val_per_class=7)
    dataset = folders.load_image_folder(root / "val")
    config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3,
              "std": (0.5,) * 3, "crop_pct": 1.0, "crop_mode": "center"}
    dataset.transform = transforms.eval_transform(config)
    return loaders.make_loader(dataset, batch_size=4, workers=0, shuffle=False, seed=0)


NORMALIZE = transforms.Normalize((0.5,) * 3, (0.5,) * 3, torch.device("cpu"))


def _trained_pair(decays, device=None):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    ema = ModelEma(model, decays, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(4):
        model.train()
        loss = model(torch.randn(6, 3, 32, 32)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    return model, ema


def test_one_pass_equals_separate_passes_exactly(val_loader):
    model, ema = _trained_pair([0.5, 0.9])
    together = validate(model, val_loader, torch.device("cpu"), normalize=NORMALIZE, ema=ema)
    alone = [validate(m, val_loader, torch.device("cpu"), normalize=NORMALIZE)[0]
             for m in [model] + ema.shadows]
    assert together == alone
    assert together[0] != together[1]  # the weight sets really differ
    assert together[0]["count"] == 21


def test_cpu_shadow_swap_gives_the_same_numbers_and_restores_raw(val_loader, monkeypatch):
    model, ema = _trained_pair([0.5, 0.9])
    reference = validate(model, val_loader, torch.device("cpu"), normalize=NORMALIZE, ema=ema)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    # Force the swap path that --model-ema-force-cpu takes on a GPU machine.
    monkeypatch.setattr(ema, "device", torch.device("meta"))
    swapped = validate(model, val_loader, torch.device("cpu"), normalize=NORMALIZE, ema=ema)
    assert swapped == reference
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name]), name


def test_swapper_loads_each_set_and_restores_bit_for_bit():
    model, ema = _trained_pair([0.5, 0.9])
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    swapper = WeightSwapper(model, ema.shadows)
    for index, shadow in ((2, ema.shadows[1]), (1, ema.shadows[0])):
        swapper.load(index)
        for name, value in model.state_dict().items():
            assert torch.equal(value, shadow.state_dict()[name]), name
    swapper.restore()
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name]), name


@pytest.mark.parametrize("half_life,unit_images", [("2ep", None), ("3000img", 3000), ("4kimg", 4000)])
def test_half_life_keeps_its_horizon_in_images_across_batch_sizes(tmp_path, half_life, unit_images):
    images_per_epoch = 1024
    horizons = []
    for batch in (16, 64):
        s = train_settings([str(tmp_path), "--model-ema-half-life", half_life, "-b", str(batch)])
        steps_per_epoch = images_per_epoch // batch
        (decay,) = s.ema.decays_per_step(s.global_batch(), steps_per_epoch)
        horizons.append(half_life_from_decay(decay) * batch)  # half-life in images
    expected = unit_images or 2 * images_per_epoch
    assert horizons[0] == pytest.approx(expected, rel=1e-9)
    assert horizons[1] == pytest.approx(expected, rel=1e-9)


def test_half_life_in_steps_counts_optimizer_steps(tmp_path):
    s = train_settings([str(tmp_path), "--model-ema-half-life", "100it", "-b", "32",
                        "--grad-accum-steps", "4"])
    (decay,) = s.ema.decays_per_step(s.global_batch(), steps_per_epoch=10)
    assert decay == pytest.approx(0.5 ** (1 / 100), rel=1e-12)
    s = train_settings([str(tmp_path), "--model-ema-half-life", "1ep", "-b", "32",
                        "--grad-accum-steps", "4"])
    (decay,) = s.ema.decays_per_step(s.global_batch(), steps_per_epoch=10)
    assert math.log(0.5) / math.log(decay) == pytest.approx(10, rel=1e-12)


TINY = tiny_args()


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_shadow_in_another_dtype_trains_and_validates(small_data, tmp_path, capsys, dtype):
    with torch_threads(1):
        rc = train_mod.main([str(small_data), *TINY, "--output", str(tmp_path), "--experiment", "d",
                             "--model-ema-decay", "0.5", "--model-ema-dtype", dtype])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "d/summary.csv")))
    assert float(rows[0]["eval_loss"]) > 0
    ckpt = torch.load(tmp_path / "d/last.pth.tar", weights_only=True)
    assert ckpt["state_dict_ema"]["fc.weight"].dtype == getattr(torch, dtype)


def test_low_precision_shadow_that_cannot_move_is_warned(small_data, tmp_path, capsys):
    logging.getLogger("ematrain").handlers.clear()  # log to this test's captured stderr
    with torch_threads(1):
        assert train_mod.main([str(small_data), *TINY, "--model-ema-dtype", "bfloat16",
                               "--output", str(tmp_path)]) == 0
    assert "below the dtype's precision" in capsys.readouterr().err


def test_half_life_shadows_are_named_as_asked_everywhere(small_data, tmp_path, capsys):
    """--model-ema-half-life 0.5ep 2ep: `ema hl0.5ep` and `ema hl2ep` in the epoch line,
    summary.csv, curves and the final report; validate.py finds them by that name, by the
    half-life alone or by the decay to the digits typed, and says the name; the decays stay in
    the checkpoint."""
    from ematrain.cli import validate as validate_mod
    logging.getLogger("ematrain").handlers.clear()
    with torch_threads(1):
        rc = train_mod.main([str(small_data), *TINY, "--output", str(tmp_path), "--experiment", "h",
                             "--model-ema-half-life", "0.5ep", "2ep"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = list(csv.DictReader(open(tmp_path / "h/summary.csv")))
    assert {"eval_top1", "raw_eval_top1", "emahl2ep_eval_top1"} <= set(rows[0])
    assert [l.split()[:2] for l in out.out.splitlines() if l.startswith("  ")][-3:] == [
        ["raw", "top1"], ["ema", "hl0.5ep"], ["ema", "hl2ep"]]
    assert "best ema hl2ep:" in out.err and "0.98" not in out.out
    ckpt = torch.load(tmp_path / "h/last.pth.tar", weights_only=True)
    steps = 6  # 24 training images, batch 4
    assert ckpt["ema"]["names"] == ["hl0.5ep", "hl2ep"]
    assert ckpt["ema"]["decays"] == pytest.approx([0.5 ** (2 / steps), 0.5 ** (1 / (2 * steps))])
    typed = f"{ckpt['ema']['decays'][1]:.3f}"  # what a user copies from a rounded print
    for pick in (["--ema-decay", "hl2ep"], ["--ema-decay", "2ep"], ["--ema-decay", typed],
                 ["--ema-index", "1"]):
        with torch_threads(1):
            rc = validate_mod.main([str(small_data), "--checkpoint",
                                    str(tmp_path / "h/last.pth.tar"), "-j", "0", *pick])
        printed = capsys.readouterr()
        assert rc == 0, printed.err
        assert "(ema hl2ep) on " in printed.out, pick
        assert f"top1 {float(rows[-1]['emahl2ep_eval_top1']):.4f}" in printed.out, pick
    with torch_threads(1):
        rc = validate_mod.main([str(small_data), "--checkpoint", str(tmp_path / "h/last.pth.tar"),
                                "-j", "0", "--ema-decay", "hl9ep"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no EMA hl9ep (it has: hl0.5ep (decay 0.793701), hl2ep (decay" in err
