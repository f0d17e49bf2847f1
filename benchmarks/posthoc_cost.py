"""bench_posthoc.py --cost: what validate.py --posthoc costs. Its wall time against the time to
read the series once plus one validate.py pass per weight set it scores (interleaved rounds, in
one process), and its peak memory for resnet50 (a synthetic series of its state dicts, swept in
a child process, RSS from the kernel). Run through ``benchmarks/bench_posthoc.py --cost``.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def quiet(main, argv: list[str]) -> int:
    """An entry point's main with its console output dropped (the rounds print their own)."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


def passes_scored(csv_path: Path) -> float:
    """K: the sweep's weight sets, each counted by the share of the split it was scored on
    (posthoc.csv's rows and their image counts)."""
    rows = list(results_rows(csv_path))
    total = sum(int(r["images"]) for r in rows if r["chosen"] == "1")
    return sum(int(r["images"]) for r in rows) / total


def results_rows(csv_path: Path):
    import csv
    with open(csv_path) as f:
        yield from csv.DictReader(f)


def sweep_ratio(args, data: Path, run_dir: Path) -> None:
    """Interleaved rounds, in this process: the sweep (validate.py --posthoc's main) against
    the time to read the series once plus one validate.py --checkpoint pass per weight set it
    scores (K: weight sets x the part of the split each pass covers)."""
    import torch

    from ematrain.checkpoint.files import safe_load
    from ematrain.cli import validate
    from ematrain.posthoc.series import read_series
    torch.set_num_threads(args.threads)
    series = read_series(run_dir)
    one = ["-j", "2"]
    modes = {"default": [], "--select-fraction 0.5": ["--select-fraction", "0.5"]}
    got: dict[str, list[float]] = {m: [] for m in modes}
    parts: dict[str, list[float]] = {"read s": [], "one pass s": []}
    for r in range(args.rounds):
        read = timed(lambda: [safe_load(s.path) for s in series.snapshots])
        one_pass = timed(lambda: quiet(validate.main, [str(data), "--checkpoint",
                                                       str(run_dir / "last.pth.tar"), *one]))
        parts["read s"].append(read)
        parts["one pass s"].append(one_pass)
        for mode, flags in (modes.items() if r % 2 == 0 else reversed(list(modes.items()))):
            start = time.perf_counter()
            rc = quiet(validate.main, [str(data), "--posthoc", str(run_dir), *one, *flags])
            wall = time.perf_counter() - start
            assert rc == 0, f"validate.py --posthoc {' '.join(flags)} failed"
            k = passes_scored(run_dir / "posthoc.csv")
            got[mode].append(wall / (read + k * one_pass))
            print(f"round {r}: read {read:.2f}s, one pass {one_pass:.2f}s, {mode} sweep "
                  f"{wall:.2f}s, ratio {got[mode][-1]:.2f} (K {k:g})", flush=True)
    print(f"\n{len(series.snapshots)} snapshots of {series.meta['arch']}, {args.rounds} rounds "
          f"(median, min-max):\n")
    print("| measure | median (min-max) |\n|---|---|")
    for k, v in parts.items():
        print(f"| {k} | {statistics.median(v):.3g} ({min(v):.3g}-{max(v):.3g}) |")
    for mode, v in got.items():
        print(f"| sweep / (read + K passes), {mode} | {statistics.median(v):.2f} "
              f"({min(v):.2f}-{max(v):.2f}) |")


MEMORY_CHILD = """
import resource, sys, time
sys.path.insert(0, {src!r})
import torch
torch.set_num_threads({threads})
from ematrain.cli import validate
from ematrain.posthoc import series as S
from ematrain.posthoc.sweep import sweep_plan
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
series, targets, solution = sweep_plan({run!r}, None, None)
base = rss()
formed = S.accumulate(series, solution)
after = rss()
del formed
peak_accumulate = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rc = validate.main([{data!r}, '--posthoc', {run!r}, '-j', '0', '-b', '64'])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print('MEM', base, peak_accumulate, peak, after, len(targets), rc)
"""


def memory_resnet50(args, env: dict, data: Path, run_dir: Path, work: Path, run) -> None:
    """Peak memory of the sweep for resnet50: a synthetic series of its state dicts (the
    record of the short run's snapshots, its weights replaced; `--memory-snapshots` of them)
    swept in a child process, RSS read from the kernel."""
    import timm
    import torch

    from ematrain.checkpoint.files import safe_load, write_file
    from ematrain.posthoc.snapshots import snapshot_files
    folder = work / "r50" / "posthoc"
    folder.mkdir(parents=True, exist_ok=True)
    files = snapshot_files(run_dir / "posthoc")
    picks = [files[round(i * (len(files) - 1) / (args.memory_snapshots - 1))]
             for i in range(args.memory_snapshots)]
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=10)
    params = sum(p.numel() for p in model.parameters())
    for _, path in picks:
        entry = safe_load(path)
        entry["arch"] = "resnet50"
        entry["args"] = {**entry["args"], "model": "resnet50"}
        entry["run_id"] = None
        entry["shadows"] = [{k: v.clone() + (0.01 * torch.randn_like(v) if v.is_floating_point()
                                             else 0) for k, v in model.state_dict().items()}
                            for _ in entry["shadows"]]
        write_file(folder / path.name, entry)
    code = MEMORY_CHILD.format(src=str(REPO / "src"), threads=args.threads, run=str(folder.parent),
                               data=str(data))
    _, text = run(["-c", code], env)
    base, peak_acc, peak, _after, targets, rc = (int(x) for x in next(
        line for line in text.splitlines() if line.startswith("MEM ")).split()[1:])
    gib = 2 ** 30
    print(f"\nresnet50 ({params / 1e6:.1f}M parameters), {len(picks)} snapshots of 2 power "
          f"EMAs, {targets} reconstructions (exit {rc}): RSS before the sweep's weights "
          f"{base / gib:.2f} GiB; peak while accumulating {peak_acc / gib:.2f} GiB "
          f"(float64 accumulators alone: {targets * params * 8 / gib:.2f} GiB); peak of the "
          f"whole sweep (reconstructions, {targets + 2} weight sets scored) {peak / gib:.2f} GiB")


def cost(args, env: dict, cost_run, run) -> None:
    """--cost: a short run (`cost_run(work)` trains it), the sweep's time ratio, then the
    resnet50 memory peak (`run(cmd, env)`: a child process, its output)."""
    work = Path(tempfile.mkdtemp(prefix="bench_posthoc_cost."))
    try:
        data, run_dir = cost_run(work)
        sweep_ratio(args, data, run_dir)
        memory_resnet50(args, env, data, run_dir, work, run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
