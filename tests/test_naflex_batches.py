"""NaFlex batches (`ematrain.naflex`): timm's token-budget batches of patch sequences that a
NaFlexVit trains on; each epoch's stream is the same whatever the loader processes, and a pass
started part-way (resume) is the rest of the uninterrupted one."""
from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_imagefolder

from ematrain import data
from ematrain.data.naflex import (
    PatchNormalize,
    batch_images,
    eval_collate,
    eval_transform,
    model_patch_size,
    train_batches,
)
from ematrain.util.errors import UserError

SEED, PATCH, SEQ_LENS, BATCH = 5, (8, 8), (4, 9, 16), 4
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("naflex"), num_classes=2, train_per_class=12,
                            size=40, splits=("train",))
    return data.load_image_folder(root / "train")


def _stream(folder):
    return train_batches(data.SeededSamples(folder, SEED), patch_size=PATCH, seq_lens=SEQ_LENS,
                         batch_size=BATCH, seed=SEED,
                         transform_kwargs=dict(mean=MEAN, std=STD, interpolation="bilinear"))


def _pass(stream, epoch, start=0, workers=0):
    stream.set_epoch(epoch, start)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [(x["patches"].clone(), x["patch_coord"].clone(), y.clone()) for x, y in loader]


def test_batches_hold_a_token_budget_of_patch_sequences(folder):
    stream = _stream(folder)
    batches = _pass(stream, 0)
    assert len(batches) == len(stream) == stream.batches
    assert sum(y.numel() for *_, y in batches) == 24  # every image once per epoch
    lengths = set()
    for patches, coords, targets in batches:
        b, n, dim = patches.shape
        assert dim == 8 * 8 * 3 and n in SEQ_LENS and coords.shape == (b, n, 2)
        assert b * n <= BATCH * max(SEQ_LENS)  # tokens per batch within the budget
        lengths.add(n)
    assert len(lengths) > 1  # several sequence lengths in one epoch


def test_a_pass_is_the_same_with_workers_and_resumes_part_way(folder):
    stream = _stream(folder)
    whole = _pass(stream, 1)
    rest = _pass(stream, 1, start=2, workers=2)
    assert len(rest) == len(whole) - 2
    for a, b in zip(whole[2:], rest):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(whole, _pass(stream, 2))
                   if a[0].shape == b[0].shape)


def test_a_naflex_vit_trains_on_the_normalized_batches(folder):
    torch.manual_seed(0)
    model = timm.create_model("naflexvit_base_patch16_gap", num_classes=2, patch_size=8,
                              embed_dim=32, depth=1, num_heads=2)
    assert model_patch_size(model, "naflexvit") == PATCH
    stream = _stream(folder)
    stream.set_epoch(0)
    raw, targets = next(iter(torch.utils.data.DataLoader(stream, batch_size=None)))
    batch = PatchNormalize(MEAN, STD, torch.device("cpu"))(raw)
    first = raw["patches"][0, 0].view(-1, 3)
    torch.testing.assert_close(batch["patches"][0, 0].view(-1, 3),
                               (first - 127.5) / 63.75)
    assert batch_images(batch) == targets.numel()
    loss = torch.nn.functional.cross_entropy(model(batch), targets)
    loss.backward()
    assert model.embeds.proj.weight.grad.abs().sum() > 0


def test_evaluation_batches_have_the_fixed_sequence_length(folder):
    config = dict(interpolation="bilinear", mean=MEAN, std=STD)
    folder.transform = eval_transform(config, PATCH, max_seq_len=16)
    try:
        loader = torch.utils.data.DataLoader(folder, batch_size=5, collate_fn=eval_collate(16))
        batch, targets = next(iter(loader))
    finally:
        folder.transform = None
    assert batch["patches"].shape == (5, 16, 192) and batch["patch_valid"].all()


def test_a_model_without_patches_is_refused():
    with pytest.raises(UserError, match="needs a NaFlex model"):
        model_patch_size(timm.create_model("test_resnet"), "test_resnet")
