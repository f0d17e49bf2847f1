"""validate.py's evaluation transform, and how timm's flags change it.

Our checkpoints record the transform training validated with, and validate.py keeps it, so its
numbers match the training log; each flag the user gives (--img-size, --input-size,
--crop-pct, --crop-mode, --mean, --std, --interpolation) replaces that field alone. Files that
record no transform (timm's checkpoints, plain state dicts, --pretrained) get timm's
validate.py default instead: the model's pretrained config at its *test* size where it has one
(resnet18: 288 px, crop 1.0), or its training size with --use-train-size; the flags override it
as timm's ``resolve_data_config`` does. --test-pool is timm's test-time pooling for inputs
larger than the size the model was trained at.
"""
from __future__ import annotations

from timm.data import resolve_data_config
from timm.layers import apply_test_time_pool

from ..settings.data_specs import CROP_MODES
from ..util.errors import UserError


def eval_data_config(model, overrides: dict, recorded: dict | None = None,
                     use_train_size: bool = False) -> dict:
    """The evaluation data config. `overrides` holds the flags' values (None: not given):
    ``img_size input_size crop_pct crop_mode mean std interpolation``."""
    given = {k: v for k, v in overrides.items() if v not in (None, "")}
    mode = given.get("crop_mode")
    if mode is not None and mode not in CROP_MODES:
        raise UserError(f"--crop-mode must be one of {', '.join(CROP_MODES)}, got {mode!r}")
    if recorded:
        config = dict(recorded)
        size = given.pop("input_size", None) or (
            (config["input_size"][0], given["img_size"], given["img_size"])
            if "img_size" in given else None)
        given.pop("img_size", None)
        if size is not None:
            config["input_size"] = tuple(size)
        config.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
        return config
    config = resolve_data_config(given, model=model, use_test_size=not use_train_size)
    return {k: config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct",
                                   "crop_mode") if k in config}


def with_test_time_pool(model, config: dict):
    """--test-pool: timm's TestTimePoolHead when the evaluated input is larger than the model's
    training size (then the whole image is seen: crop 1.0, as timm's validate.py); the model
    and config to evaluate with, and whether it applied."""
    pooled, applied = apply_test_time_pool(model, config)
    if not applied:
        return model, config, False
    return pooled, dict(config, crop_pct=1.0), True
