"""The same small image data written the ways timm users keep theirs: webdataset shards (with
`webdataset.ShardWriter` and timm's `_info.json`), a tar of images, a Hugging Face dataset (saved
to disk, or as parquet files), torchvision's MNIST files. Each from an ImageFolder tree
(conftest's `make_imagefolder`), so a test can compare a reader with the folder it came from."""
from __future__ import annotations

import json
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def folder_samples(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted folder names) and (path, label) of an ImageFolder split, in file order."""
    classes = sorted(p.name for p in Path(split_dir).iterdir() if p.is_dir())
    samples = [(f, i) for i, c in enumerate(classes) for f in sorted((Path(split_dir) / c).iterdir())]
    return classes, samples


def write_class_map(classes: list[str], path: Path) -> Path:
    Path(path).write_text("".join(f"{c}\n" for c in classes))
    return Path(path)


def write_shards(split_dir: Path, out: Path, split: str, per_shard: int, order_seed: int | None = 0,
                 ext: str = "png", info: bool = True) -> list[str]:
    """The split as `{split}-000000.tar`, ... of `per_shard` samples each (the last may hold
    fewer), in an order drawn from `order_seed` (None: folder order), with an `_info.json` entry
    timm's ReaderWds reads. Returns the shard file names."""
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _, samples = folder_samples(split_dir)
    if order_seed is not None:
        order = np.random.default_rng(order_seed).permutation(len(samples))
        samples = [samples[i] for i in order]
    pattern = str(out / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i, (path, label) in enumerate(samples):
            sink.write({"__key__": f"{split}{i:06d}", ext: path.read_bytes(),
                        "cls": str(label).encode(), "json": json.dumps({"label": label}).encode()})
    names = sorted(p.name for p in out.glob(f"{split}-*.tar"))
    if info:
        lengths = [min(per_shard, len(samples) - k * per_shard) for k in range(len(names))]
        info_path = out / "_info.json"
        data = json.loads(info_path.read_text()) if info_path.is_file() else {"splits": {}}
        data["splits"][split] = {"name": split, "num_samples": len(samples), "filenames": names,
                                 "shard_lengths": lengths}
        info_path.write_text(json.dumps(data))
    return names


def write_tar(split_dir: Path, tar_path: Path) -> Path:
    """An image-in-tar: the split's ``class/image`` files as members."""
    Path(tar_path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w") as tar:
        for path, _ in folder_samples(split_dir)[1]:
            tar.add(path, arcname=f"{path.parent.name}/{path.name}")
    return Path(tar_path)


def hf_splits(root: Path, splits=("train", "val"), names=None):
    """A DatasetDict of the folder's splits (image bytes, ClassLabel labels)."""
    import datasets

    classes = folder_samples(Path(root) / splits[0])[0]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=classes)})
    parts = {}
    for split in splits:
        samples = folder_samples(Path(root) / split)[1]
        parts[(names or {}).get(split, split)] = datasets.Dataset.from_dict(
            {"image": [{"bytes": p.read_bytes(), "path": None} for p, _ in samples],
             "label": [t for _, t in samples]}, features=features)
    return datasets.DatasetDict(parts)


def write_hf_saved(root: Path, out: Path, **kw) -> Path:
    hf_splits(root, **kw).save_to_disk(str(out))
    return Path(out)


def write_parquet(root: Path, out: Path, shards: int = 3, **kw) -> Path:
    """The splits as ``data/<split>-0000k-of-0000n.parquet`` (Hugging Face's own layout)."""
    (Path(out) / "data").mkdir(parents=True, exist_ok=True)
    for split, ds in hf_splits(root, **kw).items():
        for k in range(shards):
            ds.shard(shards, k, contiguous=True).to_parquet(
                str(Path(out) / "data" / f"{split}-{k:05d}-of-{shards:05d}.parquet"))
    return Path(out)


def write_mnist(root: Path, train: int = 30, test: int = 10, seed: int = 0) -> Path:
    """torchvision's MNIST raw files (idx format) of digit-like images: ``root/MNIST/raw``."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 4 + label:8 + label, 4:24] = 250  # a bar whose height says the digit
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return Path(root)


def corrupt_copy(image_bytes: bytes) -> bytes:
    """The image's bytes cut in half: a member that exists but does not decode."""
    return image_bytes[: max(8, len(image_bytes) // 2)]


def png_bytes(colour=(200, 30, 30), size: int = 16) -> bytes:
    import io
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()





# ----------------------------------------------------------------------------- fixtures
import pytest


@pytest.fixture(scope="session")
def same_data(tmp_path_factory):
    """One small learnable split pair (3 classes; train 30, val 15 images) written as a folder,
    two tars, wds shards of 7 (train: 5 shards, the last of 2; val: 3), a saved DatasetDict and
    parquet files (3 a split); `classes.txt` names the classes in label order. Written once a
    session (the Hugging Face writers are slow to import); tests only read it."""
    from conftest import make_imagefolder

    root = tmp_path_factory.mktemp("same_data")
    folder = make_imagefolder(root / "folder", num_classes=3, train_per_class=10, val_per_class=5)
    classes = folder_samples(folder / "train")[0]
    paths = {"root": root, "folder": folder, "classes": classes,
             "class_map": write_class_map(classes, root / "classes.txt"),
             "shards": root / "shards", "tars": root / "tars", "hf_saved": root / "hf_saved",
             "parquet": root / "parquet", "cache": root / "hf_cache"}
    for split in ("train", "val"):
        write_shards(folder / split, paths["shards"], split, per_shard=7)
        write_tar(folder / split, paths["tars"] / f"{split}.tar")
    write_hf_saved(folder, paths["hf_saved"], names={"val": "validation"})
    write_parquet(folder, paths["parquet"], names={"val": "validation"})
    return paths
