"""Variable-size training's batches (`ematrain.sized_batches`): each batch has the image size and
batch size of its scheduled choice, the schedule is the same on every pass of an epoch, and a
pass started part-way (resume) gives exactly the rest of the uninterrupted one, pixel for pixel."""
from __future__ import annotations

import pytest
import torch
from conftest import make_imagefolder
from timm.data import create_transform

from ematrain import data
from ematrain.data.sized_batches import (
    SizeChoices,
    SizedBatches,
    loss_scale,
    sized_samples,
)
from ematrain.util.errors import UserError

SEED = 7


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("sized"), num_classes=2, train_per_class=20,
                            size=40, splits=("train",))
    return data.load_image_folder(root / "train")


def _loader(folder, choices: SizeChoices, epochs: int = 3):
    transforms = [create_transform(s, is_training=True, use_prefetcher=True)
                  for s in choices.img_sizes]
    samples = sized_samples(data.SeededSamples(folder, SEED), transforms)
    sampler = data.EpochSampler(len(folder), SEED)
    batches = SizedBatches(sampler, choices, SEED, epochs, data.EpochTagged(sampler))
    return torch.utils.data.DataLoader(samples, batch_sampler=batches, num_workers=0), batches


def test_each_batch_has_its_choices_size(folder):
    choices = SizeChoices.of([24, 32], [8, 4], batch_size=99)
    loader, batches = _loader(folder, choices)
    batches.set_epoch(0)
    keys = list(batches)
    shapes = [tuple(images.shape) for images, _ in loader]
    assert len(shapes) == len(keys) == len(batches) == batches.batches
    assert set(shapes) == {(8, 3, 24, 24), (4, 3, 32, 32)}
    for key, shape in zip(keys, shapes):
        choice = key[0][1]
        assert all(k[1] == choice for k in key)  # one size per batch
        assert shape == ((8, 3, 24, 24), (4, 3, 32, 32))[choice]
    # Sample-budget mode: the batches use up to the epoch's 40 images, each at most once.
    codes = [k[0][1] for key in keys for k in key]
    assert len(codes) == len(set(codes)) and 40 - 4 < len(codes) <= 40
    # timm's reference batch for the LR and the loss scale: the choices' mean under the probs.
    assert batches.average_batch_size == pytest.approx(6.0)


def test_a_pass_started_part_way_is_the_rest_of_the_whole_one(folder):
    choices = SizeChoices.of([24, 32], [8, 4], batch_size=4, probs=[1, 3])
    loader, batches = _loader(folder, choices)
    batches.set_epoch(1)
    whole = [(i.clone(), t.clone()) for i, t in loader]
    batches.set_epoch(2)
    other = [i.shape for i, _ in loader]
    batches.set_epoch(1, start=3)
    rest = list(loader)
    assert len(rest) == len(whole) - 3 == len(batches)
    for (a, ta), (b, tb) in zip(whole[3:], rest):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert other != [i.shape for i, _ in whole]  # the epoch draws its own schedule


def test_progressive_schedule_moves_from_the_first_size_to_the_last(folder):
    choices = SizeChoices.of([24, 32], [4, 4], batch_size=4, schedule="progressive",
                             spread=0.0, random_mix=0.0)
    _, batches = _loader(folder, choices, epochs=3)
    firsts = []
    for epoch in range(3):
        batches.set_epoch(epoch)
        firsts.append({k[1] for key in batches for k in key})
    assert firsts[0] == {0} and firsts[2] == {1}


def test_a_fixed_number_of_batches_per_epoch(folder):
    choices = SizeChoices.of([24], None, batch_size=8, num_batches=9)
    _, batches = _loader(folder, choices)
    batches.set_epoch(0)
    assert len(batches) == 9 and len(list(batches)) == 9  # cycles the 40 images


@pytest.mark.parametrize("mode,expected", [("none", 1.0), ("linear", 0.5), ("sqrt", 0.5 ** 0.5)])
def test_loss_scale_is_the_batch_relative_to_the_average(mode, expected):
    assert loss_scale(3, 6.0, mode) == pytest.approx(expected)


@pytest.mark.parametrize("kwargs,message", [
    (dict(img_sizes=[24, 32], batch_sizes=[8]), "one each"),
    (dict(img_sizes=[24], batch_sizes=None, probs=[1, 2]), "one each"),
    (dict(img_sizes=[24, 32], batch_sizes=None, probs=[0, 0]), "positive sum"),
    (dict(img_sizes=[24], batch_sizes=None, schedule="progressive"), "at least two"),
    (dict(img_sizes=[24], batch_sizes=None, num_batches=0), ">= 1"),
])
def test_choices_that_cannot_work_are_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        SizeChoices.of(batch_size=4, **kwargs)


def test_batches_larger_than_the_split_are_refused(folder):
    with pytest.raises(UserError, match="--train-img-sizes"):
        _loader(folder, SizeChoices.of([24], [64], batch_size=64))
