"""The train step: torchvision's recipe. Forward, loss, backward (through the AMP scaler), and on
the last batch of an accumulation group clip, step and the EMA update; `Batches` turns a loader
batch into the step's input first."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from timm.models import model_parameters
from timm.utils import dispatch_clip_grad
from torch import nn

from ..data.naflex import batch_images, to_dtype
from ..ema.collection import EmaCollection
from ..ema.model_ema import ModelEma


class SkippedStep(Exception):
    """Raised by `train_step` before the backward of a loss that --skip-nonfinite skips."""


@dataclass
class Recipe:
    """How one training step runs: loss, precision, clipping; `skip` for --skip-nonfinite."""
    loss_fn: nn.Module
    autocast: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    clip_grad: float | None = None
    clip_mode: str = "norm"
    # --skip-nonfinite: given the loss, whether to skip this step (every rank must agree).
    skip: Callable[[torch.Tensor], bool] | None = None
    # The loss of a batch when it is more than loss_fn(model(images), targets): distillation's
    # (`run.distill.Distillation`, which runs the model itself).
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # --synchronize-step: wait for the device after each optimizer step.
    synchronize: Callable[[], None] | None = None
    # --variable-batch-loss-scale, --naflex-loss-scale: the factor of a batch's loss, given
    # its size.
    loss_scale: Callable[[int], float] | None = None
    # What the EMAs average when the trained module holds more than the model (feature
    # distillation's student, beside its projection); None: the trained module itself.
    averaged: nn.Module | None = None

    def loss(self, model: nn.Module, images: torch.Tensor, targets) -> torch.Tensor:
        if self.objective is not None:
            loss = self.objective(images, targets).float()
        else:
            # The loss of a 16-bit model's output is computed in float32, as autocast does.
            loss = self.loss_fn(model(images).float(), targets)
        if self.loss_scale is not None:
            loss = loss * self.loss_scale(batch_images(images))
        return loss

    def clip_parameters(self, model: nn.Module) -> list[torch.Tensor]:
        """What --clip-grad clips: the trained parameters (distillation's own, its projection's
        included); AGC leaves the classifier alone, as timm does."""
        exclude_head = "agc" in self.clip_mode
        if self.objective is not None and hasattr(self.objective, "clip_parameters"):
            return self.objective.clip_parameters(exclude_head)
        return list(model_parameters(model, exclude_head=exclude_head))


def _no_sync(model: nn.Module, update: bool):
    """DDP's no_sync for the micro-batches of an accumulation group before its last one."""
    if not update and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(model: nn.Module, optimizer, images: torch.Tensor, targets: torch.Tensor,
               recipe: Recipe, emas: EmaCollection | ModelEma | None, update: bool = True,
               group_size: int = 1) -> torch.Tensor:
    """Forward, loss, backward; when `update`: clip, optimizer step, EMA update.

    `group_size` batches make one update (gradient accumulation): each one's loss is divided by
    it. Returns the batch's loss (detached, on the device).
    """
    device = targets.device.type  # the images may be a NaFlex batch (a dict of tensors)
    with _no_sync(model, update):
        with torch.autocast(device, dtype=recipe.autocast, enabled=recipe.autocast is not None):
            loss = recipe.loss(model, images, targets)
        if recipe.skip is not None and recipe.skip(loss):
            raise SkippedStep
        scaled = loss / group_size if group_size > 1 else loss
        # Second-order optimizers (AdaHessian) need the graph of the gradients.
        create_graph = getattr(optimizer, "is_second_order", False)
        if recipe.scaler is not None:
            recipe.scaler.scale(scaled).backward(create_graph=create_graph)
        else:
            scaled.backward(create_graph=create_graph)
    if update:
        if recipe.clip_grad is not None:
            if recipe.scaler is not None:
                recipe.scaler.unscale_(optimizer)
            dispatch_clip_grad(recipe.clip_parameters(model), value=recipe.clip_grad,
                               mode=recipe.clip_mode)
        if recipe.scaler is not None:
            recipe.scaler.step(optimizer)
            recipe.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if recipe.synchronize is not None:
            recipe.synchronize()
        if emas is not None:  # the run's EMAs (a collection, or one ModelEma) count the step
            emas.update(model if recipe.averaged is None else recipe.averaged)
    return loss.detach()


# ----------------------------------------------------------------------------- its input
@dataclass
class Batches:
    """What happens to a loader batch before the step: device, normalization (the loader gives
    uint8), random erasing, mixing, dtype, layout. A NaFlex batch (a dict of patches,
    coordinates and masks, already mixed by its stream) is moved and normalized by its
    `normalize` (`data.naflex.PatchNormalize`)."""
    device: torch.device
    dtype: torch.dtype | None = None  # --model-dtype; None keeps float32
    channels_last: bool = False
    mixup_fn: Callable | None = None
    normalize: Callable | None = None
    erase: Callable | None = None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor):
        targets = targets.to(self.device, non_blocking=True)
        if isinstance(images, dict):
            images = self.normalize(images)
            images = self.erase(images) if self.erase is not None else images
            return to_dtype(images, self.dtype) if self.dtype is not None else images, targets
        images = images.to(self.device, non_blocking=True)
        if self.normalize is not None:
            images = self.normalize(images)
        if self.erase is not None:
            images = self.erase(images)
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        if self.dtype is not None:
            images = images.to(self.dtype)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets
