"""Write scikit-learn's bundled handwritten digits as a small ImageFolder tree.

The digits set (1,797 grey 8x8 images, 10 classes) ships inside scikit-learn,
so the demo needs no network access.  Images are scaled from 0..16 to 0..255,
upscaled to 32x32 with bicubic resampling and saved as RGB PNGs under
``root/train/<digit>/`` and ``root/val/<digit>/`` using a fixed stratified
80/20 split.

``label_noise=p`` writes the documented noisy variant: a fixed fraction ``p`` of the *training*
images (chosen with ``numpy.random.default_rng(seed + 1)``) is filed under another class, drawn
uniformly from the nine others; the validation images keep their true labels. Training on it
makes the raw weights noisy, which is where an EMA helps (and where a too-long one fails).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MARKER = ".complete"
SPLITS = ("train", "val")
IMAGE_SIZE = 32
VAL_FRACTION = 0.2


def _to_rgb_image(pixels: np.ndarray) -> Image.Image:
    """Turn one 8x8 array with values 0..16 into a 32x32 RGB image."""
    scaled = np.clip(np.rint(pixels.astype(np.float64) * (255.0 / 16.0)), 0, 255)
    grey = Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8 -> mode "L"
    grey = grey.resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.Resampling.BICUBIC)
    return grey.convert("RGB")


def flipped_labels(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """`labels` with round(fraction * len) of them moved to another class, uniformly drawn."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    chosen = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    for i in chosen:
        out[i] = (labels[i] + rng.integers(1, 10)) % 10
    return out


def write_digits_imagefolder(root: Path, seed: int = 0, label_noise: float = 0.0) -> Path:
    """Write the digits set as ``root/{train,val}/<class>/*.png`` and return ``root``.

    Does nothing when ``root/.complete`` already exists.  The tree is built in a
    temporary directory next to ``root`` and renamed into place, with the
    marker written last, so an interrupted run never leaves a partial tree at
    ``root``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    if (root / MARKER).is_file():
        return root

    digits = load_digits()
    images = digits.images
    labels = digits.target
    indices = np.arange(len(labels))
    train_idx, val_idx = train_test_split(
        indices,
        test_size=VAL_FRACTION,
        stratify=labels,
        random_state=seed,
        shuffle=True,
    )

    filed = {int(i): int(c) for i, c in enumerate(labels)}
    filed.update(zip(map(int, train_idx),
                     map(int, flipped_labels(labels[train_idx], label_noise, seed + 1))))

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split, split_idx in zip(SPLITS, (train_idx, val_idx)):
            for cls in range(10):
                (tmp / split / str(cls)).mkdir(parents=True, exist_ok=True)
            for i in sorted(int(j) for j in split_idx):
                cls = filed[i]
                _to_rgb_image(images[i]).save(tmp / split / str(cls) / f"{i:04d}.png")

        if (root / MARKER).is_file():
            # Another process finished the same tree while we were writing.
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        # A leftover tree without the marker is from an interrupted or foreign
        # run; replace it rather than merge into it.
        if root.exists():
            if root.is_dir() and not root.is_symlink():
                shutil.rmtree(root)
            else:
                root.unlink()
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    # Marker last: only a fully renamed tree is ever marked complete.
    (root / MARKER).write_text(f"seed={seed} label_noise={label_noise:g}\n")
    return root


def count_images(root: Path) -> dict[str, dict[str, int]]:
    """Return ``{split: {class: number of PNGs}}`` for an ImageFolder tree."""
    root = Path(root)
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        counts[split] = {
            d.name: sum(1 for _ in d.glob("*.png"))
            for d in sorted(split_dir.iterdir())
            if d.is_dir()
        }
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write sklearn's digits dataset as a 32x32 RGB ImageFolder tree."
    )
    parser.add_argument("root", nargs="?", default="data/digits", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="train/val split seed")
    parser.add_argument("--label-noise", type=float, default=0.0,
                        help="fraction of training labels moved to another class (default: 0)")
    args = parser.parse_args(argv)

    root = write_digits_imagefolder(Path(args.root), seed=args.seed, label_noise=args.label_noise)
    counts = count_images(root)
    print(f"digits ImageFolder at {root}")
    for split, per_class in counts.items():
        total = sum(per_class.values())
        print(f"  {split}: {total} images in {len(per_class)} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
