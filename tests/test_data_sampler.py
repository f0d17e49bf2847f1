"""The epoch sampler's order, sharding and repeated augmentation (--aug-repeats), and the
per-sample seeding that gives each repeat its own augmentation."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import make_imagefolder, make_training

from ematrain.data.samplers import EpochSampler, SeededSamples
from ematrain.settings.train_specs import train_settings
from ematrain.util.errors import UserError


def test_without_repeats_each_epoch_is_a_seeded_permutation():
    a = list(EpochSampler(10, seed=3))
    assert sorted(a) == list(range(10))
    assert list(EpochSampler(10, seed=3)) == a
    other = EpochSampler(10, seed=3)
    other.set_epoch(1)
    assert list(other) != a


def test_repeats_keep_the_epoch_length_and_group_the_copies():
    sampler = EpochSampler(10, seed=0, repeats=3)
    codes = list(sampler)
    assert len(sampler) == len(codes) == 10
    images = [c % 10 for c in codes]
    # Runs of three copies of one image, each copy with its own code: 4 distinct images.
    assert images[0:3] == [images[0]] * 3 and images[3:6] == [images[3]] * 3
    assert len(set(images)) == 4 and len(set(codes)) == 10
    assert sorted(c // 10 for c in codes[:3]) == [0, 1, 2]


def test_repeats_spread_the_copies_over_the_ranks():
    ranks = [list(EpochSampler(9, seed=0, rank=r, num_replicas=3, pad=True, repeats=3))
             for r in range(3)]
    assert [len(r) for r in ranks] == [3, 3, 3]
    # Position by position, every rank holds a copy of the same image, under another code.
    for position in range(3):
        assert len({r[position] % 9 for r in ranks}) == 1
        assert len({r[position] for r in ranks}) == 3
    counts = Counter(c % 9 for r in ranks for c in r)
    assert len(counts) == 3 and set(counts.values()) == {3}


class _Noise(torch.utils.data.Dataset):
    """Each item: a random draw (stands in for a random augmentation) and its label."""

    def __len__(self):
        return 5

    def __getitem__(self, index):
        return torch.rand(4), index


def test_each_repeat_gets_its_own_augmentation_and_the_same_label():
    samples = SeededSamples(_Noise(), seed=1)
    first, label = samples[2]
    again, _ = samples[2]
    repeat, repeat_label = samples[2 + 5]
    assert torch.equal(first, again)           # a code always gives the same augmentation
    assert repeat_label == label == 2
    assert not torch.equal(first, repeat)      # a repeat gets another one


def test_aug_repeats_reach_the_training_sampler(tmp_path):
    data = make_imagefolder(tmp_path / "data", num_classes=3, train_per_class=4, val_per_class=1)
    base = [str(data), "--model", "test_resnet", "--img-size", "32", "-b", "4", "-j", "0"]
    plain = make_training(base).run.data.sampler
    repeated = make_training(base + ["--aug-repeats", "3"]).run.data.sampler
    assert repeated.repeats == 3 and plain.repeats == 1
    assert len(repeated) == len(plain) == 12
    assert len({c % 12 for c in repeated}) == 4
    for bad in ("1.5", "-1"):
        with pytest.raises(UserError, match="--aug-repeats must be a whole number"):
            train_settings(base + ["--aug-repeats", bad])
    with pytest.raises(UserError, match="--aug-repeats: expected a finite number"):
        train_settings(base + ["--aug-repeats", "nan"])
