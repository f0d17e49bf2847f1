"""Benchmark EMA schedules, BatchNorm policies and switch-EMA on digits with noisy labels.

The data is scikit-learn's digits written by ``ematrain.data.digits`` with 30% of the training
labels moved to another class (``--label-noise``; validation labels are true), so the raw weights
of a run are noisy. Every variant trains the same model with the same seeds; only the EMA
settings differ:

* ``constant``, ``timm``, ``debias``: ``--model-ema-decay 0.9 0.98 0.995`` under that schedule
* ``power``: ``--model-ema-sigma-rel 0.05 0.1 0.2``
* ``bn copy``, ``bn recalibrate``: the constant schedule with that ``--model-ema-bn``
* ``switch``: the constant schedule with ``--model-ema-switch`` (the first EMA, 0.9)

For each variant and seed it reads summary.csv and prints, as the median over the seeds, the
final and the best top-1 of the raw weights and of each EMA side by side (a markdown table).
Runs go through train.py's ``main`` in this process, one after another (no interpreter start per
run), into a temporary folder.

    python benchmarks/bench_schedules.py [--seeds 3] [--epochs 4] [--threads 2] [--data DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

DECAYS = ["0.9", "0.98", "0.995"]
SIGMA_RELS = ["0.05", "0.1", "0.2"]
VARIANTS = {
    "constant": ["--model-ema-decay", *DECAYS],
    "timm": ["--model-ema-decay", *DECAYS, "--model-ema-schedule", "timm"],
    "debias": ["--model-ema-decay", *DECAYS, "--model-ema-schedule", "debias"],
    "power": ["--model-ema-schedule", "power", "--model-ema-sigma-rel", *SIGMA_RELS],
    "bn copy": ["--model-ema-decay", *DECAYS, "--model-ema-bn", "copy"],
    "bn recalibrate": ["--model-ema-decay", *DECAYS, "--model-ema-bn", "recalibrate",
                       "--model-ema-bn-batches", "10"],
    "switch": ["--model-ema-decay", *DECAYS, "--model-ema-switch"],
}
COMMON = ["--model", "test_resnet", "--img-size", "16", "-b", "32", "-j", "0", "--lr", "0.1",
          "--sched", "cosine", "--warmup-epochs", "0", "--hflip", "0", "--color-jitter", "0",
          "--scale", "0.7", "1.0", "--log-interval", "1000", "--checkpoint-hist", "1"]


def top1_columns(header: list[str]) -> list[str]:
    """raw first (timm's eval_top1), then each EMA's in order."""
    return ["eval_top1"] + [c for c in header if c.endswith("_eval_top1") and c != "eval_top1"]


def one_run(data: Path, out: Path, variant: str, seed: int, epochs: int) -> list[tuple]:
    """(final, best) top-1 of raw and each EMA for one run."""
    from ematrain.cli import train
    argv = [str(data), *COMMON, *VARIANTS[variant], "--epochs", str(epochs), "--seed", str(seed),
            "--output", str(out), "--experiment", f"{variant.replace(' ', '-')}-{seed}"]
    with contextlib.redirect_stdout(sys.stderr):  # the epoch lines; stdout is the table
        rc = train.main(argv)
    if rc != 0:
        raise SystemExit(f"{variant} seed {seed}: train.py exited {rc}")
    with open(out / argv[-1] / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cols = top1_columns(list(rows[0]))
    return [(float(rows[-1][c]), max(float(r[c]) for r in rows)) for c in cols]


def table(results: dict[str, list[list[tuple]]], seeds: int) -> str:
    lines = ["| variant | EMAs | raw final / best | EMA 1 final / best | EMA 2 final / best | "
             "EMA 3 final / best |", "|---|---|---|---|---|---|"]
    for variant, runs in results.items():
        cells = []
        for k in range(len(runs[0])):
            final = statistics.median(run[k][0] for run in runs)
            best = statistics.median(run[k][1] for run in runs)
            cells.append(f"{final:.1f} / {best:.1f}")
        emas = ("sigma_rel " + " ".join(SIGMA_RELS) if variant == "power"
                else "decay " + " ".join(DECAYS))
        lines.append(f"| {variant} | {emas} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label-noise", type=float, default=0.3)
    parser.add_argument("--data", default="", help="digits tree to write or reuse "
                        "(default: data/digits-noisy<pct> in the repository)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from ematrain.data.digits import write_digits_imagefolder
    torch.set_num_threads(args.threads)
    data = Path(args.data or REPO / "data" / f"digits-noisy{round(100 * args.label_noise)}")
    write_digits_imagefolder(data, seed=0, label_noise=args.label_noise)
    results, start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            results[variant] = [one_run(data, Path(tmp), variant, seed, args.epochs)
                                for seed in range(args.seeds)]
            print(f"# {variant} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)
    print(f"digits, {100 * args.label_noise:.0f}% of training labels flipped; test_resnet, 16 px, "
          f"batch 32, {args.epochs} epochs, lr 0.1 cosine; median over seeds 0..{args.seeds - 1}"
          f" of the top-1 at the last epoch / at the best epoch")
    print()
    print(table(results, args.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
