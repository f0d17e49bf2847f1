"""--initial-checkpoint and --pretrained-path: which weights they take (raw; EMA where the file has
it, as timm's pretrained loading), a classifier of another class count left at its
initialisation while everything else loads, and one line that says what happened."""
from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_imagefolder, make_training, tiny_args

from ematrain.util.errors import UserError
from ematrain.util.logs import setup_logging

BASE = tiny_args(batch=8, lr=None, warmup=None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("sw") / "d", num_classes=3,
                            train_per_class=4, val_per_class=2)


def _timm_checkpoint(path, classes: int):
    """A timm-style checkpoint: raw weights and different EMA weights."""
    torch.manual_seed(1)
    raw = timm.create_model("test_resnet", num_classes=classes).state_dict()
    torch.manual_seed(2)
    ema = timm.create_model("test_resnet", num_classes=classes).state_dict()
    torch.save({"epoch": 7, "arch": "test_resnet", "state_dict": raw, "state_dict_ema": ema}, path)
    return raw, ema


def _start(data, *flags):
    return make_training([data, *BASE, *flags]).run.module.state_dict()


def _same(a, b, keys):
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_initial_checkpoint_takes_the_raw_weights_and_leaves_another_head_out(data, tmp_path,
                                                                              capsys):
    setup_logging()
    raw, ema = _timm_checkpoint(tmp_path / "c.pth", classes=10)
    got = _start(data, "--initial-checkpoint", tmp_path / "c.pth")
    body = [k for k in raw if not k.startswith("fc.")]
    assert _same(got, raw, body) and not _same(got, ema, body)
    assert got["fc.weight"].shape == (3, raw["fc.weight"].shape[1])
    assert capsys.readouterr().err.splitlines()[0] == (
        f"--initial-checkpoint {tmp_path / 'c.pth'}: raw weights of 'test_resnet' (epoch 7), "
        f"{len(raw) - 2} tensors loaded; classifier fc left at its initialisation: 10 classes "
        "in the file, 3 here")


def test_pretrained_path_takes_the_ema_weights_and_keeps_a_matching_head(data, tmp_path, capsys):
    setup_logging()
    raw, ema = _timm_checkpoint(tmp_path / "c.pth", classes=3)
    got = _start(data, "--pretrained-path", tmp_path / "c.pth")
    assert _same(got, ema, ema.keys())  # the head too: same class count
    err = capsys.readouterr().err
    assert (f"--pretrained-path {tmp_path / 'c.pth'}: EMA weights (ema) of 'test_resnet' "
            f"(epoch 7), {len(ema)} tensors loaded\n") in err


def test_pretrained_path_with_another_class_count(data, tmp_path, capsys):
    setup_logging()
    raw, ema = _timm_checkpoint(tmp_path / "c.pth", classes=10)
    got = _start(data, "--pretrained-path", tmp_path / "c.pth")
    assert _same(got, ema, [k for k in ema if not k.startswith("fc.")])
    assert got["fc.weight"].shape[0] == 3
    assert "classifier fc left at its initialisation: 10 classes in the file, 3 here" in (
        capsys.readouterr().err)


def test_a_body_that_does_not_fit_is_still_an_error(data, tmp_path):
    torch.save({"state_dict": timm.create_model("resnet18", num_classes=3).state_dict()},
               tmp_path / "r18.pth")
    with pytest.raises(UserError, match=r"does not fit the model: \d+ shape mismatch"):
        _start(data, "--initial-checkpoint", tmp_path / "r18.pth")
