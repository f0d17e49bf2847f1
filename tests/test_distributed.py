"""torchrun with 2 CPU processes (gloo): training, exact-once validation, resume, EMA agreement."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, make_imagefolder, tiny_args

import ematrain

TINY = tiny_args("--model-ema", "--model-ema-decay", "0.9", batch=8, epochs=None)


def torchrun(*args, nproc=2, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *(str(a) for a in args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def frames_of_ours(text: str) -> list[str]:
    """Traceback frames in this project's code (the package or the top-level scripts), by their
    full path: the words of the path (a checkout named `ematrain`, a venv inside it) say nothing."""
    ours = (str(Path(ematrain.__file__).resolve().parent), str(REPO_ROOT.resolve() / "train.py"),
            str(REPO_ROOT.resolve() / "validate.py"))
    return [line for line in text.splitlines()
            if line.strip().startswith('File "') and any(p in line for p in ours)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # 3 x 7 = 21 validation images: not divisible by the world size.
    return make_imagefolder(tmp_path_factory.mktemp("dist") / "data", num_classes=3,
                            train_per_class=12, val_per_class=7)


@pytest.fixture(scope="module")
def two_proc_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_out")
    r = torchrun(REPO_ROOT / "train.py", data_root, *TINY, "--epochs", "1", "--output", out,
                 "--experiment", "ddp", "--model-ema-posthoc", "--model-ema-snapshot-every", "1it",
                 "--log-tensorboard")
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


def test_two_process_training_writes_one_run(two_proc_run):
    out, r = two_proc_run
    runs = list((out).iterdir())
    assert [p.name for p in runs] == ["ddp"]
    rows = list(csv.DictReader(open(runs[0] / "summary.csv")))
    assert [row["epoch"] for row in rows] == ["0"]
    for name in ("last.pth.tar", "model_best.pth.tar", "model_best_raw.pth.tar", "args.yaml"):
        assert (runs[0] / name).is_file()
    assert "2 processes (cpu, gloo)" in r.stderr
    assert r.stdout.count("epoch 0 (1/1)") == 1  # only rank 0 prints the epoch line
    checks = [l for l in r.stderr.splitlines() if l.startswith("EMA checksums (equal on all ranks)")]
    assert len(checks) == 1
    ckpt = torch.load(runs[0] / "last.pth.tar", weights_only=True)
    shadow_sum = sum(float(v.double().sum()) for v in ckpt["state_dict_ema"].values()
                     if v.is_floating_point())
    assert abs(shadow_sum - float(checks[0].split(":")[1])) <= 1e-6 * max(1.0, abs(shadow_sum))
    # Only rank 0 logs: one TensorBoard event file, each epoch once.
    assert len(list((runs[0] / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [s for s, _ in tensorboard_scalars(runs[0])["val/top1/raw"]] == [ckpt["counters"][
        "num_updates"]]


def tensorboard_scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_distributed_validation_equals_single_process(two_proc_run, data_root, tmp_path):
    out, _ = two_proc_run
    ckpt = out / "ddp" / "last.pth.tar"
    single = tmp_path / "single.json"
    # One process, with the same thread count as each rank: float32 kernels round differently
    # with another number of threads.
    r = torchrun(REPO_ROOT / "validate.py", data_root, "--checkpoint", ckpt, "--use-ema", "-b", "4",
                 "-j", "0", "--results-file", single, nproc=1)
    assert r.returncode == 0, r.stderr
    double = tmp_path / "double.json"
    r = torchrun(REPO_ROOT / "validate.py", data_root, "--checkpoint", ckpt, "--use-ema", "-b", "4",
                 "-j", "0", "--results-file", double)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("top1") == 1
    a, b = json.loads(single.read_text()), json.loads(double.read_text())
    assert a["count"] == b["count"] == 21
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-12)


def test_distributed_posthoc_sweep_equals_single_process(two_proc_run, data_root, tmp_path):
    """The snapshots of a torchrun run (rank 0 writes them), swept by one process and by two:
    the same table."""
    out, _ = two_proc_run
    run_dir = out / "ddp"
    assert len(list((run_dir / "posthoc").iterdir())) == 2  # one per optimizer step
    tables = []
    for nproc in (1, 2):
        r = torchrun(REPO_ROOT / "validate.py", data_root, "--posthoc", run_dir, "-b", "4",
                     "-j", "0", "--sigma-rel", "0.08", "0.2", nproc=nproc)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("<- best") == 1  # only rank 0 reports
        tables.append(list(csv.DictReader(open(run_dir / "posthoc.csv"))))
    assert len(tables[0]) == 1 + 1 + 2 + 2  # raw, the regular EMA 0.9, tracked, targets
    for a, b in zip(*tables):
        assert (a["weights"], a["top1"], a["top5"]) == (b["weights"], b["top1"], b["top5"])
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-9)


def test_two_process_run_resumes(two_proc_run, data_root):
    out, _ = two_proc_run
    r = torchrun(REPO_ROOT / "train.py", data_root, *TINY, "--epochs", "2", "--output", out,
                 "--experiment", "ddp", "--resume", "auto")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stderr and "at epoch 1" in r.stderr
    rows = list(csv.DictReader(open(out / "ddp" / "summary.csv")))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    ckpt = torch.load(out / "ddp" / "last.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["counters"]["world_size"] == 2
    # The resumed run goes on in the same TensorBoard folder (recorded: no flag again).
    steps = [s for s, _ in tensorboard_scalars(out / "ddp")["val/top1/raw"]]
    assert steps == [ckpt["counters"]["num_updates"] // 2, ckpt["counters"]["num_updates"]]


def test_a_single_process_run_continues_under_torchrun(data_root, tmp_path):
    first = torchrun(REPO_ROOT / "train.py", data_root, *TINY, "--epochs", "1", "--output",
                     tmp_path, "--experiment", "one", nproc=1)
    assert first.returncode == 0, first.stderr
    last = tmp_path / "one" / "last.pth.tar"
    r = torchrun(REPO_ROOT / "train.py", "--resume", last, "--epochs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resume: processes 2 (the checkpoint's run had 1)" in r.stderr
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["counters"]["world_size"] == 2


def test_diverged_shadows_stop_the_run(tmp_path):
    script = tmp_path / "diverge.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT / 'src')!r})
        import torch
        from ematrain import distributed
        from ematrain.errors import RunFailure
        info, device = distributed.init_distributed("cpu", None)
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 2)
        torch.nn.init.constant_(module.weight, 1.0)
        distributed.check_replicas_agree([module], info, device)  # equal: passes
        if info.rank == 1:
            with torch.no_grad():
                module.weight[0, 0] += 1e-3
        try:
            distributed.check_replicas_agree([module], info, device)
        except RunFailure as exc:
            print("STOPPED", exc)
        distributed.shutdown()
    """))
    r = torchrun(script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("STOPPED") == 2 and "diverged" in r.stdout


def test_lr_base_scales_with_global_batch(data_root, tmp_path):
    r = torchrun(REPO_ROOT / "train.py", data_root, *[a for a in TINY if a not in ("--lr", "0.05")],
                 "--lr-base", "0.1", "--lr-base-size", "256", "--epochs", "1", "--output", tmp_path,
                 "--experiment", "lr")
    assert r.returncode == 0, r.stderr
    # global batch 2 x 8 = 16: lr = 0.1 * 16 / 256
    assert "lr 0.00625 for a global batch of 16" in r.stderr


def test_no_bn_sync_compares_parameters_only(data_root, tmp_path):
    # Without --sync-bn and with --dist-bn '' each rank's shadow keeps its own BatchNorm
    # statistics; the run must go on, comparing the parameters.
    r = torchrun(REPO_ROOT / "train.py", data_root, *TINY, "--epochs", "1", "--dist-bn", "",
                 "--output", tmp_path, "--experiment", "nobn")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "EMA checksums (equal on all ranks)" in r.stderr


def test_recalibrated_switched_shadows_agree_across_ranks(data_root, tmp_path):
    """--model-ema-bn recalibrate and --model-ema-switch under torchrun: each rank recalibrates
    its shadow in its plain module (no DDP collective) on the same batches, switches, and the
    run goes on; both epochs' checks, buffers included, find the shadows equal."""
    r = torchrun(REPO_ROOT / "train.py", data_root, *TINY, "--epochs", "2",
                 "--model-ema-bn", "recalibrate", "--model-ema-bn-batches", "2",
                 "--model-ema-switch", "--output", tmp_path, "--experiment", "recal")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("EMA checksums (equal on all ranks)") == 2


def test_start_up_warnings_print_once_under_torchrun(data_root, tmp_path):
    """Rank 0 alone says what the run will do: each start-up warning (loader processes, LR
    warmup, EMA horizon) and notice once, not once per process."""
    r = torchrun(REPO_ROOT / "train.py", data_root, *TINY, "--epochs", "1", "-j", "4",
                 "--warmup-epochs", "5", "--output", tmp_path, "--experiment", "w")
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) >= 3 and len(set(warnings)) == len(warnings), warnings
    for words in ("loader processes", "--warmup-epochs 5", "EMA 0.9"):
        assert sum(words in w for w in warnings) == 1, (words, warnings)
    assert r.stderr.count("for a global batch of") == 1 and r.stderr.count("output: ") == 1


def test_sync_bn_on_the_cpu_is_one_line_per_process(data_root, tmp_path):
    r = torchrun(REPO_ROOT / "train.py", data_root, *TINY, "--epochs", "1", "--sync-bn",
                 "--output", tmp_path, "--experiment", "s")
    # torchrun reports a failed child with a traceback of its own; none comes from a child.
    assert r.returncode != 0 and r.stderr.count("Traceback (most recent call last)") == 1
    assert not frames_of_ours(r.stderr), r.stderr
    # One per process; the two processes' lines may interleave on the shared stderr.
    assert r.stderr.count("train.py: error: --sync-bn needs CUDA") == 2, r.stderr
    assert not (tmp_path / "s").exists()
