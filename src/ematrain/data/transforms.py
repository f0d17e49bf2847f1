"""timm's data config and transforms: the evaluation transform a checkpoint records
(`DATA_CONFIG_KEYS`), the training augmentation, and the normalization of uint8 batches in the
main process (`Normalize`), with random erasing after it."""
from __future__ import annotations

import math

import torch
from timm.data import create_transform, resolve_data_config
from timm.data.random_erasing import RandomErasing

from ..util.errors import UserError

# Keys of the data config that fix the evaluation transform; kept in checkpoints so that
# validate.py rebuilds exactly the transform training validated with.
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# The largest side the evaluation resize may give (its crop is --img-size): as MAX_IMAGE_SIZE
# for the input itself, anything bigger only exhausts memory.
MAX_RESIZE = 4096
# How far normalization may take a pixel in [0, 1]: the ImageNet statistics give about 2.6; far
# beyond, the first layers overflow in 16-bit precision and training is not what was meant.
MAX_NORMALIZED = 1e4


def data_config_for(overrides: dict, model) -> dict:
    """timm's data config for the model, with the user's overrides (`ImageSpec.overrides()`),
    checked now that the model's defaults fill what the user left out."""
    config = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    config = {k: config[k] for k in DATA_CONFIG_KEYS if k in config}
    check_data_config(config)
    return config


def check_data_config(config: dict) -> None:
    """The evaluation resize (timm's: the crop size over --crop-pct) and the normalization of
    a data config stay within what an image can mean."""
    size, crop = max((config.get("input_size") or (0,))[-2:]), config.get("crop_pct") or 1.0
    resize = math.floor(size / crop)
    if resize > MAX_RESIZE:
        raise UserError(f"--crop-pct {crop:g} would resize every image to {resize} px before "
                        f"the {size} px center crop (at most {MAX_RESIZE}): give a --crop-pct of "
                        f"at least {size / MAX_RESIZE:.3g}, e.g. 0.875 or 1")
    for m, s in zip(config.get("mean") or (), config.get("std") or ()):
        reach = max(abs(m), abs(1.0 - m)) / s if s > 0 else math.inf
        if not reach <= MAX_NORMALIZED:
            raise UserError(f"--mean {m:g} with --std {s:g} takes pixels in [0, 1] to "
                            f"{reach:.3g} (at most {MAX_NORMALIZED:g}): mean and std are in "
                            f"units of the full pixel range, e.g. 0.485 and 0.229")


def train_transform(data_config: dict, aug, separate: bool = False):
    """timm's training transform for `data_config` with the augmentation of `aug` (AugSpec).

    Like timm's loader with its prefetcher, the transform stops at uint8 tensors: loader
    workers neither convert nor normalize, and pass a quarter of the bytes; `Normalize` does it
    for the whole batch, and random erasing (`batch_eraser`) follows it there.
    """
    try:
        return create_transform(**augmentation_kwargs(data_config, aug), use_prefetcher=True,
                                separate=separate)
    except (AssertionError, KeyError, ValueError) as exc:
        raise UserError(f"cannot build the training augmentation (--aa {aug.aa}, --scale, "
                        f"--ratio, --color-jitter): {type(exc).__name__} {exc}".rstrip()) from None


def augmentation_kwargs(data_config: dict, aug) -> dict:
    """timm's create_transform arguments of the training augmentation (AugSpec `aug`), shared
    by image batches and NaFlex batches (`data.naflex.train_batches`)."""
    config = dict(data_config, interpolation=aug.train_interpolation or data_config["interpolation"])
    return dict(**config, is_training=True, no_aug=aug.no_aug, scale=tuple(aug.scale),
                ratio=tuple(aug.ratio), hflip=aug.hflip, vflip=aug.vflip,
                color_jitter=aug.color_jitter, auto_augment=aug.aa, **_newer_augmentation(aug))


def _newer_augmentation(aug) -> dict:
    """timm's newer create_transform arguments (--train-crop-mode, --color-jitter-prob,
    --grayscale-prob, --gaussian-blur-prob), passed only when given."""
    given = {"train_crop_mode": getattr(aug, "train_crop_mode", None),
             "color_jitter_prob": getattr(aug, "color_jitter_prob", None),
             "grayscale_prob": getattr(aug, "grayscale_prob", None),
             "gaussian_blur_prob": getattr(aug, "gaussian_blur_prob", None)}
    return {k: v for k, v in given.items() if v not in (None, "")}


def batch_eraser(aug, device: torch.device) -> RandomErasing | None:
    """timm's random erasing of a normalized batch (--reprob), each image on its own draw."""
    if aug.no_aug or not aug.reprob:
        return None
    return RandomErasing(aug.reprob, mode=aug.remode, max_count=aug.recount, device=device)


def eval_transform(data_config: dict):
    """The evaluation transform, to uint8 tensors (see `train_transform` and `Normalize`)."""
    return create_transform(**data_config, is_training=False, use_prefetcher=True)


class Normalize:
    """uint8 image batches to the model's normalized float32 input, on the batch's device.

    ``(x - 255 * mean) / (255 * std)``: what a per-sample ToTensor and Normalize compute, as one
    operation per batch in the main process (timm's prefetcher does the same).
    """

    def __init__(self, mean, std, device: torch.device):
        shape = (1, -1, 1, 1)
        self.scale = torch.tensor([255.0 * s for s in std], device=device).view(shape)
        self.shift = torch.tensor([255.0 * m for m in mean], device=device).view(shape)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():  # already normalized (a caller's own transform)
            return images
        return images.float().sub_(self.shift).div_(self.scale)
