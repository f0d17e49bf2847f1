"""AugMix splits (`ematrain.augmix`): a batch of B images is 3 x B views, split-major, whose
first split is the clean view of the same seeded sample; the JSD loss is three-way (cross-entropy
of the clean split plus the divergence of all three from their mixture); split BatchNorm keeps
statistics per split; --resplit erases the augmented splits only."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_imagefolder
from timm.data import create_transform
from torchvision import transforms as T

from ematrain import data
from ematrain.data.augmix import (
    check_splits,
    collate_splits,
    jsd_loss,
    split_batchnorm,
    split_eraser,
    split_samples,
)
from ematrain.util.errors import UserError

SEED, SPLITS, B = 3, 3, 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("augmix"), num_classes=2, train_per_class=6,
                            size=40, splits=("train",))


def _stages():
    return create_transform(32, is_training=True, auto_augment="augmix-m3-w1",
                            use_prefetcher=True, separate=True)


def test_a_batch_is_three_views_and_the_first_is_the_clean_one(root):
    folder = data.load_image_folder(root / "train")
    samples = data.SeededSamples(split_samples(folder, SPLITS), SEED)
    samples.dataset.transform = _stages()
    loader = torch.utils.data.DataLoader(samples, batch_size=B, collate_fn=collate_splits)
    images, targets = next(iter(loader))
    assert images.shape == (SPLITS * B, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(targets, targets[:B].repeat(SPLITS))

    # The clean split is the primary transform (crop, flip) of the same seeded draw.
    primary, _, final = _stages()
    clean = data.SeededSamples(data.load_image_folder(root / "train",
                                                      transform=T.Compose([primary, final])), SEED)
    for i in range(B):
        assert torch.equal(images[i], clean[i][0])
        assert not torch.equal(images[i], images[i + B])  # AugMix changed the other views
    # The same sample gives the same three views again (resume sees what the run saw).
    again, _ = next(iter(loader))
    assert torch.equal(images, again)


def test_jsd_loss_is_three_way():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(SPLITS * B, 5, generator=g)
    targets = torch.randint(0, 5, (B,), generator=g).repeat(SPLITS)
    loss = jsd_loss(SPLITS, smoothing=0.0)(logits, targets)
    splits = logits.split(B)
    probs = [F.softmax(s, dim=1) for s in splits]
    mixture = torch.stack(probs).mean(0).clamp(1e-7, 1)
    # KL(p_i || M) for each of the three splits, averaged, times timm's alpha 12.
    kl = sum((p * (p.log() - mixture.log())).sum(1).mean() for p in probs) / 3
    torch.testing.assert_close(loss, F.cross_entropy(splits[0], targets[:B]) + 12 * kl)
    # Each split's prediction moves the loss: the divergence term is not the clean split's only.
    bumped = logits.clone()
    bumped[2 * B:] += torch.randn(B, 5, generator=g)
    assert not torch.isclose(jsd_loss(SPLITS, 0.0)(bumped, targets), loss)


def test_split_batchnorm_keeps_statistics_per_split():
    torch.manual_seed(0)
    model = split_batchnorm(timm.create_model("test_resnet", num_classes=2), SPLITS)
    bn = model.bn1
    assert type(bn).__name__ == "SplitBatchNorm2d" and len(bn.aux_bn) == SPLITS - 1
    x = torch.cat([torch.zeros(B, 3, 32, 32), torch.randn(2 * B, 3, 32, 32) * 3])
    model.train()
    model(x)
    main, aux = bn.running_var.clone(), bn.aux_bn[0].running_var.clone()
    assert not torch.allclose(main, aux)  # the clean zeros and the noisy splits differ
    # The state (and so every EMA shadow and checkpoint) carries the auxiliary statistics.
    assert "bn1.aux_bn.0.running_mean" in model.state_dict()
    model.eval()
    assert model(x[:B]).shape == (B, 2)  # evaluation: main statistics, any batch size


def test_resplit_erases_the_augmented_splits_only():
    torch.manual_seed(0)
    batch = torch.randn(SPLITS * B, 3, 16, 16)
    erased = split_eraser(1.0, "const", 1, SPLITS, "cpu")(batch.clone())
    assert torch.equal(erased[:B], batch[:B])
    assert all(not torch.equal(erased[i], batch[i]) for i in range(B, SPLITS * B))


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_splits=1), "0 \\(off\\) or at least 2"),
    (dict(num_splits=0, jsd_loss=True), "--jsd-loss compares"),
    (dict(num_splits=0, split_bn=True), "--split-bn keeps"),
    (dict(num_splits=3, no_aug=True), "--no-aug"),
    (dict(num_splits=3, jsd_loss=True, mixing=True), "mixup/cutmix"),
])
def test_combinations_timm_would_assert_on_are_one_line(kwargs, message):
    args = dict(num_splits=0, jsd_loss=False, split_bn=False, resplit=False, mixing=False,
                no_aug=False) | kwargs
    with pytest.raises(UserError, match=message):
        check_splits(**args)
    check_splits(3, True, True, True, False, False)  # the usual recipe passes
    check_splits(0, False, True, True, False, False)  # timm: split-bn with resplit alone
