"""torchrun (2 CPU processes, gloo) killed in the middle of an epoch and resumed: every tensor of
the final checkpoint (raw weights, EMA shadows, power EMAs) and of every post-hoc snapshot, and
every summary row, are the uninterrupted run's, bit for bit."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, make_imagefolder, tiny_args

# 3 x 12 = 36 images, 18 per process, batch 4: 4 optimizer steps per epoch, 8 in all. Recovery
# saves at updates 2 and 6 (epoch 1, step 2); a snapshot at every step.
ARGS = tiny_args("--seed", "5", "--model-ema", "--model-ema-decay", "0.9", "--model-ema-posthoc",
                 "--model-ema-snapshot-every", "1it", "--recovery-interval", "2", epochs=2)

# Rank 1 waits after update 7 (epoch 1, step 3) until rank 0 has written the recovery file of
# update 6, then kills itself (SIGKILL): the resume starts from the middle of epoch 1, where the
# ranks' BatchNorm statistics in the shadows have drifted apart since epoch 0's reduction.
HOOK = """
import os, signal, sys, time
sys.path.insert(0, {src!r})
import torch
from ematrain.cli import train
from ematrain.run import parts

real = parts.Run.take_snapshot

def take_snapshot(self):
    real(self)
    c = self.counters
    if self.dist.rank == 1 and c.epoch == 1 and c.epoch_step == 3:
        recovery = self.keeper.run_dir / "recovery.pth.tar"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                saved = torch.load(recovery, weights_only=True, mmap=True)["counters"]
                if (saved["epoch"], saved["epoch_step"]) == (1, 2):
                    break
            except Exception:
                pass
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

parts.Run.take_snapshot = take_snapshot
sys.exit(train.main())
"""


def torchrun(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *(str(a) for a in args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("dist_resume") / "data", num_classes=3,
                            train_per_class=12, val_per_class=4)


def _tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint or snapshot by a dotted name (the optimizer's aside)."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
    walk("", {k: v for k, v in ckpt.items() if k != "optimizer"})
    return out


def _assert_same(a: dict, b: dict, what: str) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys(), what
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:4]}"


def test_a_torchrun_run_killed_mid_epoch_resumes_bit_identical(data_root, tmp_path):
    ref = torchrun(REPO_ROOT / "train.py", data_root, *ARGS, "--output", tmp_path,
                   "--experiment", "ref")
    assert ref.returncode == 0, ref.stdout + ref.stderr
    hook = tmp_path / "hooked.py"
    hook.write_text(HOOK.format(src=str(REPO_ROOT / "src")))
    killed = torchrun(hook, data_root, *ARGS, "--output", tmp_path, "--experiment", "run")
    assert killed.returncode != 0, killed.stderr[-3000:]
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    assert not (run_dir / "last.pth.tar").exists() or torch.load(
        run_dir / "last.pth.tar", weights_only=True, mmap=True)["epoch"] == 0
    again = torchrun(REPO_ROOT / "train.py", data_root, *ARGS, "--output", tmp_path,
                     "--experiment", "run", "--resume", "auto")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "recovery.pth.tar at epoch 1, step 2" in again.stderr, again.stderr
    a = torch.load(ref_dir / "last.pth.tar", weights_only=True)
    b = torch.load(run_dir / "last.pth.tar", weights_only=True)
    assert a["counters"] == b["counters"]
    _assert_same(a, b, "last.pth.tar")
    names = sorted(p.name for p in (ref_dir / "posthoc").iterdir())
    assert len(names) == 8 and names == sorted(p.name for p in (run_dir / "posthoc").iterdir())
    for name in names:
        _assert_same(torch.load(ref_dir / "posthoc" / name, weights_only=True),
                     torch.load(run_dir / "posthoc" / name, weights_only=True), name)
    assert (run_dir / "summary.csv").read_text() == (ref_dir / "summary.csv").read_text()
