"""What a run does with its EMA shadows at the end of each epoch, before they are validated
and saved: their BatchNorm statistics (``--model-ema-bn``) and switch-EMA (``--model-ema-switch``).

BatchNorm statistics of a shadow:

* ``average`` (the default): the running statistics are averaged like the weights.
* ``copy``: the live model's running statistics are copied into every shadow.
* ``recalibrate``: each shadow's statistics are recomputed on ``--model-ema-bn-batches`` training
  batches with torch's ``swa_utils.update_bn`` (a cumulative average over the batches, as for
  SWA). The shadow is swapped into the live model for it (`ModelEma.swapped_into`), so a shadow
  in host memory is recalibrated on the training device, and the raw weights come back bit for
  bit. The batches are training images under the evaluation transform, in an order fixed by
  (seed, epoch) and drawn by a loader of their own: the training data order is untouched, and
  every rank of a torchrun job recalibrates on the same batches, so the shadows still agree.

The statistics set here are the ones validated and saved at the epoch's end (a mid-epoch
recovery checkpoint holds the averaged ones, as the run had them then, so resume is exact).

Switch-EMA (Li et al. 2024, SEMA): after that, the live model's weights (parameters and buffers)
are replaced by the first shadow's; the optimizer state is kept. The epoch's raw weights, as
validated and saved, are then the EMA's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from ..util.modules import unwrap_model
from .model_ema import ModelEma

BN_POLICIES = ("average", "copy", "recalibrate")


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (timm's BatchNormAct2d included)."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _statistics(module: nn.Module) -> list[torch.Tensor]:
    return [t for bn in batchnorms(module)
            for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if t is not None]


@torch.no_grad()
def copy_statistics(source: nn.Module, target: nn.Module) -> None:
    """Copy `source`'s BatchNorm running statistics into `target` (the same architecture)."""
    torch._foreach_copy_(_statistics(target), _statistics(unwrap_model(source)))


@torch.no_grad()
def switch_to_shadow(ema: ModelEma, model: nn.Module, index: int = 0) -> None:
    """Switch-EMA: load shadow `index` into the live model's own tensors, so the Parameter
    objects, and the optimizer state keyed on them, stay."""
    ema.wait()
    source = unwrap_model(model)
    shadow = ema.shadows[index]
    live = list(source.parameters()) + list(source.buffers())
    torch._foreach_copy_(live, list(shadow.parameters()) + list(shadow.buffers()))


@torch.no_grad()
def recalibrate(ema: ModelEma, model: nn.Module, batches: Callable[[], Iterator]) -> None:
    """Recompute every shadow's BatchNorm statistics on the inputs `batches()` yields (called
    once per shadow), in the live model, which gets its raw weights back after each."""
    plain = unwrap_model(model)  # DDP's forward would broadcast the raw buffers
    for index, shadow in enumerate(ema.shadows):
        with ema.swapped_into(plain, index):
            update_bn(batches(), plain)
            copy_statistics(plain, shadow)


@dataclass
class ShadowPolicy:
    """The end-of-epoch treatment of a run's shadows (see the module notes).

    Attributes:
        bn: one of `BN_POLICIES`.
        bn_batches: batches ``recalibrate`` uses.
        switch: switch-EMA at every epoch's end.
        batches: ``batches(epoch)``, the loader batches (images) ``recalibrate`` draws that
            epoch: training images under the evaluation transform, in an order fixed by the
            epoch (the run's builder makes it), at most `bn_batches` of them.
    """
    bn: str = "average"
    bn_batches: int = 20
    switch: bool = False
    batches: Callable[[int], Iterable[torch.Tensor]] | None = None

    def apply(self, ema: ModelEma | None, model: nn.Module, epoch: int,
              prepare: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Set the shadows' BatchNorm statistics, then switch; `prepare` turns a loader batch
        into the model's input (device, normalization, dtype, layout)."""
        if ema is None:
            return
        ema.wait()
        if self.bn == "copy":
            for shadow in ema.shadows:
                copy_statistics(model, shadow)
        elif self.bn == "recalibrate" and batchnorms(ema.module):
            recalibrate(ema, model, lambda: self._inputs(epoch, prepare))
        if self.switch:
            switch_to_shadow(ema, model)

    def _inputs(self, epoch: int, prepare) -> Iterator[torch.Tensor]:
        for images in self.batches(epoch):
            yield prepare(images)
