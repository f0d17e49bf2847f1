"""train.py with --log-tensorboard and --log-wandb (W&B offline), read back with the libraries'
own readers: every epoch's numbers of the raw weights and of each EMA equal summary.csv's, the
log intervals are there at their steps, a run killed (SIGKILL) and resumed has each step exactly
once in both trackers, validate.py --posthoc's table lands in the run's trackers, a tracker that
fails leaves training's output as it is, and a missing package is one line before any work."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb_records
from conftest import REPO_ROOT, run_in_process, tiny_args

from ematrain.cli import train, validate
from ematrain.run.weight_sets import weight_sets
from ematrain.trackers import spec as tracker_spec

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")

EMAS = ("--model-ema", "--model-ema-decay", "0.9", "0.5")
STEPS_PER_EPOCH = 6  # small_data: 24 images, batch 4


@pytest.fixture
def wandb_offline(monkeypatch):
    """W&B's own offline mode: no account, no network; its files in <run>/wandb."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def summary_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def weight_set_columns(run_dir: Path) -> dict[str, str]:
    """Each weight set's tracker name and summary.csv column prefix, from the run's record."""
    ckpt = torch.load(run_dir / "last.pth.tar", weights_only=True)
    names = ckpt["ema"]["names"] if "ema" in ckpt else []
    sets = weight_sets([0.0] * len(names), names=names)
    return {s.name.replace(" ", "_"): s.column_prefix for s in sets}


def expected_epochs(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What each tracker tag must hold, from summary.csv: each weight set's loss, top-1 and
    top-5 at the step its epoch ended, and timm's own keys."""
    rows = summary_rows(run_dir)
    out = {}
    for tag, prefix in weight_set_columns(run_dir).items():
        for m in ("loss", "top1", "top5"):
            out[f"val/{m}/{tag}"] = [((int(r["epoch"]) + 1) * STEPS_PER_EPOCH,
                                      float(r[f"{prefix}eval_{m}"])) for r in rows]
    for key in ("train_loss", "eval_top1", "eval_loss", "lr"):
        out[key] = [((int(r["epoch"]) + 1) * STEPS_PER_EPOCH, float(r[key])) for r in rows]
    return out


def assert_tensorboard_matches_summary(run_dir: Path, epochs: int) -> dict:
    got = scalars(run_dir / "tensorboard")
    for tag, want in expected_epochs(run_dir).items():
        assert got[tag] == [(s, float(np.float32(v))) for s, v in want], tag
        assert len(want) == epochs
    return got


def assert_wandb_matches_summary(rows: list[dict], run_dir: Path) -> None:
    by_step = {r["_step"]: r for r in rows}
    for tag, want in expected_epochs(run_dir).items():
        for step, value in want:
            assert by_step[step][tag] == pytest.approx(value, rel=1e-12, abs=1e-12), (tag, step)


def test_both_trackers_hold_every_weight_set_per_epoch_as_summary_csv(small_data, tmp_path,
                                                                       wandb_offline):
    """The user's command with both trackers and post-hoc EMA, then validate.py --posthoc:
    raw and every EMA side by side in TensorBoard and in W&B's offline files."""
    argv = [small_data, *tiny_args(*EMAS, "--model-ema-posthoc", "0.1", epochs=2),
            "--log-interval", "2", "--log-tensorboard", "--log-wandb", "--wandb-project", "p",
            "--wandb-tags", "a", "b", "--output", tmp_path, "--experiment", "run"]
    r = run_in_process(train.main, "train.py", *argv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "logging is off" not in r.stderr and "logging failed" not in r.stderr, r.stderr
    run_dir = tmp_path / "run"
    got = assert_tensorboard_matches_summary(run_dir, epochs=2)
    # Every log interval (2 batches), read when the progress line reads it: no other step.
    intervals = list(range(2, 2 * STEPS_PER_EPOCH + 1, 2))
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/data_wait"):
        assert [s for s, _ in got[tag]] == intervals, tag
    assert all(0 <= v <= 1 for _, v in got["train/data_wait"])
    assert [s for s, _ in got["epoch/seconds"]] == [6, 12]
    assert [s for s, _ in got["val/top1/power_sr0.1"]] == [6, 12]
    sixth = pytest.approx(1 / 6)  # decay 0.5: one step
    assert got["ema/half_life_epochs/ema_0.5"] == [(6, sixth), (12, sixth)]
    best = torch.load(run_dir / "last.pth.tar", weights_only=True)["keeper"]["best"]
    assert got["best/raw/epoch"] == [(12, float(best["raw"]["epoch"]))]
    assert got["best/ema_0.5/top1"] == [(12, float(np.float32(best["ema 0.5"]["metric"])))]

    [path] = wandb_records.offline_files(run_dir)
    info = wandb_records.run_info(path)
    assert (info["project"], info["name"], info["tags"]) == ("p", "run", ["a", "b"])
    history = wandb_records.history(path)
    assert [h["_step"] for h in history] == intervals
    assert_wandb_matches_summary(history, run_dir)
    final = wandb_records.summary(path)
    assert final["best/ema_0.9/epoch"] == best["ema 0.9"]["epoch"]
    config = wandb_config(path)  # the settings as hyperparameters
    assert config["model"] == "test_resnet" and config["model_ema_decay"] == [0.9, 0.5]
    assert config["log_interval"] == 2

    r = run_in_process(validate.main, "validate.py", small_data, "--posthoc", run_dir, "-j", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    posthoc = scalars(run_dir / "tensorboard")
    [(step, value)] = posthoc["posthoc/best_top1"]
    assert step == 13 and value > 0
    files = wandb_records.offline_files(run_dir, info["id"])
    assert len(files) == 2  # the same W&B run, continued by validate.py
    assert wandb_records.summary(files[1])["posthoc/best_top1"] == pytest.approx(value, rel=1e-6)


def wandb_config(path: Path) -> dict:
    """The run's config as W&B recorded it (its run record and later config updates)."""
    import json
    out = {}
    for record in wandb_records.records(path):
        kind = record.WhichOneof("record_type")
        items = (record.run.config.update if kind == "run" else
                 record.config.update if kind == "config" else [])
        out.update({i.key: json.loads(i.value_json) for i in items})
    return out


KILL_HOOK = """
import torch
from ematrain.trackers import composite
real = composite.Trackers.log_interval
def recovery_at(path, step):  # written in the background: wait for the file, not for time
    try:
        return torch.load(path, weights_only=True)["counters"]["num_updates"] == step
    except Exception:
        return False
def log_interval(self, step, values):
    real(self, step, values)
    if step == 10 and not os.environ.get("RESUMED"):  # two steps after the recovery save at 8
        while not recovery_at(os.path.join(os.environ["RUN_DIR"], "recovery.pth.tar"), 8):
            time.sleep(0.01)  # polling the file's state, without taking the writer's core
        self.flush()
        os.kill(os.getpid(), signal.SIGKILL)
composite.Trackers.log_interval = log_interval
"""


def train_hooked(data, out: Path, resumed: bool) -> subprocess.CompletedProcess:
    script = out / "hooked.py"
    script.write_text("import os, signal, sys, time\n"
                      f"sys.path.insert(0, {str(REPO_ROOT / 'src')!r})\n" + KILL_HOOK +
                      "from ematrain.cli import train\nsys.exit(train.main())\n")
    argv = [data, *tiny_args(*EMAS, epochs=2), "--log-interval", "1", "--recovery-interval", "4",
            "--log-tensorboard", "--log-wandb", "--output", out, "--experiment", "run",
            "--resume", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               RESUMED="1" if resumed else "", RUN_DIR=str(out / "run"))
    env.pop("WANDB_DIR", None)
    return subprocess.run([sys.executable, script, *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_run_killed_and_resumed_has_each_step_once_in_both_trackers(small_data, tmp_path):
    """SIGKILL at step 10, two steps after the recovery checkpoint (step 8); the same command
    resumes from it: TensorBoard purges 9-10 and W&B keeps one copy of each, so each of the 12
    steps appears once, and every epoch equals summary.csv."""
    killed = train_hooked(small_data, tmp_path, resumed=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert torch.load(run_dir / "recovery.pth.tar", weights_only=True)["trackers"][
        "tensorboard"]["step"] == 8
    assert [s for s, _ in scalars(run_dir / "tensorboard")["train/loss"]] == list(range(1, 11))
    again = train_hooked(small_data, tmp_path, resumed=True)
    assert again.returncode == 0, again.stderr[-3000:]
    got = assert_tensorboard_matches_summary(run_dir, epochs=2)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 13))
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    ckpt = torch.load(run_dir / "last.pth.tar", weights_only=True)
    files = wandb_records.offline_files(run_dir, ckpt["trackers"]["wandb"]["run_id"])
    assert len(files) == 2  # one W&B run: the killed segment and the resumed one
    rows = wandb_records.synced_history(files)
    assert [r["_step"] for r in rows] == list(range(1, 13))
    assert_wandb_matches_summary(rows, run_dir)


def test_a_tracker_that_cannot_write_warns_once_and_leaves_the_run_as_without_it(small_data,
                                                                                 tmp_path):
    """--log-tensorboard into a folder that cannot be made (its parent is a file): one warning
    line, and the same summary.csv and weights as the run without the flag."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    base = [small_data, *tiny_args(*EMAS, "--seed", "3", epochs=2), "--output", tmp_path]
    plain = run_in_process(train.main, "train.py", *base, "--experiment", "plain")
    logged = run_in_process(train.main, "train.py", *base, "--experiment", "logged",
                            "--log-tensorboard", blocked / "tb")
    assert plain.returncode == logged.returncode == 0, logged.stderr[-3000:]
    warnings = [line for line in logged.stderr.splitlines() if "warning" in line.lower()]
    plain_warnings = [line for line in plain.stderr.splitlines() if "warning" in line.lower()]
    [line] = [w for w in warnings if w not in plain_warnings]
    assert line.startswith("warning: TensorBoard logging is off: it could not start (")
    assert line.endswith("training goes on")
    a, b = tmp_path / "plain", tmp_path / "logged"
    assert (a / "summary.csv").read_text() == (b / "summary.csv").read_text()
    last_a = torch.load(a / "last.pth.tar", weights_only=True)
    last_b = torch.load(b / "last.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema", "state_dict_ema_1"):
        assert all(torch.equal(last_a[key][k], last_b[key][k]) for k in last_a[key]), key
    assert not (blocked.parent / "tb").exists()


def test_a_missing_tracker_package_is_one_line_before_any_work(small_data, tmp_path,
                                                               monkeypatch):
    monkeypatch.setattr(tracker_spec, "installed", lambda module: module != "wandb")
    r = run_in_process(train.main, "train.py", small_data, *tiny_args(), "--log-wandb",
                       "--output", tmp_path, "--experiment", "run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "train.py: error: --log-wandb needs the wandb package: pip install 'ematrain[log]'"]
    assert not (tmp_path / "run").exists()


def test_wandb_resume_id_needs_resume_as_in_timm(small_data, tmp_path):
    r = run_in_process(train.main, "train.py", small_data, *tiny_args(), "--log-wandb",
                       "--wandb-resume-id", "abc", "--output", tmp_path)
    assert r.returncode == 2
    assert "--wandb-resume-id continues a W&B run: give it with --resume" in r.stderr


def readme_commands() -> list[str]:
    section = (REPO_ROOT / "README.md").read_text().split("## Watching a run", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_commands_train_resume_and_sweep_into_the_same_tracker_runs(small_data,
                                                                               tmp_path,
                                                                               monkeypatch):
    """The README's commands on the tiny data (test_resnet for resnet34, 1 + 1 epochs for
    10 + 2): one W&B run and one TensorBoard folder hold both trainings and the sweep."""
    commands = readme_commands()
    assert len(commands) == 4 and commands[-1].startswith(".venv/bin/tensorboard --logdir")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    tiny = " ".join(tiny_args(epochs=None))
    for command in commands[:-1]:
        env, command = command.split(" ", 1)
        assert env == "WANDB_MODE=offline"  # W&B's own offline mode: no account, no network
        monkeypatch.setenv("WANDB_MODE", "offline")
        words = (command.replace("DATA", str(small_data)).replace("--model resnet34", tiny)
                 .replace("output/train/", f"{tmp_path}/").replace("--epochs 10", "--epochs 1")
                 .replace("--epochs 12", "--epochs 2").split())
        script, args = words[1], words[2:]
        if "--experiment" in args:
            args += ["--output", str(tmp_path)]
        main = {"train.py": train.main, "validate.py": validate.main}[script]
        r = run_in_process(main, script, *args, *(["-j", "0"] if script == "validate.py" else []))
        assert r.returncode == 0, (command, r.stderr[-3000:])
    run_dir = tmp_path / "watched"
    got = assert_tensorboard_matches_summary(run_dir, epochs=2)
    assert [s for s, _ in got["posthoc/best_top1"]] == [13]
    run_id = torch.load(run_dir / "last.pth.tar", weights_only=True)["trackers"]["wandb"]["run_id"]
    files = wandb_records.offline_files(run_dir)
    assert len(files) == 3 and all(f.name == f"run-{run_id}.wandb" for f in files)
    assert wandb_records.run_info(files[0])["tags"] == ["demo"]
    rows = wandb_records.synced_history(files)
    assert_wandb_matches_summary(rows, run_dir)
    assert [r["_step"] for r in rows] == [6, 12, 13]  # --log-interval 50: each epoch's end


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_tracker_folder(small_data,
                                                                               tmp_path):
    """As with its other files: nothing can resume it, so its TensorBoard folder goes too."""
    r = run_in_process(train.main, "train.py", small_data, *tiny_args(lr="1e30"),
                       "--log-interval", "1", "--log-tensorboard", "--output", tmp_path,
                       "--experiment", "run")
    assert r.returncode == 1 and "non-finite loss at epoch 0" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()
