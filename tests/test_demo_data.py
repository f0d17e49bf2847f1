"""Tests for the digits ImageFolder writer and the synthetic-data helper."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import sklearn  # noqa: F401  (the test extra pulls in the demo extra; fail loudly if absent)
from conftest import make_imagefolder
from PIL import Image

from ematrain.data.digits import MARKER, write_digits_imagefolder

DIGIT_CLASSES = [str(d) for d in range(10)]
DIGITS_TOTAL = 1797


def _pngs(split_dir: Path) -> dict[str, list[Path]]:
    return {
        d.name: sorted(d.glob("*.png"))
        for d in sorted(split_dir.iterdir())
        if d.is_dir()
    }


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return write_digits_imagefolder(tmp_path_factory.mktemp("digits") / "digits", seed=0)


def test_digits_counts_and_classes(digits_root):
    from sklearn.datasets import load_digits

    classes, counts = np.unique(load_digits().target, return_counts=True)
    per_class_total = {str(int(c)): int(n) for c, n in zip(classes, counts)}

    train = _pngs(digits_root / "train")
    val = _pngs(digits_root / "val")
    assert sorted(train) == DIGIT_CLASSES
    assert sorted(val) == DIGIT_CLASSES

    n_train = sum(len(v) for v in train.values())
    n_val = sum(len(v) for v in val.values())
    assert n_train + n_val == DIGITS_TOTAL
    assert n_val == pytest.approx(0.2 * DIGITS_TOTAL, abs=1)

    for cls in DIGIT_CLASSES:
        total = len(train[cls]) + len(val[cls])
        assert total == per_class_total[cls]
        # Stratified: each class keeps its share of the val split (+/- rounding).
        assert abs(len(val[cls]) - 0.2 * total) <= 1.0, cls


def test_digits_train_val_disjoint(digits_root):
    train_names = {p.name for p in (digits_root / "train").rglob("*.png")}
    val_names = {p.name for p in (digits_root / "val").rglob("*.png")}
    assert not train_names & val_names
    assert len(train_names) + len(val_names) == DIGITS_TOTAL


def test_digits_images_are_32x32_rgb(digits_root):
    paths = sorted(digits_root.rglob("*.png"))
    for p in paths[:: max(1, len(paths) // 50)]:
        with Image.open(p) as im:
            assert im.size == (32, 32)
            assert im.mode == "RGB"
            lo, hi = im.convert("L").getextrema()
            assert 0 <= lo < hi <= 255


def test_digits_marker_and_no_temp_leftovers(digits_root):
    assert (digits_root / MARKER).is_file()
    leftovers = [p for p in digits_root.parent.iterdir() if p != digits_root]
    assert leftovers == []


def test_digits_idempotent(digits_root):
    before = _tree_digest(digits_root)
    mtimes = {p: p.stat().st_mtime_ns for p in digits_root.rglob("*.png")}
    again = write_digits_imagefolder(digits_root, seed=0)
    assert again == digits_root
    assert _tree_digest(digits_root) == before
    assert {p: p.stat().st_mtime_ns for p in digits_root.rglob("*.png")} == mtimes


def test_digits_replaces_incomplete_tree(tmp_path):
    root = tmp_path / "digits"
    (root / "train" / "0").mkdir(parents=True)
    (root / "train" / "0" / "junk.png").write_bytes(b"not a png")
    write_digits_imagefolder(root, seed=0)
    assert not (root / "train" / "0" / "junk.png").exists()
    assert (root / MARKER).is_file()
    assert len(list(root.rglob("*.png"))) == DIGITS_TOTAL


def test_digits_split_is_deterministic(tmp_path, digits_root):
    other = write_digits_imagefolder(tmp_path / "again", seed=0)
    assert _tree_digest(other) == _tree_digest(digits_root)


def test_make_imagefolder_counts(tmp_path):
    root = make_imagefolder(tmp_path / "d", num_classes=4, train_per_class=5, val_per_class=2, size=16)
    for split, n in (("train", 5), ("val", 2)):
        files = _pngs(root / split)
        assert sorted(files) == [f"class_{k}" for k in range(4)]
        assert all(len(v) == n for v in files.values())
    with Image.open(next((root / "train" / "class_0").glob("*.png"))) as im:
        assert im.size == (16, 16)
        assert im.mode == "RGB"


def test_make_imagefolder_custom_splits(tmp_path):
    root = make_imagefolder(tmp_path / "d", num_classes=2, val_per_class=3, splits=("val",))
    assert not (root / "train").exists()
    assert all(len(v) == 3 for v in _pngs(root / "val").values())


def test_make_imagefolder_deterministic(tmp_path):
    a = make_imagefolder(tmp_path / "a", seed=3)
    b = make_imagefolder(tmp_path / "b", seed=3)
    c = make_imagefolder(tmp_path / "c", seed=4)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a) != _tree_digest(c)


def test_make_imagefolder_classes_separable(tiny_data):
    """Mean colour alone should classify the val images (sanity check on learnability)."""

    def mean_rgb(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            return np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(axis=0)

    train = _pngs(tiny_data / "train")
    centroids = {c: np.mean([mean_rgb(p) for p in ps], axis=0) for c, ps in train.items()}
    val = _pngs(tiny_data / "val")
    correct = total = 0
    for cls, paths in val.items():
        for p in paths:
            x = mean_rgb(p)
            pred = min(centroids, key=lambda c: float(np.sum((centroids[c] - x) ** 2)))
            correct += pred == cls
            total += 1
    assert total == 3 * 8
    assert correct == total


def test_label_noise_moves_a_fixed_fraction_of_training_images_only(digits_root, tmp_path):
    noisy = write_digits_imagefolder(tmp_path / "noisy", seed=0, label_noise=0.3)

    def where(root, split):
        return {p.name: cls for cls, paths in _pngs(root / split).items() for p in paths}

    clean_train, noisy_train = where(digits_root, "train"), where(noisy, "train")
    assert clean_train.keys() == noisy_train.keys()
    moved = [name for name in clean_train if clean_train[name] != noisy_train[name]]
    assert len(moved) == round(0.3 * len(clean_train))
    assert where(digits_root, "val") == where(noisy, "val")
    # The same images, only filed elsewhere; the choice is fixed.
    again = write_digits_imagefolder(tmp_path / "again", seed=0, label_noise=0.3)
    assert where(again, "train") == noisy_train
