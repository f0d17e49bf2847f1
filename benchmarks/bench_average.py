"""Checkpoint averaging (timm's avg_checkpoints.py, ``export --average-best K``) against post-hoc
EMA and the run's own EMA, on digits with noisy labels.

The data is the demo's: scikit-learn's digits with 30% of the training labels moved to another
class (validation labels true). Each seed trains one run with a regular EMA
(``--model-ema-decay 0.98``), post-hoc EMA (``--model-ema-posthoc``: sigma_rel 0.05 0.10
tracked) and ten history checkpoints; then ``validate.py --posthoc`` sweeps its default lengths,
and ``export --average-best K`` averages the raw weights, and the EMA's, of the K best epochs,
each scored by validate.py. All of them pick by the validation split (the best epoch, the best
length, the best checkpoints), so every number is optimistic in the same way.

    python benchmarks/bench_average.py [--seeds 3] [--epochs 10] [--threads 2] [--k 3 5]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

COMMON = ["--model", "test_resnet", "--img-size", "16", "-b", "32", "-j", "0", "--lr", "0.1",
          "--sched", "cosine", "--warmup-epochs", "0", "--hflip", "0", "--color-jitter", "0",
          "--scale", "0.7", "1.0", "--log-interval", "1000", "--checkpoint-hist", "10",
          "--model-ema-decay", "0.98", "--model-ema-posthoc"]
BARE = ["--model", "test_resnet", "--img-size", "16", "-b", "32", "-j", "0"]


def quietly(main, argv: list[str]) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # their lines; stdout is the table
        rc = main([str(a) for a in argv])
    if rc != 0:
        raise SystemExit(f"{argv[:3]}...: exited {rc}")


def scored(data: Path, weights: Path, out: Path) -> float:
    """validate.py's top-1 of an exported weights file."""
    from ematrain.cli import validate
    results = out / f"{weights.stem}.json"
    quietly(validate.main, [data, "--checkpoint", weights, *BARE, "--results-file", results])
    return json.loads(results.read_text())["top1"]


def one_seed(data: Path, out: Path, seed: int, epochs: int, ks: list[int]) -> dict[str, float]:
    from ematrain.cli import train, validate
    from ematrain.cli.export import main as export
    run = out / f"seed{seed}"
    quietly(train.main, [data, *COMMON, "--epochs", epochs, "--seed", seed, "--output", out,
                         "--experiment", run.name])
    with open(run / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {"raw, last epoch": float(rows[-1]["raw_eval_top1"]),
           "raw, best epoch": max(float(r["raw_eval_top1"]) for r in rows),
           "EMA 0.98, best epoch": max(float(r["eval_top1"]) for r in rows)}
    quietly(validate.main, [data, "--posthoc", run, "-j", "0"])
    posthoc = run / "posthoc.csv"
    with open(posthoc, newline="") as f:
        swept = [r for r in csv.DictReader(f) if r["kind"] in ("power", "exp")]
    got["post-hoc EMA, best length"] = max(float(r["top1"]) for r in swept)
    for k in ks:
        for weights, label in (("raw", "raw"), ("ema", "EMA 0.98")):
            file = out / f"{run.name}-{weights}-avg{k}.safetensors"
            quietly(export, [run, "--weights", weights, "--average-best", k, "--output", file])
            got[f"average of the {k} best epochs, {label}"] = scored(data, file, out)
    return got


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--label-noise", type=float, default=0.3)
    parser.add_argument("--data", default="", help="digits tree to write or reuse "
                        "(default: data/digits-noisy<pct> in the repository)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from ematrain.data.digits import write_digits_imagefolder
    torch.set_num_threads(args.threads)
    data = Path(args.data or REPO / "data" / f"digits-noisy{round(100 * args.label_noise)}")
    write_digits_imagefolder(data, seed=0, label_noise=args.label_noise)
    runs, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            runs.append(one_seed(data, Path(tmp), seed, args.epochs, args.k))
            print(f"# seed {seed} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)
    print(f"digits, {100 * args.label_noise:.0f}% of training labels flipped; test_resnet, 16 px, "
          f"batch 32, {args.epochs} epochs, lr 0.1 cosine; top-1 on the validation split, median "
          f"(min-max) over seeds 0..{args.seeds - 1}")
    print()
    print("| weights | top-1 |")
    print("|---|---|")
    for name in runs[0]:
        values = [r[name] for r in runs]
        print(f"| {name} | {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
