"""Benchmark post-hoc EMA: is the best reconstructed EMA at least as good as the best of three
decays a user picks in advance, and what does it cost?

Data: scikit-learn's digits written as a 32 px ImageFolder tree (``demo_data``), with a fixed
fraction of the training images moved to a wrong class folder (``--noise``, default 30%; the
same flips for every seed; validation labels stay clean). For each seed, one training run keeps
the raw weights, three regular EMAs chosen in advance (``--model-ema-decay 0.99 0.999 0.9999``)
and the post-hoc power EMAs (``--model-ema-posthoc``, default profiles, interval and dtype), then
``validate.py --posthoc`` reconstructs and scores the default sweep. Reported, median (min-max)
over the seeds, on the validation split at the end of training:

* top-1 of the raw weights, of each regular EMA, of the tracked power EMAs (last snapshot) and
  of the post-hoc best (picked on the same validation split: the sweep is a choice made on
  validation, as a user makes it), and whether post-hoc best >= the best regular EMA;
* cost: wall time of the training run with and without ``--model-ema-posthoc`` (interleaved,
  for the first seed), the time a snapshot holds the training loop (host copy and hand-over to
  the writer, measured in-process around ``Training.take_snapshot``), disk per run, and the wall
  time of ``validate.py --posthoc`` (reconstruction and one scoring pass for all weight sets).

``--fit`` instead prints the arithmetic behind the defaults: the fit error of the default sweep
for 8 to 128 snapshots per run and, for a real series, the weight error of reconstructing the
tracked profiles and a sweep target from float32, bfloat16 and float16 snapshots.

    python benchmarks/bench_posthoc.py [--seeds 0 1 2] [--epochs 12] [--noise 0.3] [--fit]
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
    from ematrain.demo_data import write_digits_imagefolder
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
    return ["--model", args.model, "--img-size", "32", "-b", "32", "-j", "2", "--epochs",
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
    flags = [str(data), *common(args, seed), "--model-ema-decay", *DECAYS, "--output", str(out),
             "--experiment", "run"]
    if posthoc:
        flags.append("--model-ema-posthoc")
    wall, text = run([__file__, "--train-child", *flags], env)
    holds = [float(line.split()[1]) for line in text.splitlines() if line.startswith("HOLD ")]
    if posthoc:  # beside the run folder, which is kept (copied) after a post-hoc run
        (out / "run" / "holds.txt").write_text("\n".join(map(str, holds)))
    return wall


def train_child(argv: list[str]) -> int:
    """train.main with Training.take_snapshot timed: what a snapshot costs the training loop."""
    from ematrain import train

    original = train.Training.take_snapshot

    def timed(self):
        start = time.perf_counter()
        due = self.run.posthoc is not None and self.run.posthoc.due(self.run.counters.num_updates)
        original(self)
        if due:
            print(f"HOLD {time.perf_counter() - start:.6f}", flush=True)
    train.Training.take_snapshot = timed
    return train.main(argv)


def results(csv_path: Path) -> dict[str, dict]:
    import csv
    with open(csv_path) as f:
        return {row["weights"]: row for row in csv.DictReader(f)}


def regular_scores(run_dir: Path) -> dict[str, float]:
    import csv
    with open(run_dir / "summary.csv") as f:
        last = list(csv.DictReader(f))[-1]
    out = {"raw": float(last["eval_top1"]), f"ema {DECAYS[0]}": float(last["ema_eval_top1"])}
    for d in DECAYS[1:]:
        out[f"ema {d}"] = float(last[f"ema{float(d):g}_eval_top1"])
    return out


def bench(args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO / "src"))
    work = Path(tempfile.mkdtemp(prefix="bench_posthoc."))
    data = noisy_digits(Path(args.data), args.noise)
    table: dict[str, list[float]] = {}
    costs: dict[str, list[float]] = {"train s (posthoc)": [], "train s (none)": [],
                                     "snapshot hold ms": [], "disk MB": [], "sweep s": []}
    for seed in args.seeds:
        out = work / f"seed{seed}"
        order = [True]
        if seed == args.seeds[0]:  # timed pairs, alternating which goes first
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
        wall, text = run([str(REPO / "validate.py"), str(data), "--posthoc", str(run_dir),
                          "-j", "2"], env)
        costs["sweep s"].append(wall)
        rows = results(run_dir / "posthoc.csv")
        scores = regular_scores(run_dir)
        for name, row in rows.items():
            if row["kind"] == "tracked":
                scores[f"power {name.split()[-1]} (tracked)"] = float(row["top1"])
        best = next(line for line in text.splitlines() if line.endswith("<- best"))
        scores["post-hoc best"] = float(rows[best.split("  ")[0].strip()]["top1"])
        for k, v in scores.items():
            table.setdefault(k, []).append(v)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) +
              f" | best: {best.split()[0]} {best.split()[1]}", flush=True)
    print(f"\n{args.model}, digits 32 px, {args.noise:.0%} of the training labels flipped, "
          f"{args.epochs} epochs, seeds {' '.join(map(str, args.seeds))} "
          f"(median, min-max)\n")
    print("| weights | top-1 |\n|---|---|")
    for k, v in table.items():
        print(f"| {k} | {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f}) |")
    regular = [statistics.median(table[f"ema {d}"]) for d in DECAYS]
    print(f"\npost-hoc best {statistics.median(table['post-hoc best']):.2f} vs best of the "
          f"decays chosen in advance {max(regular):.2f}: "
          f"{'met' if statistics.median(table['post-hoc best']) >= max(regular) else 'MISSED'}")
    per_seed = [p >= max(table[f'ema {d}'][i] for d in DECAYS)
                for i, p in enumerate(table["post-hoc best"])]
    print(f"per seed post-hoc best >= best regular EMA: {sum(per_seed)}/{len(per_seed)}")
    print("\n| cost | median (min-max) |\n|---|---|")
    for k, v in costs.items():
        if v:
            print(f"| {k} | {statistics.median(v):.3g} ({min(v):.3g}-{max(v):.3g}) |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


def fit_table() -> None:
    """The fit error of the default sweep against the snapshot count (pure arithmetic)."""
    from ematrain.ema_schedules import sigma_rel_to_gamma as gamma
    from ematrain.posthoc import Profile, solve
    from ematrain.posthoc_sweep import default_sigma_rels
    total = 10_000
    sweep = default_sigma_rels((0.05, 0.10))
    print(f"fit error (relative L2 of the profile) of the default sweep, tracked 0.05 0.10, "
          f"{total} updates; gain = sum |c| (how much snapshot rounding can grow)\n")
    print("| snapshots | " + " | ".join(f"{s:g}" for s in sweep) + " | max gain |")
    print("|---|" + "---|" * (len(sweep) + 1))
    for count in (8, 16, 32, 64, 128):
        times = [round(total * (i + 1) / count) for i in range(count)]
        profiles = [Profile("power", gamma(s), t) for t in times for s in (0.05, 0.10)]
        sol = solve(profiles, [Profile("power", gamma(s), total) for s in sweep])
        print(f"| {count} | " + " | ".join(f"{e:.3f}" for e in sol.fit_errors)
              + f" | {max(sol.gain(i) for i in range(len(sweep))):.0f} |")


def dtype_table(updates: int = 3200, size: int = 4000) -> None:
    """The weight error the snapshot dtype adds: power EMAs (ModelEma.power, float64) of a
    drifting random walk, snapshotted in each dtype, reconstructed, against the float64
    reconstruction from the same series (so the fit error itself cancels out)."""
    import torch

    from ematrain import checkpoint as ckpt_io
    from ematrain import snapshots as snaps
    from ematrain.ema import ModelEma
    from ematrain.ema_schedules import sigma_rel_to_gamma as gamma
    from ematrain.posthoc import Profile, solve

    rng = np.random.default_rng(1)
    walk = np.cumsum(rng.normal(scale=0.3, size=(updates + 1, size)) + 0.05 * rng.normal(
        size=size), axis=0)
    model = torch.nn.Linear(size, 1, bias=False).double()
    targets = (0.0125, 0.0243, 0.05, 0.0921, 0.179)
    meta = {k: None for k in snaps.META_KEYS}
    meta.update(every=1, steps_per_epoch=1, images_per_step=1)
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    print(f"\nrelative weight error the snapshot dtype adds (vs float64 snapshots), targets "
          f"sigma_rel {' '.join(map(str, targets))}\n")
    print("| snapshots | dtype | " + " | ".join(map(str, targets)) + " |")
    print("|---|---|" + "---|" * len(targets))
    for count in (32, 64):
        with tempfile.TemporaryDirectory() as tmp:
            folders = {dt: Path(tmp) / str(dt) for dt in dtypes}
            for folder in folders.values():
                folder.mkdir()
            with torch.no_grad():
                model.weight.copy_(torch.from_numpy(walk[0])[None])
            ema = ModelEma.power(model, [0.05, 0.10], dtype=torch.float64)
            for t in range(1, updates + 1):
                with torch.no_grad():
                    model.weight.copy_(torch.from_numpy(walk[t])[None])
                ema.update(model)
                if t % (updates // count) == 0:
                    shadows = [ema.shadow_state_dict(i) for i in range(2)]
                    for dt, folder in folders.items():
                        entry = snaps.snapshot_entry(shadows, [0.05, 0.1], ema.schedule.gammas,
                                                     t, t, dt, meta)
                        ckpt_io.write_file(folder / snaps.snapshot_name(t), entry)
            rebuilt = {}
            for dt, folder in folders.items():
                series = snaps.read_series(folder)
                sol = solve(series.profiles(),
                            [Profile("power", gamma(s), series.updates) for s in targets])
                rebuilt[dt] = [s["weight"].double() for s in snaps.synthesize(series, sol)[0]]
            for dt in dtypes[1:]:
                errors = [float((a - b).norm() / b.norm())
                          for a, b in zip(rebuilt[dt], rebuilt[torch.float64])]
                print(f"| {count} | {str(dt).removeprefix('torch.')} | "
                      + " | ".join(f"{e:.1e}" for e in errors) + " |")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--train-child":
        return train_child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=1,
                   help="timed training pairs (with/without post-hoc) on the first seed")
    p.add_argument("--data", default=str(REPO / "data" / "bench_posthoc"))
    p.add_argument("--fit", action="store_true", help="print the fit-error table and stop")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    if args.fit:
        fit_table()
        dtype_table()
        return 0
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
