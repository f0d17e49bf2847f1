"""Training-loader throughput on each reader, ours against timm's own loader on the same data.

    .venv/bin/python benchmarks/bench_data.py [--per-class 40] [--rounds 5] [-j 2] [-b 32]

Writes an imagenette-shaped tree (10 classes, JPEGs whose short side is 320 px, as
imagenette2-320) into a temporary folder, and the same images as a tar per split and as
webdataset shards (`webdataset.ShardWriter`, 64 a shard, timm's `_info.json`). Then, for each
reader (ImageFolder, image-in-tar, wds), one training epoch of decode + augment to 224 px
(timm's training transform: random-resized crop, flip, colour jitter 0.4) and normalization:

* ours: the run's loader (`readers.open_mapped` + `data.SeededSamples` + `data.EpochSampler`, or
  the `readers` stream for wds), uint8 batches normalized in the main process (`data.Normalize`);
* timm: `timm.data.create_dataset` + `create_loader(is_training=True)` with its prefetcher (its
  train.py's default), which normalizes in the main process too, on the CPU here.

Each round runs ours, timm, timm, ours; each time is a whole epoch from `iter(loader)` (timm
starts its workers per epoch, ours keep theirs: that is part of what is measured), after one
untimed warm-up epoch of each. Images per second: median over the epochs, [min-max]; ours/timm:
the median of the rounds' ratios (each compares epochs run side by side), [min-max].

Then the cost of an exact mid-epoch resume of the wds stream: the time to the first batch of an
epoch from its start and from its middle (resumed: the workers replay their raw stream to their
positions, decoding nothing), both with fresh loader workers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name, load_line

CLASSES = 10
SIZE = 224


def write_tree(root: Path, per_class: int, seed: int = 0) -> None:
    """10 class folders of smooth random JPEGs, short side 320 (long side 320-480)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", max(2, per_class // 4))):
        for c in range(CLASSES):
            folder = root / "folder" / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                long = int(rng.integers(320, 481))
                small = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((long, 320), Image.Resampling.BICUBIC)
                if rng.random() < 0.3:
                    img = img.transpose(Image.Transpose.ROTATE_90)
                img.save(folder / f"img{i:05d}.JPEG", quality=90)


def write_tar_and_shards(root: Path) -> int:
    import webdataset as wds
    split = root / "folder" / "train"
    files = sorted(split.glob("*/*.JPEG"))
    classes = sorted(p.name for p in split.iterdir())
    with tarfile.open(root / "train.tar", "w") as tar:
        for f in files:
            tar.add(f, arcname=f"{f.parent.name}/{f.name}")
    (root / "shards").mkdir()
    order = np.random.default_rng(0).permutation(len(files))
    with wds.ShardWriter(str(root / "shards" / "train-%06d.tar"), maxcount=64, verbose=0) as sink:
        for i in order:
            f = files[i]
            sink.write({"__key__": f"s{i:06d}", "jpg": f.read_bytes(),
                        "cls": str(classes.index(f.parent.name)).encode()})
    names = sorted(p.name for p in (root / "shards").glob("*.tar"))
    lengths = [min(64, len(files) - 64 * k) for k in range(len(names))]
    (root / "shards" / "_info.json").write_text(json.dumps({"splits": {"train": {
        "name": "train", "num_samples": len(files), "filenames": names,
        "shard_lengths": lengths}}}))
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return len(files)


def config():
    from timm.data import resolve_data_config
    return resolve_data_config({"input_size": (3, SIZE, SIZE)})


class Aug:  # the AugSpec fields ematrain's train_transform reads, timm's defaults
    train_interpolation, no_aug, scale, ratio = "random", False, (0.08, 1.0), (3 / 4, 4 / 3)
    hflip, vflip, color_jitter, aa = 0.5, 0.0, 0.4, None


def ours(root: Path, reader: str, batch: int, workers: int):
    from ematrain import data
    from ematrain.data import readers
    cfg = {k: v for k, v in config().items()}
    transform = data.train_transform(cfg, Aug)
    normalize = data.Normalize(cfg["mean"], cfg["std"], torch.device("cpu"))
    if reader == "wds":
        spec = readers.resolve_dataset("wds/bench", str(root / "shards"),
                                       class_map=str(root / "classes.txt"))
        source = readers.open_source(spec, "train")
        stream = readers.open_stream(spec, source, "train", train=True, world=1, rank=0,
                                     workers=workers, batch_size=batch, seed=0, mode="RGB")
        stream.transform = transform
        loader = readers.stream_loader(stream, 0)
        return loader, (lambda epoch: loader.set_epoch(epoch)), normalize
    spec = readers.resolve_dataset("", str(root if reader == "tar" else root / "folder"))
    split = readers.open_mapped(spec, "train", "RGB", flag="--train-split")
    split.transform = transform
    samples = data.SeededSamples(split, 0)
    sampler = data.EpochSampler(len(split), 0)
    loader = data.make_loader(samples, batch, workers, 0, drop_last=True,
                              sampler=data.EpochTagged(sampler), persistent=True)

    def set_epoch(epoch):
        samples.set_epoch(epoch)
        sampler.set_epoch(epoch)
    return loader, set_epoch, normalize


def timms(root: Path, reader: str, batch: int, workers: int, count: int):
    from timm.data import create_dataset, create_loader
    cfg = config()
    if reader == "wds":
        ds = create_dataset("wds/bench", root=str(root / "shards"), split="train",
                            is_training=True, batch_size=batch, num_samples=count, seed=0)
    else:
        ds = create_dataset("", root=str(root / "train.tar" if reader == "tar" else
                                         root / "folder" / "train"), split="train",
                            is_training=True)
    loader = create_loader(ds, input_size=cfg["input_size"], batch_size=batch, is_training=True,
                           use_prefetcher=True, num_workers=workers, device=torch.device("cpu"),
                           mean=cfg["mean"], std=cfg["std"], interpolation="random",
                           color_jitter=0.4)
    return loader, (lambda epoch: ds.set_epoch(epoch) if hasattr(ds, "set_epoch") else None), None


def epoch_time(loader, set_epoch, normalize, epoch: int) -> tuple[float, int]:
    set_epoch(epoch)
    start, images = time.perf_counter(), 0
    for x, _ in loader:
        if normalize is not None:
            x = normalize(x)
        images += x.shape[0]
    return time.perf_counter() - start, images


def resume_cost(root: Path, batch: int, workers: int, rounds: int) -> tuple[list, list]:
    """Seconds to the first batch of a wds epoch from its start, and from its middle (resumed
    with the state a loader stopped there gave), per round, fresh loaders each time."""
    fresh, resumed = [], []
    for r in range(rounds):
        loader, _, _ = ours(root, "wds", batch, workers)
        half = loader.plan.steps // 2
        loader.set_epoch(r)
        start = time.perf_counter()
        for n, _ in enumerate(loader, 1):
            if n == 1:
                fresh.append(time.perf_counter() - start)
            if n == half:
                break
        state = loader.state_dict()
        loader.close()
        again, _, _ = ours(root, "wds", batch, workers)
        again.set_epoch(r, half, state)
        start = time.perf_counter()
        next(iter(again))
        resumed.append(time.perf_counter() - start)
        again.close()
    return fresh, resumed


def show(name: str, values: list[float]) -> str:
    return f"{statistics.median(values):7.0f} [{min(values):.0f}-{max(values):.0f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=40, help="training images per class")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tree(root, args.per_class)
        count = write_tar_and_shards(root)
        print(f"{count} training JPEGs (short side 320) -> {SIZE} px, -j {args.workers}, "
              f"-b {args.batch_size}, {args.rounds} rounds; cpu: {cpu_name()}")
        print(load_line() or "")
        print(f"{'reader':<12} {'ours img/s':>20} {'timm img/s':>20} {'ours/timm (per round)':>22}")
        rates = {}
        for reader in ("folder", "tar", "wds"):
            sides = {"ours": ours(root, reader, args.batch_size, args.workers),
                     "timm": timms(root, reader, args.batch_size, args.workers, count)}
            for side in sides.values():
                epoch_time(*side, epoch=0)  # warm-up: page cache, worker start, imports
            times = {name: [] for name in sides}
            ratios = []
            for r in range(args.rounds):
                # A B B A: each side as often first as second; the ratio of one round compares
                # epochs that ran side by side, under the same load.
                for name in ("ours", "timm", "timm", "ours"):
                    seconds, images = epoch_time(*sides[name], epoch=r + 1)
                    times[name].append(images / seconds)
                ratios.append((times["ours"][-1] + times["ours"][-2])
                              / (times["timm"][-1] + times["timm"][-2]))
            if hasattr(sides["ours"][0], "close"):
                sides["ours"][0].close()
            rates[reader] = times
            print(f"{reader:<12} {show('ours', times['ours']):>20} {show('timm', times['timm']):>20}"
                  f" {statistics.median(ratios):10.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
        shards = statistics.median(rates["wds"]["ours"]) / statistics.median(rates["folder"]["ours"])
        print(f"ours, shards / folders: {shards:.2f}")
        fresh, resumed = resume_cost(root, args.batch_size, args.workers, args.rounds)
        print(f"wds, first batch of an epoch: from its start {statistics.median(fresh):.2f} s "
              f"[{min(fresh):.2f}-{max(fresh):.2f}], resumed at its middle "
              f"{statistics.median(resumed):.2f} s [{min(resumed):.2f}-{max(resumed):.2f}] "
              f"(fresh workers both)")

if __name__ == "__main__":
    main()
