"""`make gpu-check`: what only a GPU can show, in one script of at most about five minutes.

1. The CUDA tests of the suite (they skip on a machine without CUDA).
2. No host synchronization: N default training steps with an EMA (`engine.train_step` with the
   EMA update, and the same with the shadows in host memory) under
   ``torch.cuda.set_sync_debug_mode("error")``, which turns any synchronizing call into an error.
3. A one-epoch run on generated 224 px data with resnet34, ``--model-ema --amp --channels-last``,
   with and without ``--model-ema-force-cpu``: peak device memory and median step time of each.
4. The CUDA rows of benchmarks/bench_ema.py.

    python benchmarks/gpu_check.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def section(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run_cuda_tests() -> bool:
    section("CUDA tests (pytest -k cuda)")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", str(ROOT / "tests"),
                        "-p", "no:cacheprovider"], cwd=ROOT)
    return r.returncode == 0


def no_sync_steps(steps: int) -> bool:
    """train_step + EMA update, `steps` times, with every synchronizing call an error."""
    import timm

    from ematrain.ema import ModelEma
    from ematrain.run.step import Recipe, train_step
    section(f"no host sync in {steps} training steps with an EMA")
    ok = True
    for where in ("cuda", "cpu"):
        model = timm.create_model("resnet34", num_classes=10).cuda().to(
            memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        ema = ModelEma(model, [0.99, 0.999], device=where)
        recipe = Recipe(torch.nn.CrossEntropyLoss(), autocast=torch.bfloat16)
        images = torch.randn(32, 3, 224, 224, device="cuda").contiguous(
            memory_format=torch.channels_last)
        targets = torch.randint(0, 10, (32,), device="cuda")
        train_step(model, optimizer, images, targets, recipe, ema)  # warm-up: plans, kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                train_step(model, optimizer, images, targets, recipe, ema)
            print(f"  shadows on {where}: {steps} steps, no synchronization")
        except RuntimeError as exc:
            ok = False
            print(f"  shadows on {where}: FAILED: {str(exc).splitlines()[0]}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ema.wait()
        print(f"  shadows finite: {ema.nonfinite_shadows() == []}")
    return ok


def one_epoch_runs(images_per_class: int) -> bool:
    """resnet34 at 224 px with EMA, AMP and channels_last, shadows on the GPU and in host memory."""
    from conftest import make_imagefolder
    section("one epoch, resnet34 224 px, --model-ema --amp --channels-last")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        data = make_imagefolder(Path(tmp) / "data", num_classes=10,
                                train_per_class=images_per_class, val_per_class=8, size=224)
        for extra in ([], ["--model-ema-force-cpu"]):
            ok &= _timed_run(data, Path(tmp) / ("cpu" if extra else "gpu"), extra)
    return ok


def _timed_run(data: Path, out: Path, extra: list[str]) -> bool:
    script = ("import sys, time, torch\n"
              f"sys.path.insert(0, {str(ROOT / 'src')!r})\n"
              "from ematrain.cli import train\n"
              "from ematrain.run import loop\n"
              "times, real = [], loop.train_step\n"
              "def timed(*a, **k):\n"
              "    torch.cuda.synchronize(); t = time.perf_counter(); r = real(*a, **k)\n"
              "    torch.cuda.synchronize(); times.append(time.perf_counter() - t); return r\n"
              "loop.train_step = timed\n"
              "rc = train.main(sys.argv[1:])\n"
              "times = sorted(times[3:]) or [float('nan')]\n"
              "print(f'RESULT peak_mem_gib={torch.cuda.max_memory_allocated() / 2**30:.2f} '\n"
              "      f'median_step_ms={1e3 * times[len(times) // 2]:.1f} rc={rc}')\n")
    args = [str(data), "--model", "resnet34", "-b", "32", "-j", "4", "--epochs", "1",
            "--warmup-epochs", "0", "--lr", "0.01", "--model-ema", "--amp", "--channels-last",
            "--output", str(out), "--log-interval", "10", *extra]
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    result = [line for line in r.stdout.splitlines() if line.startswith("RESULT")]
    label = "shadows in host memory" if extra else "shadows on the GPU   "
    print(f"  {label}: {result[0][7:] if result else 'no result'}")
    if r.returncode != 0 or not result or "rc=0" not in result[0]:
        print(r.stderr[-3000:])
        return False
    return True


def ema_bench(repeats: int) -> bool:
    section("bench_ema, CUDA rows")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ema.py"), "--device",
                        "cuda", "--repeats", str(repeats)])
    return r.returncode == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, images and repeats")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__}, "
          f"CUDA {torch.version.cuda})")
    started = time.time()
    results = {
        "cuda tests": run_cuda_tests(),
        "no host sync": no_sync_steps(10 if args.quick else 50),
        "one-epoch runs": one_epoch_runs(16 if args.quick else 64),
        "bench_ema": ema_bench(10 if args.quick else 25),
    }
    section(f"summary ({time.time() - started:.0f} s)")
    for name, ok in results.items():
        print(f"  {name}: {'ok' if ok else 'FAILED'}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
