"""Start-up and optimizer-step times the README quotes, measured on the machine it runs on.

    .venv/bin/python benchmarks/bench_startup.py [--timm-train path/to/timm/train.py] [--rounds 5]

* start-up: wall time of a whole ``train.py --help`` process (import, parse, print), ours and
  (with --timm-train) timm's, in interleaved rounds; and of importing ours with Python's
  collector paused, as the commands do (`ematrain.cli.collector_paused`), against not paused.
* SGD step: one fused (``fused=True``) against one per-tensor (torch's CPU default) SGD step
  with momentum on resnet18's parameters, after a backward pass at 32 px, batch 32.

Medians over the rounds, [min-max]. They depend on the machine (CPU, disk cache, other load):
compare the two sides of one run, not numbers from different machines.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name, load_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMPORT = ("import time, sys; t = time.perf_counter(); {pause}import ematrain.cli.train; "
          "print(time.perf_counter() - t)")


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - start


def _seconds(cmd: list[str]) -> float:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return float(out.split()[-1])


def _show(name: str, values: list[float], unit: str = "s", scale: float = 1.0) -> None:
    values = [v * scale for v in values]
    print(f"{name:<34} {statistics.median(values):7.3g} {unit} "
          f"[{min(values):.3g}-{max(values):.3g}]")


def startup(rounds: int, timm_train: str | None) -> None:
    python = [sys.executable]
    paused = IMPORT.format(pause="from ematrain.cli import collector_paused; "
                                 "c = collector_paused(); c.__enter__(); ")
    jobs = {"ours: train.py --help": python + [str(REPO / "train.py"), "--help"]}
    if timm_train:
        jobs["timm: train.py --help"] = python + [timm_train, "--help"]
    imports = {"import, collector paused": python + ["-c", paused],
               "import, collector on": python + ["-c", IMPORT.format(pause="")]}
    times = {name: [] for name in [*jobs, *imports]}
    for _ in range(rounds):
        for name, cmd in jobs.items():
            times[name].append(_wall(cmd))
        for name, cmd in imports.items():
            times[name].append(_seconds(cmd))
    for name, values in times.items():
        _show(name, values)


def sgd_step(rounds: int) -> None:
    import timm
    import torch
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for fused in (True, False):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-5,
                              fused=fused, foreach=False if not fused else None)
        opt.step()  # momentum buffers exist from here on
        steps = []
        for _ in range(rounds * 4):
            start = time.perf_counter()
            opt.step()
            steps.append(time.perf_counter() - start)
        _show(f"SGD step, {'fused' if fused else 'per-tensor (torch CPU default)'}", steps,
              "ms", 1e3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timm-train", default=None, help="timm's train.py (not in its pip package)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print(f"cpu      : {cpu_name()}")
    load = load_line()
    if load:
        print(load)
    startup(args.rounds, args.timm_train)
    sgd_step(args.rounds)


if __name__ == "__main__":
    main()
