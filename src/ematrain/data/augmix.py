"""AugMix-style augmentation splits (--aug-splits, --jsd-loss, --split-bn, --resplit), with timm's
building blocks inside our seeded pipeline.

Each training image becomes `num_splits` views: a clean one (timm's primary transform: the crop
and flip) and `num_splits - 1` through the secondary transform as well (AugMix with
``--aa augmix-...``, or whatever ``--aa`` names), all from one seeded draw of the sample
(`data.SeededSamples` wraps timm's `AugMixDataset`), so a resumed run sees the same views.
timm's `fast_collate` stacks a batch split-major: the B clean images, then each augmented split
(the model sees ``num_splits x B`` images, as in timm). `JsdCrossEntropy` scores the clean split
with cross-entropy and pulls every split's prediction towards their mixture;
`convert_splitbn_model` gives the augmented splits BatchNorm statistics of their own;
--resplit leaves the clean split out of random erasing.
"""
from __future__ import annotations

from timm.data import AugMixDataset
from timm.data.loader import fast_collate
from timm.data.random_erasing import RandomErasing
from timm.layers import convert_splitbn_model
from timm.loss import JsdCrossEntropy
from torch import nn

from ..util.errors import UserError

collate_splits = fast_collate  # split-major: batch[i + j * B] is view j of image i


def check_splits(num_splits: int, jsd_loss: bool, split_bn: bool, resplit: bool,
                 mixing: bool, no_aug: bool) -> None:
    """The family's rules, as timm's train.py asserts them (and what it would crash on)."""
    if num_splits == 1 or num_splits < 0:
        raise UserError(f"--aug-splits must be 0 (off) or at least 2 (a clean view and an "
                        f"augmented one), got {num_splits}")
    if jsd_loss and not num_splits:
        raise UserError("--jsd-loss compares the augmentation splits: give --aug-splits 3 (or 2)")
    if split_bn and not (num_splits or resplit):
        raise UserError("--split-bn keeps BatchNorm statistics per augmentation split: give "
                        "--aug-splits N (or --resplit)")
    if num_splits and no_aug:
        raise UserError("--aug-splits makes augmented views: it cannot go with --no-aug")
    if jsd_loss and mixing:
        raise UserError("--jsd-loss takes class labels, which mixup/cutmix replace by soft "
                        "targets: leave --mixup/--cutmix at 0 with --jsd-loss")


def split_samples(dataset, num_splits: int):
    """`dataset` (an ImageFolder) as timm's AugMixDataset: its transform must then be set to
    timm's three stages, ``create_transform(..., separate=True)``."""
    return AugMixDataset(dataset, num_splits=num_splits)


def jsd_loss(num_splits: int, smoothing: float) -> nn.Module:
    """timm's Jensen-Shannon divergence + cross-entropy loss (alpha 12, as timm's train.py)."""
    return JsdCrossEntropy(num_splits=num_splits, smoothing=smoothing)


def split_batchnorm(model: nn.Module, num_splits: int) -> nn.Module:
    """Every BatchNorm layer as timm's SplitBatchNorm2d: split 0 (the clean images) through the
    layer's own statistics, each further split through its auxiliary BatchNorm; evaluation
    (raw and EMA weights alike) uses the main statistics only."""
    return convert_splitbn_model(model, max(num_splits, 2))


def split_eraser(prob: float, mode: str, count: int, num_splits: int, device) -> RandomErasing:
    """Random erasing of a normalized split-major batch that leaves the clean split alone
    (--resplit: timm's ``re_split``)."""
    return RandomErasing(prob, mode=mode, max_count=count, num_splits=num_splits, device=device)
