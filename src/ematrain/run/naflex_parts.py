"""A run's parts under --naflex-loader: the training batches (timm's NaFlex stream of patch
sequences), the NaFlex validation pipeline, and the loss scale of each batch, as timm's
train.py sets them up.

NaFlex training is the sibling of variable-size training (`build.use_sized_batches`): the
epoch's batches come from a schedule of their own, counted in batches on resume, and each
batch's loss may be scaled by its size (--naflex-loss-scale, against -b: timm's reference
under NaFlex, which also leaves the learning rate at -b's).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..data.naflex import (
    PatchErase,
    PatchNormalize,
    check_patch_sizes,
    eval_collate,
    eval_transform,
    model_patch_size,
    naflex_mixup,
    train_batches,
)
from ..data.sized_batches import loss_scale
from ..data.transforms import augmentation_kwargs
from ..settings.train_specs import TrainSettings
from ..util.distributed import DistInfo, all_reduce_sum
from ..util.logs import log


def use_naflex_batches(train, s: TrainSettings, dist: DistInfo, model: nn.Module,
                       num_classes: int, device: torch.device) -> None:
    """--naflex-loader: `train` (a `parts.TrainData`) trains on timm's NaFlex batches over its
    seeded samples (mixup/cutmix inside the stream, as timm's NaFlexMixup) and validates
    through timm's NaFlex evaluation transform at --naflex-max-seq-len; both are normalized,
    and the training batches randomly erased, in the main process."""
    spec, aug, labels, config = s.naflex, s.aug, s.labels, train.data_config
    patch = model_patch_size(model, s.model.model)
    check_patch_sizes(model, s.model.model, spec.naflex_patch_sizes)
    mixup = (naflex_mixup(num_classes, labels.mixup, labels.cutmix, labels.mixup_prob,
                          labels.mixup_switch_prob, labels.smoothing, labels.mixup_off_epoch)
             if labels.mixing else None)
    train.train_set.dataset.transform = None  # the stream sizes each image to its batch
    train.naflex = train_batches(
        train.train_set, patch_size=patch, seq_lens=spec.naflex_train_seq_lens,
        batch_size=s.loader.batch_size, seed=s.loop.seed,
        transform_kwargs=augmentation_kwargs(config, aug), patch_sizes=spec.naflex_patch_sizes,
        patch_size_probs=spec.naflex_patch_size_probs, mixup_fn=mixup, rank=dist.rank,
        world_size=dist.world_size, channels_last=spec.channels_last)
    train.steps_per_epoch = math.ceil(train.naflex.batches / s.optim.grad_accum_steps)
    # EMA horizons in images count the images of a step, which vary with its sequence length.
    train.images_per_step = max(1, round(len(train.train_set) / train.steps_per_epoch))
    train.normalize = PatchNormalize(config["mean"], config["std"], device,
                                     channels_last=spec.channels_last)
    train.erase = (PatchErase(aug.reprob, aug.remode, aug.recount, device,
                              channels_last=spec.channels_last)
                   if aug.reprob and not aug.no_aug else None)
    train.val_set.transform = eval_transform(config, patch, spec.naflex_max_seq_len,
                                             spec.channels_last)
    train.val_collate = eval_collate(spec.naflex_max_seq_len)
    log.info(f"NaFlex batches: sequence lengths {' '.join(map(str, spec.naflex_train_seq_lens))}"
             f" at a budget of {s.loader.batch_size * max(spec.naflex_train_seq_lens)} patches, "
             f"{train.naflex.batches} batches per epoch; validation at "
             f"{spec.naflex_max_seq_len} patches per image")


def naflex_loss_scale(s: TrainSettings, dist: DistInfo, device: torch.device):
    """The factor of each NaFlex batch's loss, given its images, as timm's train loop computes
    it: (images / -b) to the power 1/2 (sqrt) or 1 (linear), 1 for none; under torchrun also
    world_size x images / the images of all processes, as their batches differ. None: 1."""
    mode, reference = s.naflex.naflex_loss_scale, float(s.loader.batch_size)
    if mode == "none" and not dist.enabled:
        return None

    def scale(images: int) -> float:
        factor = loss_scale(images, reference, mode)
        if dist.enabled:
            total = all_reduce_sum(torch.tensor(float(images), device=device), dist)
            factor *= dist.world_size * images / float(total)
        return factor
    return scale
