"""Shared pytest helpers: tiny learnable ImageFolder trees and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent

# Well separated dominant colours, one per class; more classes than this
# reuse the palette with a darkened shade so they still differ.
_PALETTE = (
    (220, 30, 30),    # red
    (30, 200, 40),    # green
    (30, 60, 220),    # blue
    (230, 220, 30),   # yellow
    (200, 40, 200),   # magenta
    (30, 210, 210),   # cyan
    (240, 140, 20),   # orange
    (130, 130, 130),  # grey
)


def _class_colour(cls: int) -> np.ndarray:
    base = np.array(_PALETTE[cls % len(_PALETTE)], dtype=np.float64)
    shade = 0.5 ** (cls // len(_PALETTE))
    return base * shade


def _make_image(rng: np.random.Generator, cls: int, size: int) -> Image.Image:
    """One image: class colour + mild noise + a bright square at a random spot."""
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = _class_colour(cls)
    img += rng.normal(0.0, 12.0, size=img.shape)
    side = max(2, size // 4)
    y, x = rng.integers(0, size - side + 1, size=2)
    img[y : y + side, x : x + side] = 245.0 + rng.normal(0.0, 4.0, size=(side, side, 3))
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def make_imagefolder(
    root,
    num_classes: int = 3,
    train_per_class: int = 24,
    val_per_class: int = 8,
    size: int = 32,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
) -> Path:
    """Write a small, easily learnable ImageFolder tree and return ``root``.

    Layout: ``root/<split>/class_<k>/<nnnn>.png``.  Each class has its own
    dominant colour, so a tiny CNN trained from scratch gets well above
    chance within an epoch or two.  Output depends only on the arguments.
    A split named ``"train"`` gets ``train_per_class`` images per class;
    every other split gets ``val_per_class``.
    """
    root = Path(root)
    for split_no, split in enumerate(splits):
        per_class = train_per_class if split == "train" else val_per_class
        for cls in range(num_classes):
            # Independent stream per (split, class) so counts in one split do
            # not change the pixels in another.
            rng = np.random.default_rng([seed, split_no, cls])
            cls_dir = root / split / f"class_{cls}"
            cls_dir.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                _make_image(rng, cls, size).save(cls_dir / f"{i:04d}.png")
    return root


def run_cli(
    script: str,
    *args,
    cwd=None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run ``python <repo>/<script> *args`` and capture its text output."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, str(REPO_ROOT / script), *(str(a) for a in args)]
    return subprocess.run(
        cmd,
        cwd=str(cwd) if cwd is not None else None,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A session-wide 3-class train/val ImageFolder tree (24/8 images per class)."""
    return make_imagefolder(tmp_path_factory.mktemp("tiny_data") / "data")
