"""Benchmark one EMA update against timm, torch.optim.swa_utils and the memory-bandwidth floor.

For each model (timm, random init, float32) this times one update of:

* ours:          ``ematrain.ema.ModelEma`` with one decay and default settings (what training runs:
  no per-update NaN/Inf check; the shadows are checked before validation and saves instead)
* ours-precheck: the same with ``skip_nonfinite=True`` (``--model-ema-precheck``): the model is
  checked before every update, and an update of non-finite weights skipped
* timm V2 / V3:  ``timm.utils.ModelEmaV2`` / ``ModelEmaV3`` ``.update(model)``
* AveragedModel: ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d),
  use_buffers=True).update_parameters(model)``
* floor:         one fused ``lerp_`` over two flat float32 tensors holding as many elements as the
  model has floating-point parameters and buffers (N). An update must read the model and the
  shadow and write the shadow, 12 bytes per element; this op moves exactly that with no per-tensor
  overhead, so it measures the machine's bandwidth for this access pattern: 12 * N / time.
* floor+read:    ``flat_model.sum()`` followed by the floor op. An update that must not touch the
  shadow when the model holds NaN/Inf has to read the whole model once before writing anything:
  16 bytes per element. This is the floor for ours-precheck.

and, for several decays, ours with ``[0.999, 0.9999, 0.99999]`` against ours with one decay (the
ideal ratio is 28 / 12 = 2.33: the model is read once, three shadows are read and written).

Measurements are interleaved: every round times each method once, in a rotated order, with the
caches flushed before each timing, so machine noise hits all methods alike. Reported times are
medians over rounds; ratios are medians of the per-round ratios. The flush also makes Python
objects and tensor metadata cold, which charges every method its per-tensor costs in full (a
model with a few hundred tensors pays a few microseconds each; the flat floor pays it once);
``--no-flush`` leaves only the other methods' own traffic in between, which is closer to what an
update meets right after an optimizer step has touched every parameter.

    python benchmarks/bench_ema.py [--models resnet34 resnet50 vit_small_patch16_224]
                                   [--repeats 25] [--device auto|cpu|cuda] [--threads N]
                                   [--no-flush] [--compare-ema path/to/other/ema.py]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from machine import cpu_name, load_line  # benchmarks/ is on the path of a script run from it
from timm.utils import ModelEmaV2, ModelEmaV3
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

try:
    from ematrain.ema import ModelEma
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from ematrain.ema import ModelEma

DECAY = 0.9999
DECAYS3 = [0.999, 0.9999, 0.99999]
TARGET_FLOOR = 1.25   # ours <= 1.25 x floor
TARGET_V3 = 0.80      # ours <= 0.80 x timm ModelEmaV3
TARGET_3DECAYS = 2.6  # 3 decays <= 2.6 x one decay


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet34", "resnet50", "vit_small_patch16_224"],
                   help="timm model names (space or comma separated)")
    p.add_argument("--repeats", type=int, default=25,
                   help="timed rounds per method after warm-up (median taken; at least 20 advised)")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates per method first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the CPU, and CUDA as well when available")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-flush", action="store_true",
                   help="do not flush the caches before each timing: only the other methods' own "
                        "traffic runs in between (less pessimistic for per-tensor costs)")
    p.add_argument("--compare-ema", type=Path, default=None, metavar="FILE",
                   help="another ema.py (e.g. an older version) to time alongside, as 'other'")
    args = p.parse_args(argv)
    args.models = [m for item in args.models for m in item.split(",") if m]
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def machine_info(devices) -> str:
    lines = [
        f"platform : {platform.platform()}",
        f"python   : {platform.python_version()}   torch {torch.__version__}   timm {timm.__version__}",
        f"cpu      : {platform.processor() or platform.machine()}, {os.cpu_count()} logical cpus, "
        f"torch threads {torch.get_num_threads()}",
    ]
    if cpu_name():
        lines[-1] += f", {cpu_name()}"
    if load_line():
        lines.append(load_line())
    if "cuda" in devices:
        lines.append(f"cuda     : {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    return "\n".join(lines)


def float_elements(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            total += t.numel()
    return total


class Timer:
    """Times callables on one device with the caches flushed first."""

    def __init__(self, device: torch.device, flush: bool = True):
        self.device = device
        # Larger than any last-level cache this runs on (CPU L3, GPU L2).
        self.flush = None
        if flush:
            self.flush = torch.empty(256 << 20 if device.type == "cuda" else 96 << 20,
                                     dtype=torch.uint8, device=device)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> float:
        if self.flush is not None:
            self.flush.add_(1)
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def load_other(path: Path):
    """ModelEma class from another copy of ema.py."""
    spec = importlib.util.spec_from_file_location("bench_other_ema", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module.ModelEma


def build_methods(model: torch.nn.Module, device: torch.device, other=None) -> dict:
    """name -> zero-argument callable doing one update."""
    n = float_elements(model)
    flat_ema = torch.randn(n, device=device)
    flat_model = torch.randn(n, device=device)
    weight = 1.0 - DECAY

    ours = ModelEma(model, DECAY, skip_nonfinite=False)
    ours_pre = ModelEma(model, DECAY, skip_nonfinite=True)
    ours3 = ModelEma(model, DECAYS3, skip_nonfinite=False)
    ours3_pre = ModelEma(model, DECAYS3, skip_nonfinite=True)
    v2 = ModelEmaV2(model, decay=DECAY)
    v3 = ModelEmaV3(model, decay=DECAY)
    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)

    def floor_read():
        flat_model.sum()
        flat_ema.lerp_(flat_model, weight)

    methods = {
        "floor": lambda: flat_ema.lerp_(flat_model, weight),
        "floor+read": floor_read,
        "ours": lambda: ours.update(model),
        "ours-precheck": lambda: ours_pre.update(model),
        "timm-V2": lambda: v2.update(model),
        "timm-V3": lambda: v3.update(model),
        "AveragedModel": lambda: avg.update_parameters(model),
        "ours-3decays": lambda: ours3.update(model),
        "ours-3decays-precheck": lambda: ours3_pre.update(model),
    }
    if other is not None:
        o0, o1 = other(model, DECAY, skip_nonfinite=False), other(model, DECAY, skip_nonfinite=True)
        o3 = other(model, DECAYS3, skip_nonfinite=False)
        methods.update({"other": lambda: o0.update(model), "other-precheck": lambda: o1.update(model),
                        "other-3decays": lambda: o3.update(model)})
    return methods


def run_model(name: str, device: torch.device, args, other=None) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(device)
    model.train()
    n = float_elements(model)
    methods = build_methods(model, device, other)
    names = list(methods)
    timer = Timer(device, flush=not args.no_flush)
    with torch.no_grad():
        for _ in range(args.warmup):
            for fn in methods.values():
                fn()
        times = {k: [] for k in names}
        for r in range(args.repeats):
            shift = r % len(names)
            for k in names[shift:] + names[:shift]:
                times[k].append(timer(methods[k]))
    del methods, model, timer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"name": name, "device": device.type, "n": n, "times": times}


def med(xs) -> float:
    return statistics.median(xs)


def ratio(res, a, b) -> float:
    """Median over rounds of time(a) / time(b)."""
    return med([x / y for x, y in zip(res["times"][a], res["times"][b])])


def report(results) -> bool:
    ok = True
    cols = ["floor", "floor+read", "ours", "ours-precheck", "timm-V2", "timm-V3", "AveragedModel"]
    print("\nOne update, one decay (ms, median; noise: 90th / 10th percentile of the floor's "
          "times, near 1 on a quiet machine)")
    head = f"{'model':24s} {'dev':4s} {'Mparams':>7s} " + " ".join(f"{c:>13s}" for c in cols)
    head += f" {'GB/s':>6s} {'ours/floor':>10s} {'ours/V3':>8s} {'pre/(fl+rd)':>11s}" \
            f" {'pre/V3':>7s} {'noise':>6s}"
    print(head)
    for res in results:
        t = {k: med(v) for k, v in res["times"].items()}
        gbs = 12 * res["n"] / t["floor"] / 1e9
        r_floor, r_v3 = ratio(res, "ours", "floor"), ratio(res, "ours", "timm-V3")
        line = f"{res['name']:24s} {res['device']:4s} {res['n'] / 1e6:7.2f} "
        line += " ".join(f"{t[c] * 1e3:13.3f}" for c in cols)
        line += f" {gbs:6.1f} {r_floor:10.3f} {r_v3:8.3f}"
        line += f" {ratio(res, 'ours-precheck', 'floor+read'):11.3f}"
        line += f" {ratio(res, 'ours-precheck', 'timm-V3'):7.3f}"
        floor_t = res["times"]["floor"]
        floor_q = statistics.quantiles(floor_t, n=10) if len(floor_t) > 1 else [1.0, 1.0]
        line += f" {floor_q[-1] / floor_q[0]:6.2f}"
        print(line)
        res["ok_floor"], res["ok_v3"] = r_floor <= TARGET_FLOOR, r_v3 <= TARGET_V3
    print("\nThree decays at once vs one decay (ms, median; ideal ratio 28/12 = 2.33)")
    print(f"{'model':24s} {'dev':4s} {'ours':>9s} {'ours-3':>9s} {'ratio':>7s}"
          f" {'precheck':>9s} {'pre-3':>9s} {'ratio':>7s}")
    for res in results:
        t = {k: med(v) for k, v in res["times"].items()}
        r3 = ratio(res, "ours-3decays", "ours")
        print(f"{res['name']:24s} {res['device']:4s} {t['ours'] * 1e3:9.3f}"
              f" {t['ours-3decays'] * 1e3:9.3f} {r3:7.3f} {t['ours-precheck'] * 1e3:9.3f}"
              f" {t['ours-3decays-precheck'] * 1e3:9.3f}"
              f" {ratio(res, 'ours-3decays-precheck', 'ours-precheck'):7.3f}")
        res["ok_3"] = r3 <= TARGET_3DECAYS
    if "other" in results[0]["times"]:
        print("\nours vs the --compare-ema version (ms, median; ratio = ours / other)")
        print(f"{'model':24s} {'dev':4s} {'other':>9s} {'ours':>9s} {'ratio':>7s} {'other-pre':>9s}"
              f" {'ours-pre':>9s} {'ratio':>7s} {'other-3':>9s} {'ours-3':>9s} {'ratio':>7s}")
        for res in results:
            t = {k: med(v) for k, v in res["times"].items()}
            line = f"{res['name']:24s} {res['device']:4s}"
            for o, u in [("other", "ours"), ("other-precheck", "ours-precheck"),
                         ("other-3decays", "ours-3decays")]:
                line += f" {t[o] * 1e3:9.3f} {t[u] * 1e3:9.3f} {ratio(res, u, o):7.3f}"
            print(line)
    print(f"\nTargets: ours <= {TARGET_FLOOR} x floor, ours <= {TARGET_V3} x timm V3, "
          f"3 decays <= {TARGET_3DECAYS} x 1 decay")
    for res in results:
        flags = [("floor", res["ok_floor"]), ("V3", res["ok_v3"]), ("3 decays", res["ok_3"])]
        print(f"  {res['name']:24s} {res['device']:4s} "
              + "  ".join(f"{k}: {'ok' if v else 'MISSED'}" for k, v in flags))
        ok &= all(v for _, v in flags)
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    print(machine_info(devices))
    print(f"decay {DECAY}, 3 decays {DECAYS3}, {args.warmup} warm-up + {args.repeats} timed rounds "
          f"per method, interleaved, caches {'not ' if args.no_flush else ''}flushed before each")
    other = load_other(args.compare_ema) if args.compare_ema else None
    if other is not None:
        print(f"also timing ModelEma from {args.compare_ema} as 'other'")
    results = []
    for dev in devices:
        for name in args.models:
            t0 = time.perf_counter()
            results.append(run_model(name, torch.device(dev), args, other))
            print(f"  {name} on {dev}: {time.perf_counter() - t0:.1f} s", flush=True)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
