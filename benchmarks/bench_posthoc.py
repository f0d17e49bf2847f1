"""Benchmark post-hoc EMA: is the best reconstructed EMA at least as good as the best of three
decays a user picks in advance, and what does it cost?

Data: scikit-learn's digits written as a 32 px ImageFolder tree (``demo_data``), with a fixed
fraction of the training images moved to a wrong class folder (``--noise``, default 30%; the
same flips for every seed; validation labels stay clean). For each seed, one training run keeps
the raw weights, three regular EMAs chosen in advance (``--model-ema-decay 0.99 0.999 0.9999``)
and the post-hoc power EMAs (``--model-ema-posthoc``, default profiles, interval and dtype), then
``validate.py --posthoc --select-fraction 0.5 --select-seed SEED`` reconstructs the default sweep
and chooses on a stratified half of the validation split. Reported, median (min-max) over the
seeds, on the other half (the report half, which took no part in any choice):

* top-1 of the raw weights, of each regular EMA, of the tracked power EMAs (last snapshot), of
  the best of the decays chosen in advance (chosen on the selection half, as post-hoc chooses)
  and of the post-hoc pick; and for contrast the pick's optimistic figure on the half that chose
  it; per seed, whether the pick beats the best decay chosen the same way;
* cost: wall time of the training run with and without ``--model-ema-posthoc`` (interleaved,
  for the first seed, ``--pairs``), the time a snapshot holds the training loop (host copy and
  hand-over to the writer, measured in-process around ``Run.take_snapshot``), disk per run, and
  the wall time of ``validate.py --posthoc`` as a whole process.

``--cost`` instead times the sweep against reading the series once plus one validation pass per
weight set, and measures its peak memory for resnet50 (``posthoc_cost.py``).

``--fit`` instead prints the arithmetic behind the defaults (no training, a few seconds), as
README.md quotes it between its marker lines: the fit error of the default sweep for 8 to 128
snapshots per run and the weight error that float32, float16 and bfloat16 snapshots add to
reconstructions of a drifting random walk's power EMAs.

    python benchmarks/bench_posthoc.py [--seeds 0 1 2] [--epochs 12] [--noise 0.3] [--fit] [--cost]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

DECAYS = ["0.99", "0.999", "0.9999"]


def noisy_digits(root: Path, noise: float) -> Path:
    """The digits tree with `noise` of each training class moved to another class (seed 0)."""
    from ematrain.data.digits import write_digits_imagefolder
    clean = write_digits_imagefolder(root / "clean")
    out = root / f"noisy{noise:g}"
    if out.exists():
        return out
    shutil.copytree(clean, out)
    rng = np.random.default_rng(0)
    classes = sorted(p.name for p in (out / "train").iterdir() if p.is_dir())
    for cls in classes:
        files = sorted((out / "train" / cls).iterdir())
        for f in rng.permutation(files)[: int(round(noise * len(files)))]:
            wrong = rng.choice([c for c in classes if c != cls])
            f.rename(out / "train" / wrong / f"flipped-{cls}-{f.name}")
    return out


def common(args, seed: int) -> list[str]:
    return ["--model", args.model, "--img-size", "32", "-b", str(args.batch), "-j", "2", "--epochs",
            str(args.epochs), "--warmup-epochs", "1", "--lr", "0.05", "--weight-decay", "5e-4",
            "--hflip", "0", "--color-jitter", "0", "--scale", "0.7", "1.0", "--seed", str(seed),
            "--checkpoint-hist", "1", "--log-interval", "1000", "--device", "cpu"]


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return wall, r.stdout + r.stderr


def train_timed(args, data: Path, out: Path, seed: int, env: dict, posthoc: bool) -> float:
    """The training run in this process's child, with the snapshot hold time measured inside."""
    flags = [str(data), *common(args, seed), "--model-ema-decay", *args.decays, "--output", str(out),
             "--experiment", "run"]
    if posthoc:
        flags.append("--model-ema-posthoc")
    wall, text = run([__file__, "--train-child", *flags], env)
    holds = [float(line.split()[1]) for line in text.splitlines() if line.startswith("HOLD ")]
    if posthoc:  # beside the run folder, which is kept (copied) after a post-hoc run
        (out / "run" / "holds.txt").write_text("\n".join(map(str, holds)))
    return wall


def train_child(argv: list[str]) -> int:
    """train.py's main with `Run.take_snapshot` timed: what a snapshot costs the training loop."""
    from ematrain.cli import train
    from ematrain.run import parts

    original = parts.Run.take_snapshot

    def timed(self):
        start = time.perf_counter()
        due = self.snapshots is not None and self.snapshots.due(self.counters.num_updates)
        original(self)
        if due:
            print(f"HOLD {time.perf_counter() - start:.6f}", flush=True)
    parts.Run.take_snapshot = timed
    return train.main(argv)


def results_rows(csv_path: Path):
    import csv
    with open(csv_path) as f:
        yield from csv.DictReader(f)


def seed_scores(csv_path: Path) -> tuple[dict[str, float], str]:
    """One seed's figures on the report half (posthoc.csv's report rows), the best of the
    decays chosen on the selection half as post-hoc chooses (top-1, ties to the lower loss),
    and the pick's optimistic selection-half figure for contrast; and the pick's name."""
    rows = list(results_rows(csv_path))
    select = [r for r in rows if r["part"] == "selection"]
    report = {r["weights"]: r for r in rows if r["part"] == "report"}
    scores = {}
    for name, r in report.items():
        if r["kind"] in ("raw", "ema", "tracked"):
            scores[name.replace("tracked", "power EMA") + (" (tracked)" if r["kind"] == "tracked"
                                                          else "")] = float(r["top1"])
    decays = [r for r in select if r["kind"] == "ema"]
    best_decay = min(decays, key=lambda r: (-float(r["top1"]), float(r["loss"])))
    pick = next(r for r in select if r["chosen"] == "1")
    scores["best decay, chosen on the selection half"] = float(report[best_decay["weights"]]["top1"])
    scores["post-hoc pick, chosen on the selection half"] = float(report[pick["weights"]]["top1"])
    scores["(post-hoc pick on the selection half itself)"] = float(pick["top1"])
    return scores, pick["weights"]


def bench(args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO / "src"))
    work = Path(tempfile.mkdtemp(prefix="bench_posthoc."))
    data = noisy_digits(Path(args.data), args.noise)
    table: dict[str, list[float]] = {}
    costs: dict[str, list[float]] = {"train s (posthoc)": [], "train s (none)": [],
                                     "snapshot hold ms": [], "disk MB": [], "sweep s": []}
    picks = []
    for seed in args.seeds:
        out = work / f"seed{seed}"
        order = [True]
        if seed == args.seeds[0] and args.pairs:  # timed pairs, alternating which goes first
            order = [x for i in range(args.pairs) for x in ((True, False) if i % 2 == 0
                                                             else (False, True))]
        for posthoc in order:
            shutil.rmtree(out, ignore_errors=True)
            wall = train_timed(args, data, out, seed, env, posthoc)
            costs["train s (posthoc)" if posthoc else "train s (none)"].append(wall)
            if posthoc:
                run_dir = out / "run"
                keep = work / f"keep{seed}"
                shutil.rmtree(keep, ignore_errors=True)
                shutil.copytree(run_dir, keep)
        run_dir = work / f"keep{seed}"
        costs["snapshot hold ms"] += [1e3 * float(x) for x in
                                     (run_dir / "holds.txt").read_text().split()] \
            if (run_dir / "holds.txt").exists() else []
        costs["disk MB"].append(sum(p.stat().st_size for p in (run_dir / "posthoc").iterdir()) / 1e6)
        wall, _ = run([str(REPO / "validate.py"), str(data), "--posthoc", str(run_dir), "-j", "2",
                       "--select-fraction", "0.5", "--select-seed", str(seed)], env)
        costs["sweep s"].append(wall)
        scores, pick = seed_scores(run_dir / "posthoc.csv")
        picks.append(pick)
        for k, v in scores.items():
            table.setdefault(k, []).append(v)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) +
              f" | pick: {pick}", flush=True)
    report_table(args, table, picks)
    print("\n| cost | median (min-max) |\n|---|---|")
    for k, v in costs.items():
        if v:
            print(f"| {k} | {statistics.median(v):.3g} ({min(v):.3g}-{max(v):.3g}) |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


def report_table(args, table: dict[str, list[float]], picks: list[str]) -> None:
    print(f"\n{args.model}, digits 32 px, {args.noise:.0%} of the training labels flipped, "
          f"{args.epochs} epochs, batch {args.batch}, decays {' '.join(args.decays)}, seeds "
          f"{' '.join(map(str, args.seeds))}; top-1 on the report half of the validation split "
          f"(--select-fraction 0.5 --select-seed SEED), median (min-max)\n")
    print("| weights | top-1 |\n|---|---|")
    for k, v in table.items():
        print(f"| {k} | {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f}) |")
    pick = table["post-hoc pick, chosen on the selection half"]
    decay = table["best decay, chosen on the selection half"]
    wins = sum(p > d for p, d in zip(pick, decay))
    ties = sum(p == d for p, d in zip(pick, decay))
    print(f"\nper seed, post-hoc pick against the best decay (both chosen on the selection "
          f"half, scored on the report half): {wins} better, {ties} equal, "
          f"{len(pick) - wins - ties} worse; picks: {', '.join(picks)}")


# The series --fit measures: the default tracked profiles, snapshots evenly spaced.
FIT_TRACKED = (0.05, 0.10)
FIT_UPDATES = 3200
FIT_COUNTS = (8, 16, 32, 64, 128)
DTYPE_UPDATES, DTYPE_SIZE, DTYPE_COUNTS = 3200, 4000, (32, 64)
DTYPE_TARGETS = (0.0125, 0.0243, 0.05, 0.0921, 0.179)
# README.md holds the --fit output between these lines (tests/test_readme_figures.py checks it).
BLOCK_BEGIN = "<!-- bench_posthoc --fit: begin -->"
BLOCK_END = "<!-- bench_posthoc --fit: end -->"


def even_times(updates: int, count: int) -> list[int]:
    return [round(updates * (i + 1) / count) for i in range(count)]


def fit_rows(updates: int = FIT_UPDATES, counts=FIT_COUNTS):
    """(sweep, [(count, fit errors, max sum |c|)]): the default sweep's fit per snapshot count."""
    from ematrain.ema.schedules import sigma_rel_to_gamma as gamma
    from ematrain.posthoc import Profile, solve
    from ematrain.posthoc.sweep import default_sigma_rels
    sweep = default_sigma_rels(FIT_TRACKED)
    rows = []
    for count in counts:
        profiles = [Profile("power", gamma(s), t) for t in even_times(updates, count)
                    for s in FIT_TRACKED]
        sol = solve(profiles, [Profile("power", gamma(s), updates) for s in sweep])
        rows.append((count, sol.fit_errors, max(sol.gain(i) for i in range(len(sweep)))))
    return sweep, rows


def fit_table() -> list[str]:
    """The fit error of the default sweep against the snapshot count (pure arithmetic)."""
    sweep, rows = fit_rows()
    lines = [(f"Fit error (%, relative L2 of the profile) of the default sweep (sigma_rel), "
              f"tracked {' '.join(f'{s:.2f}' for s in FIT_TRACKED)}, {FIT_UPDATES} updates; gain "
              f"= the largest sum of |c| (by how much snapshot rounding can grow):"), "",
             "| snapshots | " + " | ".join(f"{s:g}" for s in sweep) + " | gain |",
             "|---|" + "---|" * (len(sweep) + 1)]
    for count, errors, gain in rows:
        lines.append(f"| {count} | " + " | ".join(f"{100 * e:.2g}" for e in errors)
                     + f" | {gain:.0f} |")
    return lines


def power_emas(thetas: np.ndarray, sigma_rels, at) -> dict[int, np.ndarray]:
    """float64 power EMAs of `thetas`, step by step: {t: array (profiles x size)} at steps `at`."""
    from ematrain.ema.schedules import sigma_rel_to_gamma as gamma
    gammas = np.array([gamma(s) for s in sigma_rels])[:, None]
    ema, out = np.repeat(thetas[:1], len(gammas), axis=0), {}
    for t in range(1, len(thetas)):
        beta = (1.0 - 1.0 / t) ** (gammas + 1.0)
        ema = beta * ema + (1.0 - beta) * thetas[t]
        if t in at:
            out[t] = ema.copy()
    return out


def drifting_walk(updates: int = DTYPE_UPDATES, size: int = DTYPE_SIZE) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.cumsum(rng.normal(scale=0.3, size=(updates + 1, size))
                     + 0.05 * rng.normal(size=size), axis=0)


def dtype_errors(walk: np.ndarray, count: int, dtypes) -> dict:
    """{dtype: relative weight error at each DTYPE_TARGETS}: power EMAs of a drifting random walk,
    snapshotted in each dtype, reconstructed in float64 as `snapshots.synthesize` does (in
    float32 for all but float64 snapshots), against the reconstruction from float64 snapshots
    (so the fit error itself cancels out)."""
    import torch

    from ematrain.ema.schedules import sigma_rel_to_gamma as gamma
    from ematrain.posthoc import Profile, solve
    updates = len(walk) - 1
    times = list(range(updates // count, updates + 1, updates // count))
    emas = power_emas(walk, FIT_TRACKED, set(times))
    stack = torch.from_numpy(np.concatenate([emas[t] for t in times]))  # snapshot-major
    profiles = [Profile("power", gamma(s), t) for t in times for s in FIT_TRACKED]
    coef = torch.from_numpy(solve(profiles, [Profile("power", gamma(s), times[-1])
                                             for s in DTYPE_TARGETS]).coefficients)
    want = coef @ stack
    out = {}
    for dt in dtypes:
        got = (coef @ stack.to(dt).double()).to(torch.promote_types(dt, torch.float32)).double()
        out[dt] = ((got - want).norm(dim=1) / want.norm(dim=1)).tolist()
    return out


def dtype_table() -> list[str]:
    import torch
    lines = [(f"Relative weight error the snapshot dtype adds (against float64 snapshots) at "
              f"sigma_rel {' '.join(map(str, DTYPE_TARGETS))}:"), "",
             "| snapshots | dtype | " + " | ".join(map(str, DTYPE_TARGETS)) + " |",
             "|---|---|" + "---|" * len(DTYPE_TARGETS)]
    walk = drifting_walk()
    for count in DTYPE_COUNTS:
        for dt, errors in dtype_errors(walk, count, (torch.float32, torch.float16,
                                                     torch.bfloat16)).items():
            lines.append(f"| {count} | {str(dt).removeprefix('torch.')} | "
                         + " | ".join(f"{e:.1e}" for e in errors) + " |")
    return lines


def fit_block() -> str:
    """What --fit prints, as README.md quotes it."""
    return "\n".join([BLOCK_BEGIN, *fit_table(), "", *dtype_table(), BLOCK_END])


# ----------------------------------------------------------------------------- --cost
def cost_run(args, env: dict, work: Path) -> tuple[Path, Path]:
    """A short run with the default post-hoc series (32 snapshots) to time the sweep on."""
    data = noisy_digits(Path(args.data), args.noise)
    out = work / "cost"
    flags = [str(data), *common(args, 0), "--model-ema-posthoc", "--output", str(out),
             "--experiment", "run"]
    flags[flags.index("--epochs") + 1] = str(args.cost_epochs)
    run([str(REPO / "train.py"), *flags], env)
    return data, out / "run"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--train-child":
        return train_child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--decays", nargs="+", default=DECAYS,
                   help="the regular EMAs chosen in advance (default: 0.99 0.999 0.9999)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=1,
                   help="timed training pairs (with/without post-hoc) on the first seed")
    p.add_argument("--data", default=str(REPO / "data" / "bench_posthoc"))
    p.add_argument("--fit", action="store_true", help="print the fit-error table and stop")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--cost", action="store_true",
                   help="time the sweep against reading the series once plus one validation "
                        "pass per weight set (interleaved rounds), and its peak memory for "
                        "resnet50; then stop")
    p.add_argument("--rounds", type=int, default=3, help="--cost: timed rounds")
    p.add_argument("--cost-epochs", type=int, default=2, help="--cost: epochs of its run")
    p.add_argument("--cost-run", default=None, metavar="RUN_DIR",
                   help="--cost: time this run's sweep (trained on --data's noisy digits) "
                        "instead of training one")
    p.add_argument("--memory-snapshots", type=int, default=4,
                   help="--cost: snapshots of the synthetic resnet50 series")
    args = p.parse_args()
    if args.fit:
        print(fit_block())
        return 0
    if args.cost:
        from posthoc_cost import cost  # benchmarks/ is on the path of a script run from it
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(REPO / "src"))
        given = (lambda work: (noisy_digits(Path(args.data), args.noise), Path(args.cost_run)))
        cost(args, env, given if args.cost_run else lambda work: cost_run(args, env, work), run)
        return 0
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
