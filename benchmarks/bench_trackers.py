"""What the trackers cost a run: train.py on a small generated ImageFolder tree without
trackers, with --log-tensorboard, with --log-wandb (W&B offline) and with both; the whole
command's wall time and the run's own time ("done in", from the start of training: the trackers'
start-up included), median of --repeats runs each.

    .venv/bin/python benchmarks/bench_trackers.py [--repeats 4] [--epochs 3]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CASES = {"no tracker": [], "--log-tensorboard": ["--log-tensorboard"],
         "--log-wandb (offline)": ["--log-wandb"],
         "both": ["--log-tensorboard", "--log-wandb"]}


def seconds(text: str) -> float:
    """The run's "done in 12.3s" / "done in 1m02s" line, in seconds."""
    found = re.search(r"done in (?:(\d+)m)?([\d.]+)s", text)
    if not found:
        raise SystemExit(f"no 'done in' line:\n{text[-2000:]}")
    return 60 * int(found.group(1) or 0) + float(found.group(2))


def one_run(data: Path, out: Path, extra: list[str], epochs: int) -> tuple[float, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    args = [sys.executable, str(ROOT / "train.py"), str(data), "--model", "test_resnet",
            "--img-size", "32", "-b", "8", "-j", "0", "--epochs", str(epochs), "--lr", "0.05",
            "--warmup-epochs", "0", "--model-ema", "--model-ema-decay", "0.99", "0.999",
            "--log-interval", "5", "--output", str(out), *extra]
    start = time.perf_counter()
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return wall, seconds(r.stderr + r.stdout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    from conftest import make_imagefolder
    with tempfile.TemporaryDirectory() as tmp:
        data = make_imagefolder(Path(tmp) / "data", num_classes=4, train_per_class=40,
                                val_per_class=10)
        times = {name: [] for name in CASES}
        for i in range(args.repeats):  # interleaved, so that a change in load hits every case
            for name, extra in CASES.items():
                times[name].append(one_run(data, Path(tmp) / f"out{i}", extra, args.epochs))
    steps = 160 // 8 * args.epochs
    print(f"test_resnet 32 px, batch 8, {steps} steps ({args.epochs} epochs), two EMAs, "
          f"--log-interval 5; median [min-max] of {args.repeats}")
    print(f"{'trackers':<24} {'command (s)':>20} {'run (s)':>20}")
    for name, runs in times.items():
        print(f"{name:<24} {_spread([w for w, _ in runs]):>20} {_spread([r for _, r in runs]):>20}")
    return 0


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


if __name__ == "__main__":
    raise SystemExit(main())
