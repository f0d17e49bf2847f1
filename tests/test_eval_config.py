"""validate.py's evaluation transform (`ematrain.eval_config`): training's recorded transform for
our checkpoints, field by field overridden by the flags; timm's validate.py default (the test
size) for files without one, the training size with --use-train-size; --test-pool as timm."""
from __future__ import annotations

import pytest
import timm
import torch

from ematrain.run.eval_config import eval_data_config, with_test_time_pool
from ematrain.util.errors import UserError

NONE = dict(img_size=None, input_size=None, crop_pct=None, crop_mode=None, mean=None, std=None,
            interpolation="")


@pytest.fixture(scope="module")
def resnet18():
    return timm.create_model("resnet18", num_classes=3)  # test size 288 / crop 1.0 in its cfg


def test_without_a_recorded_transform_the_test_size_unless_use_train_size(resnet18):
    default = eval_data_config(resnet18, NONE)
    assert default["input_size"] == (3, 288, 288) and default["crop_pct"] == 1.0
    train = eval_data_config(resnet18, NONE, use_train_size=True)
    assert train["input_size"] == (3, 224, 224) and train["crop_pct"] == 0.95
    # Flags override timm's config as its resolve_data_config does.
    given = eval_data_config(resnet18, dict(NONE, img_size=64, crop_pct=0.5, crop_mode="squash",
                                            mean=[0.5] * 3, interpolation="bilinear"))
    assert given["input_size"] == (3, 64, 64) and given["crop_pct"] == 0.5
    assert given["crop_mode"] == "squash" and given["mean"] == (0.5, 0.5, 0.5)
    assert given["interpolation"] == "bilinear"


def test_a_recorded_transform_is_kept_but_for_the_fields_given(resnet18):
    recorded = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.4,) * 3,
                "std": (0.2,) * 3, "crop_pct": 0.9, "crop_mode": "center"}
    assert eval_data_config(resnet18, NONE, recorded) == recorded
    assert eval_data_config(resnet18, NONE, recorded, use_train_size=True) == recorded
    changed = eval_data_config(resnet18, dict(NONE, img_size=48, std=[0.3, 0.3, 0.3]), recorded)
    assert changed == dict(recorded, input_size=(3, 48, 48), std=(0.3, 0.3, 0.3))
    sized = eval_data_config(resnet18, dict(NONE, input_size=[3, 40, 36]), recorded)
    assert sized["input_size"] == (3, 40, 36)


def test_crop_mode_is_one_of_timms():
    with pytest.raises(UserError, match="center, squash, border"):
        eval_data_config(None, dict(NONE, crop_mode="middle"))


def test_test_pool_applies_above_the_training_size(resnet18):
    config = eval_data_config(resnet18, NONE)  # 288 > resnet18's 224
    model, pooled_config, applied = with_test_time_pool(resnet18, config)
    assert applied and type(model).__name__ == "TestTimePoolHead"
    assert pooled_config["crop_pct"] == 1.0
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 288, 288)).shape == (1, 3)
    small = eval_data_config(resnet18, NONE, use_train_size=True)
    same, _, applied = with_test_time_pool(resnet18, small)
    assert not applied and same is resnet18
