"""Benchmark whole training runs: ematrain's train.py against timm's train.py and a bare PyTorch loop.

Every run is a whole process, timed from start to exit: interpreter start, imports, data scan,
model build, all epochs with a validation pass and a checkpoint each, and shutdown. For each run
this records the wall time and the CPU time (user + sys of the process and of the loader workers
it reaped, from ``os.wait4``). The variants:

* ours:         ``python <repo>/train.py DATA ...`` (ematrain)
* timm:         ``python <timm-train> --data-dir DATA --dataset '' --train-split train
                --val-split val ...`` (timm's own train.py, which is not in the pip package)
* bare:         ``python bench_train.py bare DATA ...``: the floor a CLI can reach, written below.
                timm.create_model, torchvision ImageFolder with transforms that cost what timm's
                cost (random-resized crop, flip, colour jitter for training; resize and centre
                crop for evaluation; to-tensor and normalise with the model's mean and std), a
                DataLoader with the same workers, SGD with Nesterov momentum (torch's fused
                kernel, as ours uses on the CPU), a cosine LR with warm-up set once per epoch,
                one validation pass per epoch and ``torch.save`` of the weights once per epoch.
                Its EMA is ``torch._foreach_lerp_`` over parameters and float buffers after each
                step (integer buffers copied), validated in the same pass over the validation
                data as the raw weights and saved with them.

each once without and once with an EMA (``--model-ema --model-ema-decay 0.99``). All get the same
flags: ``--model resnet18 -b 32 -j 2 --epochs 3 --opt sgd --lr 0.05 --sched cosine
--warmup-epochs 1 --checkpoint-hist 1 --device cpu --img-size 32 --num-classes <classes>``, the
same environment (``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` = ``--threads``) and each a fresh
``--output`` folder in a temporary directory. The data is scikit-learn's digits written as an
ImageFolder tree at 32 px (``ematrain.data.digits.write_digits_imagefolder``).

A round runs every variant once; the order alternates forwards and backwards from round to
round (A B C ... then ... C B A), so a slow drift of the machine hits both sides of a ratio alike.
The page cache cannot be flushed without root, so one untimed process that imports torch, timm
and torchvision and reads the data runs first, and interleaving does the rest. Each ratio is
computed per round (one pair per round) and reported as the median with the min-max over
rounds, for wall and CPU time, with its target met or MISSED:

* ours / timm                 <= 0.95, without and with EMA
* ours EMA / ours no-EMA      <= 1.10
* ours / bare                 <= 1.10, without and with EMA

Getting timm's train.py (keep it outside this repository), e.g. from a bare clone GITDIR:

    git --git-dir GITDIR show HEAD:train.py > /tmp/timm_train/train.py

When the newest one needs a newer timm than the installed one, take an older commit from
``git --git-dir GITDIR log --format=%H -- train.py``. ``--timm-git-dir GITDIR`` makes the
benchmark print which commit its copy of train.py comes from.

With ``--recipe naflex`` every run trains a small NaFlexVit on timm's NaFlex batches instead
(ours and timm's train.py only: the bare loop has no NaFlex batches).

    python benchmarks/bench_train.py [--pairs 4] [--epochs 3] [--timm-train PATH] [--recipe R]
                                     [--timm-git-dir GITDIR] [--data DIR] [--threads N]
                                     [--skip-timm] [--skip-bare] [--repo DIR] [--keep]
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name, load_line  # benchmarks/ is on the path of a script run from it

REPO = Path(__file__).resolve().parent.parent
EMA_DECAY = 0.99
TARGET_TIMM = 0.95   # ours <= 0.95 x timm's train.py
TARGET_EMA = 1.10    # ours with one EMA <= 1.10 x ours without
TARGET_BARE = 1.10   # ours <= 1.10 x the bare loop

# (label, numerator, denominator, target)
COMPARISONS = [
    ("ours / timm", "ours", "timm", TARGET_TIMM),
    ("ours / timm, EMA", "ours-ema", "timm-ema", TARGET_TIMM),
    ("ours EMA / ours no-EMA", "ours-ema", "ours", TARGET_EMA),
    ("ours / bare", "ours", "bare", TARGET_BARE),
    ("ours / bare, EMA", "ours-ema", "bare-ema", TARGET_BARE),
]


# ---------------------------------------------------------------------------------------------
# The bare loop (runs in its own process: ``bench_train.py bare DATA --output DIR ...``)
# ---------------------------------------------------------------------------------------------

def parse_bare_args(argv):
    p = argparse.ArgumentParser(prog="bench_train.py bare",
                                description="the bare PyTorch training loop the CLI is timed against")
    p.add_argument("data", type=Path)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--model", default="resnet18")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--warmup-lr", type=float, default=1e-5)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--model-ema-decay", type=float, default=None,
                   help="keep an EMA of the weights with this decay (default: none)")
    return p.parse_args(argv)


def bare_transforms(cfg: dict, size: int):
    """Training and evaluation transforms doing the work of timm's for this model's config."""
    from torchvision import transforms as T

    interp = T.InterpolationMode(cfg.get("interpolation", "bilinear"))
    norm = [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    train = T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interp),
                       T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4), *norm])
    scale = int(size / cfg.get("crop_pct", 0.875))
    val = T.Compose([T.Resize(scale, interpolation=interp), T.CenterCrop(size), *norm])
    return train, val


def bare_loaders(args, cfg: dict):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    train_tf, val_tf = bare_transforms(cfg, args.img_size)
    train_ds = ImageFolder(str(args.data / "train"), transform=train_tf)
    val_ds = ImageFolder(str(args.data / "val"), transform=val_tf)
    train = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True,
                       num_workers=args.workers, drop_last=True)
    val = DataLoader(val_ds, batch_size=args.batch_size, num_workers=args.workers)
    return train, val


def lr_at(epoch: int, args) -> float:
    """timm's cosine schedule with linear warm-up, evaluated per epoch."""
    import math

    if epoch < args.warmup_epochs:
        return args.warmup_lr + epoch * (args.lr - args.warmup_lr) / args.warmup_epochs
    return 0.5 * args.lr * (1 + math.cos(math.pi * epoch / args.epochs))


class BareEma:
    """ema = decay * ema + (1 - decay) * model, one fused lerp over float tensors per step."""

    def __init__(self, model, decay: float):
        import copy

        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.weight = 1.0 - decay
        pairs = list(zip(self._tensors(self.module), self._tensors(model)))
        self.floats = ([e for e, m in pairs if e.is_floating_point()],
                       [m for e, m in pairs if m.is_floating_point()])
        self.others = [(e, m) for e, m in pairs if not e.is_floating_point()]

    @staticmethod
    def _tensors(module):
        return [t.data for t in module.parameters()] + list(module.buffers())

    def update(self):
        import torch

        with torch.no_grad():
            torch._foreach_lerp_(self.floats[0], self.floats[1], self.weight)
            for e, m in self.others:
                e.copy_(m)


def bare_train_epoch(model, loader, optimizer, loss_fn, ema) -> float:
    import torch

    model.train()
    total, steps = torch.zeros(()), 0
    for images, targets in loader:
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update()
        total += loss.detach()
        steps += 1
    return total.item() / max(steps, 1)


def bare_validate(models: dict, loader, loss_fn) -> dict:
    """Loss and top-1 of each model, all in one pass over the validation data."""
    import torch

    sums = {k: [0.0, 0] for k in models}
    count = 0
    for m in models.values():
        m.eval()
    with torch.no_grad():
        for images, targets in loader:
            count += len(targets)
            for k, m in models.items():
                out = m(images)
                sums[k][0] += loss_fn(out, targets).item() * len(targets)
                sums[k][1] += (out.argmax(1) == targets).sum().item()
    return {k: (s[0] / count, 100.0 * s[1] / count) for k, s in sums.items()}


def bare_main(argv) -> int:
    args = parse_bare_args(argv)
    import timm
    import torch

    torch.manual_seed(42)
    model = timm.create_model(args.model, num_classes=args.num_classes)
    train_loader, val_loader = bare_loaders(args, model.pretrained_cfg)
    # Fused, as ematrain's is on the CPU: the floor makes the same update the fastest way.
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=2e-5, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    ema = BareEma(model, args.model_ema_decay) if args.model_ema_decay is not None else None
    args.output.mkdir(parents=True, exist_ok=True)
    for epoch in range(args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, args)
        train_loss = bare_train_epoch(model, train_loader, optimizer, loss_fn, ema)
        models = {"raw": model} if ema is None else {"raw": model, "ema": ema.module}
        scores = bare_validate(models, val_loader, loss_fn)
        state = {"epoch": epoch, "state_dict": model.state_dict()}
        if ema is not None:
            state["state_dict_ema"] = ema.module.state_dict()
        torch.save(state, args.output / "last.pth.tar")
        shown = "  ".join(f"{k} loss {v[0]:.3f} top1 {v[1]:.2f}" for k, v in scores.items())
        print(f"epoch {epoch}: train loss {train_loss:.3f}  {shown}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The benchmark driver
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4,
                   help="rounds; each runs every variant once and gives one pair per ratio "
                        "(median taken; at least 4 advised)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every training run")
    p.add_argument("--timm-train", type=Path, default=None, metavar="PATH",
                   help="timm's train.py (from its GitHub repository); without it the timm "
                        "rows are skipped")
    p.add_argument("--timm-git-dir", type=Path, default=None, metavar="GITDIR",
                   help="timm's git directory, to name the commit that --timm-train comes from")
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="ImageFolder root with train/ and val/ (default: <repo>/data/digits, "
                        "written from scikit-learn's digits when missing)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="OMP_NUM_THREADS / MKL_NUM_THREADS of every run (default: the CPU count)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="resnet18",
                   help="what every run trains: resnet18 (the default flags), or naflex: a "
                        "small NaFlexVit on timm's NaFlex batches (--naflex-loader; no bare "
                        "loop, which has no NaFlex batches)")
    p.add_argument("--skip-timm", action="store_true", help="do not run timm's train.py")
    p.add_argument("--skip-bare", action="store_true", help="do not run the bare loop")
    p.add_argument("--repo", type=Path, default=REPO,
                   help="ematrain checkout whose train.py is timed (default: %(default)s)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for every run (default: this one)")
    p.add_argument("--keep", action="store_true", help="keep the runs' folders and logs")
    args = p.parse_args(argv)
    if args.recipe != "resnet18":
        args.skip_bare = True
    if args.pairs < 1 or args.epochs < 1:
        p.error("--pairs and --epochs must be >= 1")
    if args.timm_train is not None and not args.timm_train.is_file():
        p.error(f"--timm-train {args.timm_train}: no such file")
    if not (args.repo / "train.py").is_file():
        p.error(f"--repo {args.repo}: no train.py there")
    return args


def machine_info(args) -> str:
    versions = "   ".join(f"{name} {importlib.metadata.version(name)}"
                          for name in ("torch", "torchvision", "timm", "ematrain"))
    lines = [f"platform : {platform.platform()}",
             f"python   : {platform.python_version()} ({args.python})   {versions}",
             f"cpu      : {os.cpu_count()} logical cpus, OMP_NUM_THREADS={args.threads}"]
    if cpu_name():
        lines[-1] += f", {cpu_name()}"
    if load_line():
        lines.append(load_line())
    return "\n".join(lines)


def timm_train_origin(path: Path, git_dir: Path | None) -> str:
    """Which version of timm's train.py this is: its git blob id and, given the repository,
    the commit that introduced that blob."""
    data = path.read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    text = f"timm train.py: {path} (git blob {blob})"
    if git_dir is None:
        return text + "; pass --timm-git-dir GITDIR to name its commit"
    found = subprocess.run(["git", "--git-dir", str(git_dir), "log", "--format=%H %cs",
                            f"--find-object={blob}", "--", "train.py"],
                           check=False, capture_output=True, text=True)
    commits = [line for line in found.stdout.splitlines() if line]
    if found.returncode != 0 or not commits:
        return text + f"; not a version of train.py in {git_dir}"
    # Newest first: the oldest listed commit added this blob (a newer one may have replaced it).
    return text + f", as committed in {commits[-1]}"


def prepare_data(args) -> tuple[Path, int]:
    """The data root and its number of classes."""
    data = args.data
    if data is None:
        try:
            from ematrain.data.digits import write_digits_imagefolder
        except ImportError:  # run from a checkout without installing
            sys.path.insert(0, str(args.repo / "src"))
            from ematrain.data.digits import write_digits_imagefolder
        data = write_digits_imagefolder(args.repo / "data" / "digits")
    data = data.resolve()
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise SystemExit(f"--data {data}: no {split}/ folder")
    classes = [d for d in (data / "train").iterdir() if d.is_dir() and not d.name.startswith(".")]
    return data, len(classes)


# What every run trains, by --recipe: the model and its optimizer (the rest is common).
RECIPES = {
    "resnet18": ["--model", "resnet18", "--opt", "sgd", "--lr", "0.05"],
    # A 2-block NaFlexVit with 8 px patches on timm's token-budget batches of 4, 9 or 16
    # patches an image (a budget of -b 32 x 16 patches), validated at 16 patches an image.
    "naflex": ["--model", "naflexvit_base_patch16_gap", "--model-kwargs", "patch_size=8",
               "embed_dim=64", "depth=2", "num_heads=2", "--opt", "adamw", "--lr", "0.001",
               "--naflex-loader", "--naflex-train-seq-lens", "4", "9", "16",
               "--naflex-max-seq-len", "16"],
}


def common_flags(args, classes: int, ema: bool) -> list[str]:
    flags = [*RECIPES[args.recipe], "-b", "32", "-j", "2", "--epochs", str(args.epochs),
             "--sched", "cosine", "--warmup-epochs", "1",
             "--checkpoint-hist", "1", "--device", "cpu", "--img-size", "32",
             "--num-classes", str(classes)]
    if ema:
        flags += ["--model-ema", "--model-ema-decay", str(EMA_DECAY)]
    return flags


def ours_cmd(args, data: Path, flags: list[str], out: str) -> list[str]:
    return [args.python, str(args.repo / "train.py"), str(data), *flags, "--output", out]


def timm_cmd(args, data: Path, flags: list[str], out: str) -> list[str]:
    where = ["--data-dir", str(data), "--dataset", "", "--train-split", "train",
             "--val-split", "val"]
    return [args.python, str(args.timm_train.resolve()), *where, *flags, "--output", out]


def bare_cmd(args, data: Path, classes: int, ema: bool, out: str) -> list[str]:
    flags = ["--epochs", str(args.epochs), "--num-classes", str(classes)]
    if ema:
        flags += ["--model-ema-decay", str(EMA_DECAY)]
    return [args.python, str(Path(__file__).resolve()), "bare", str(data), *flags, "--output", out]


def build_variants(args, data: Path, classes: int) -> dict:
    """variant name -> function(output folder) -> command line."""
    variants = {}
    for ema in (False, True):
        tail = "-ema" if ema else ""
        flags = common_flags(args, classes, ema)
        variants["ours" + tail] = functools.partial(ours_cmd, args, data, flags)
        if args.timm_train is not None and not args.skip_timm:
            variants["timm" + tail] = functools.partial(timm_cmd, args, data, flags)
        if not args.skip_bare:
            variants["bare" + tail] = functools.partial(bare_cmd, args, data, classes, ema)
    return variants


def child_env(args) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1")
    return env


def run_timed(cmd: list[str], env: dict, log: Path, cwd: Path) -> tuple[float, float, int]:
    """Run one whole process: (wall s, user+sys s of it and its reaped children, exit code)."""
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def warm_up(args, data: Path, env: dict, work: Path) -> None:
    """One untimed process that loads the libraries and reads the images into the page cache."""
    code = ("import timm, torch, torchvision, sys, pathlib\n"
            "for p in pathlib.Path(sys.argv[1]).rglob('*'):\n"
            "    p.is_file() and p.read_bytes()\n")
    run_timed([args.python, "-c", code, str(data)], env, work / "warmup.log", work)


class RunFailed(Exception):
    """A timed run exited with an error (its log has been printed)."""


def run_rounds(args, variants: dict, env: dict, work: Path) -> dict:
    """name -> list of (wall, cpu), one per round, in alternating order."""
    results = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.pairs):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            run_dir = work / f"r{r}-{name}"
            (run_dir / "output").mkdir(parents=True)
            log = run_dir / "log.txt"
            wall, cpu, rc = run_timed(variants[name](str(run_dir / "output")), env, log, run_dir)
            if rc != 0:
                tail = log.read_text(errors="replace").splitlines()[-25:]
                print(f"\n{name} failed (exit {rc}); the end of {log}:", file=sys.stderr)
                print("\n".join(tail), file=sys.stderr)
                raise RunFailed(name)
            results[name].append((wall, cpu))
            print(f"  round {r + 1}/{args.pairs}  {name:9s} wall {wall:7.2f} s  cpu {cpu:7.2f} s",
                  flush=True)
    return results


def spread(xs) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def report_times(results: dict) -> None:
    print("\nWhole-process times (s): median [min-max] over rounds")
    print(f"{'variant':10s} {'wall':>24s} {'cpu (user+sys)':>26s}")
    for name, runs in results.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(f"{name:10s} {spread(walls):>24s} {spread(cpus):>26s}")


def report_ratios(results: dict) -> list[tuple[str, float, bool, bool]]:
    """Print the per-round ratio table; return (label, target, wall met, cpu met) per ratio."""
    print("\nRatios, one pair per round: median [min-max]; per-pair wall ratios in round order")
    print(f"{'ratio':24s} {'wall':>22s} {'cpu':>22s}  {'target':>7s}  per-pair (wall)")
    verdicts = []
    for label, num, den, target in COMPARISONS:
        if num not in results or den not in results:
            continue
        pairs = list(zip(results[num], results[den]))
        walls = [a[0] / b[0] for a, b in pairs]
        cpus = [a[1] / b[1] for a, b in pairs]
        per_pair = " ".join(f"{x:.3f}" for x in walls)
        print(f"{label:24s} {spread(walls):>22s} {spread(cpus):>22s}  <= {target:.2f}  {per_pair}")
        verdicts.append((label, target, statistics.median(walls) <= target,
                         statistics.median(cpus) <= target))
    return verdicts


def report_targets(verdicts, skipped: list[str]) -> None:
    print("\nTargets (median ratio; wall time and CPU time judged separately)")
    for label, target, wall_ok, cpu_ok in verdicts:
        print(f"  {label:24s} <= {target:.2f}   wall: {'met' if wall_ok else 'MISSED':6s}"
              f"  cpu: {'met' if cpu_ok else 'MISSED'}")
    for line in skipped:
        print(f"  {line}")


def skipped_lines(args) -> list[str]:
    lines = []
    if args.skip_timm:
        lines.append("ours / timm: not measured (--skip-timm)")
    elif args.timm_train is None:
        lines.append("ours / timm: not measured: no --timm-train PATH given (timm's train.py is "
                     "not in the pip package; see this script's docstring for how to get it)")
    if args.skip_bare:
        why = "--skip-bare" if args.recipe == "resnet18" else f"--recipe {args.recipe}"
        lines.append(f"ours / bare: not measured ({why})")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    data, classes = prepare_data(args)
    print(machine_info(args))
    print(f"ours: {args.repo / 'train.py'}")
    if args.timm_train is not None and not args.skip_timm:
        print(timm_train_origin(args.timm_train, args.timm_git_dir))
    for line in skipped_lines(args):
        print(line)
    print(f"data: {data} ({classes} classes); {args.epochs} epochs per run, {args.pairs} rounds")
    work = Path(tempfile.mkdtemp(prefix="bench_train-"))
    env = child_env(args)
    keep = args.keep
    try:
        variants = build_variants(args, data, classes)
        print("common flags: " + " ".join(common_flags(args, classes, ema=False))
              + f"  (EMA runs add --model-ema --model-ema-decay {EMA_DECAY})")
        print(f"order: {' '.join(variants)}, reversed every other round")
        warm_up(args, data, env, work)
        results = run_rounds(args, variants, env, work)
    except RunFailed:
        keep = True
        return 1
    finally:
        if keep:
            print(f"runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report_times(results)
    report_targets(report_ratios(results), skipped_lines(args))
    after = load_line("well above --threads means other work competed with the runs")
    if after:
        print("\n" + after.replace("load avg :", "load avg after the runs:"))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "bare":
        sys.exit(bare_main(sys.argv[2:]))
    sys.exit(main())
