"""End-to-end train.py runs on a tiny generated data set: files, summary.csv, checkpoints,
EMA arithmetic, validate.py agreement with the training log, and YAML recipes.

The training runs are shared: a module fixture starts them all once (two at a time, one torch
thread each, which on a 2-core machine is faster than one run with two threads), and every test
below asserts on their outputs.
"""
from __future__ import annotations

import csv
import json
import math
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import run_cli, tiny_args

COMMON = tiny_args(batch=16, epochs=None)
# timm's columns, in timm's order (its update_summary); with an EMA on, eval_* are the first EMA's.
BASE_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
RAW_COLUMNS = ["raw_eval_loss", "raw_eval_top1", "raw_eval_top5"]
EMA_COLUMNS = ["ema_eval_loss", "ema_eval_top1", "ema_eval_top5"]  # --primary-weights raw
EMA99_COLUMNS = ["ema0.99_eval_loss", "ema0.99_eval_top1", "ema0.99_eval_top5"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEED = 42  # train.py's default --seed


def run_all(jobs: dict, workers: int = 2) -> dict:
    """Run {name: (script, args)} concurrently; torch gets one thread per process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MKL_NUM_THREADS", "1")
        with ThreadPoolExecutor(workers) as pool:
            futures = {name: pool.submit(run_cli, script, *args)
                       for name, (script, args) in jobs.items()}
            return {name: f.result() for name, f in futures.items()}


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_header(run_dir: Path) -> list[str]:
    with open(run_dir / "summary.csv", newline="") as f:
        return next(csv.reader(f))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def float_keys(state: dict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].double().flatten() for k in sorted(float_keys(state))])


def initial_weights() -> dict:
    """The weights train.py starts from: seeded like its Trainer, then timm's init."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    return timm.create_model("test_resnet", num_classes=3, drop_rate=0.0).state_dict()


# ----------------------------------------------------------------------------- the runs
class Runs:
    def __init__(self, out: Path, procs: dict):
        self.out, self.procs = out, procs

    def dir(self, name: str) -> Path:
        return self.out / name / name

    def proc(self, name: str):
        if name not in self.procs:
            pytest.fail(f"run '{name}' was not started (an earlier run it needs failed)")
        return self.procs[name]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Runs:
    out = tmp_path_factory.mktemp("e2e")

    def train(name, *extra):
        return ("train.py", [tiny_data, *COMMON, "--output", out / name, "--experiment", name,
                             *extra])

    recipe = out / "recipe.yaml"
    # Same settings as the 'ema' run, but from YAML (one key hyphenated, as flags are spelled).
    recipe.write_text(yaml.safe_dump({
        "model": "test_resnet", "epochs": 1, "img_size": 32, "batch_size": 16,
        "warmup-epochs": 0, "lr": 0.05, "workers": 0, "model_ema": True,
        "model_ema_decay": [0.9]}))
    procs = run_all({
        "raw": train("raw", "--epochs", "2"),
        "ema": train("ema", "--epochs", "2", "--model-ema", "--model-ema-decay", "0.9"),
        "cpu": train("cpu", "--epochs", "2", "--model-ema-force-cpu", "--model-ema-decay", "0.9"),
        "two": train("two", "--epochs", "2", "--model-ema", "--model-ema-decay", "0.9", "0.99"),
        # The 'ema' run with the raw weights in timm's names, as runs had them before.
        "rawfirst": train("rawfirst", "--epochs", "2", "--model-ema", "--model-ema-decay", "0.9",
                          "--primary-weights", "raw"),
        # One optimizer step in all (the whole train split in one batch): the shadow must be
        # exactly 0.9 * init + 0.1 * trained.
        "onestep": train("onestep", "--epochs", "1", "-b", "512", "--model-ema",
                         "--model-ema-decay", "0.9"),
        "config": ("train.py", [tiny_data, "-c", recipe, "--epochs", "2",
                                "--output", out / "config", "--experiment", "config"]),
    })
    runs = Runs(out, procs)
    # args.yaml of a finished run fed back as a recipe (data root included).
    ema_args = runs.dir("ema") / "args.yaml"
    if ema_args.is_file():
        procs.update(run_all({"refed": ("train.py", [
            "-c", ema_args, "--epochs", "1", "--output", out / "refed", "--experiment", "refed"])}))
    return runs


@pytest.fixture(scope="module")
def validations(runs, tiny_data) -> dict:
    """validate.py on the runs' last checkpoints, each with a JSON results file."""
    jobs = {}

    def job(name, run, *extra):
        res = runs.out / f"validate-{name}.json"
        jobs[name] = ("validate.py", [tiny_data, "--checkpoint", runs.dir(run) / "last.pth.tar",
                                      "-j", "0", "--results-file", res, *extra])

    job("ema_raw", "ema")
    job("ema_ema", "ema", "--use-ema")
    job("two_decay", "two", "--ema-decay", "0.99")
    job("two_index", "two", "--ema-index", "1")
    procs = run_all(jobs)
    out = {}
    for name, proc in procs.items():
        res = runs.out / f"validate-{name}.json"
        out[name] = (proc, json.loads(res.read_text()) if res.is_file() else None)
    return out


ALL_RUNS = ["raw", "ema", "cpu", "two", "rawfirst", "onestep", "config"]
EMA_RUNS = ["ema", "cpu", "two", "rawfirst", "onestep", "config"]
# The best files besides model_best.pth.tar: the raw weights' with the EMA in timm's names.
BEST_FILES = {"raw": set(), "ema": {"model_best_raw.pth.tar"}, "cpu": {"model_best_raw.pth.tar"},
              "two": {"model_best_raw.pth.tar", "model_best_ema0.99.pth.tar"},
              "rawfirst": {"model_best_ema.pth.tar"}, "onestep": {"model_best_raw.pth.tar"},
              "config": {"model_best_raw.pth.tar"}}


@pytest.mark.parametrize("name", ALL_RUNS + ["refed"])
def test_run_succeeds(runs, name):
    proc = runs.proc(name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- files
@pytest.mark.parametrize("name", ALL_RUNS)
def test_run_files(runs, name):
    run_dir = runs.dir(name)
    for fname in ("args.yaml", "summary.csv", "last.pth.tar", "model_best.pth.tar", "curves.png"):
        assert (run_dir / fname).is_file(), f"{fname} missing in {sorted(p.name for p in run_dir.iterdir())}"
        assert (run_dir / fname).stat().st_size > 0, fname
    best = {p.name for p in run_dir.glob("model_best_*.pth.tar")}
    assert best == BEST_FILES[name]
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    assert png[12:16] == b"IHDR" and png[-8:-4] == b"IEND"
    leftovers = [p.name for p in run_dir.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.parametrize("name", ALL_RUNS)
def test_args_yaml_records_the_run(runs, name):
    saved = yaml.safe_load((runs.dir(name) / "args.yaml").read_text())
    assert saved["model"] == "test_resnet"
    assert saved["img_size"] == 32
    assert saved["lr"] == 0.05
    assert saved["experiment"] == name
    assert saved["model_ema"] is (name in EMA_RUNS)
    assert saved["epochs"] == (1 if name == "onestep" else 2)


# ----------------------------------------------------------------------------- summary.csv
SUMMARY_COLUMNS = [
    ("raw", BASE_COLUMNS),
    ("ema", BASE_COLUMNS + RAW_COLUMNS),
    ("cpu", BASE_COLUMNS + RAW_COLUMNS),
    ("two", BASE_COLUMNS + RAW_COLUMNS + EMA99_COLUMNS),
    ("rawfirst", BASE_COLUMNS + EMA_COLUMNS),
    ("config", BASE_COLUMNS + RAW_COLUMNS),
]


@pytest.mark.parametrize("name, columns", SUMMARY_COLUMNS)
def test_summary_header_exact(runs, name, columns):
    assert read_header(runs.dir(name)) == columns


@pytest.mark.parametrize("name, columns", SUMMARY_COLUMNS)
def test_summary_rows(runs, name, columns):
    run_dir = runs.dir(name)
    assert read_header(run_dir)[: len(columns)] == columns
    rows = read_rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for row in rows:
        for col in columns:
            value = float(row[col])  # every cell a number, EMA cells included
            assert math.isfinite(value), (col, row[col])
        for prefix in {c[: -len("eval_top1")] for c in columns if c.endswith("eval_top1")}:
            assert 0.0 <= float(row[f"{prefix}eval_top1"]) <= float(row[f"{prefix}eval_top5"]) <= 100.0
            assert float(row[f"{prefix}eval_loss"]) > 0.0
    # Cosine schedule over 2 epochs without warmup: full LR, then half.
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 0.025])


def test_accuracy_rises_above_chance(runs):
    rows = read_rows(runs.dir("raw"))
    assert float(rows[-1]["eval_top1"]) > 60.0  # 3 classes: chance is 33.3 %
    assert float(rows[-1]["eval_loss"]) < math.log(3)  # better than a uniform guess
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])


def test_ema_is_validated_separately(runs):
    """The EMA columns are the shadow's own numbers, not a copy of the raw ones."""
    for name in ("ema", "two"):
        for row in read_rows(runs.dir(name)):
            assert float(row["raw_eval_loss"]) != float(row["eval_loss"])
    for row in read_rows(runs.dir("two")):
        assert float(row["ema0.99_eval_loss"]) != float(row["eval_loss"])


def test_training_unchanged_by_ema(runs):
    """Keeping (and validating) EMA shadows must not perturb the raw training at all."""
    raw, ema, two = (read_rows(runs.dir(n)) for n in ("raw", "ema", "two"))
    plain = ["epoch", "train_loss", "lr"]
    for rows in (ema, two):
        assert [[r[c] for c in plain + RAW_COLUMNS] for r in rows] == [
            [r[c] for c in plain + BASE_COLUMNS[2:5]] for r in raw]
    # The first shadow of the two-decay run is the same 0.9 EMA as the single-decay run.
    first = [[r[c] for c in BASE_COLUMNS] for r in two]
    assert first == [[r[c] for c in BASE_COLUMNS] for r in ema]


def test_the_summary_is_timms_with_the_ema_in_its_eval_columns(runs, tmp_path):
    """timm's update_summary, given timm's metrics of the same epochs (the EMA's as eval
    metrics, as its train.py passes them with an EMA on), writes our first six columns; with
    --primary-weights raw the same numbers sit in the other columns."""
    from collections import OrderedDict

    from timm.utils import update_summary
    ours = read_rows(runs.dir("ema"))
    for row in ours:
        update_summary(int(row["epoch"]), OrderedDict(loss=float(row["train_loss"])),
                       OrderedDict((m, float(row[f"eval_{m}"])) for m in ("loss", "top1", "top5")),
                       tmp_path / "timm.csv", lr=float(row["lr"]))
    with open(tmp_path / "timm.csv", newline="") as f:
        theirs = list(csv.reader(f))
    assert read_header(runs.dir("ema"))[:6] == theirs[0] == BASE_COLUMNS
    assert [[float(v) for v in r] for r in theirs[1:]] == [
        [float(r[c]) for c in BASE_COLUMNS] for r in ours]
    # timm's trim_summary (a resume of timm's train.py into this folder) reads our file as its own.
    from timm.utils.summary import trim_summary
    copy = tmp_path / "summary.csv"
    copy.write_text((runs.dir("ema") / "summary.csv").read_text())
    trim_summary(str(copy), 1)
    with open(copy, newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0"]
    swapped = read_rows(runs.dir("rawfirst"))
    assert [[r[c] for c in RAW_COLUMNS + BASE_COLUMNS[2:5]] for r in ours] == [
        [r[c] for c in BASE_COLUMNS[2:5] + EMA_COLUMNS] for r in swapped]


def test_force_cpu_run_matches_plain_ema_run(runs):
    """Same seed and decay: --model-ema-force-cpu gives the very same numbers, EMA included."""
    assert read_rows(runs.dir("cpu")) == read_rows(runs.dir("ema"))
    a, b = load(runs.dir("cpu") / "last.pth.tar"), load(runs.dir("ema") / "last.pth.tar")
    for key in ("state_dict", "state_dict_ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    saved = yaml.safe_load((runs.dir("cpu") / "args.yaml").read_text())
    assert saved["model_ema_force_cpu"] is True and saved["model_ema"] is True


# ----------------------------------------------------------------------------- checkpoints
def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


BEST_OF = {"model_best.pth.tar": "", "model_best_raw.pth.tar": "raw_",
           "model_best_ema.pth.tar": "ema_", "model_best_ema0.99.pth.tar": "ema0.99_"}


@pytest.mark.parametrize("name", ["raw", "ema", "two", "rawfirst"])
@pytest.mark.parametrize("fname", ["last.pth.tar", *BEST_OF])
def test_checkpoint_contents(runs, name, fname):
    path = runs.dir(name) / fname
    if fname.startswith("model_best_") and fname not in BEST_FILES[name]:
        assert not path.exists()
        return
    ckpt = load(path)
    for key in ("epoch", "arch", "state_dict", "optimizer", "args", "metric", "version"):
        assert key in ckpt, key
    assert ckpt["arch"] == "test_resnet"
    assert type(ckpt["args"]) is dict and _plain(ckpt["args"])
    assert ckpt["args"]["model"] == "test_resnet" and ckpt["args"]["experiment"] == name
    assert isinstance(ckpt["version"], int)
    rows = read_rows(runs.dir(name))
    epoch = ckpt["epoch"]
    assert epoch in (0, 1)
    if fname == "last.pth.tar":
        assert epoch == 1
    # The stored metric is timm's: the eval_top1 of the checkpoint's epoch (the first EMA's
    # with an EMA on, unless --primary-weights raw), and each best file holds its set's best.
    assert ckpt["metric"] == float(rows[epoch]["eval_top1"])
    if fname in BEST_OF:
        column = f"{BEST_OF[fname]}eval_top1"
        best = max(float(r[column]) for r in rows)
        assert float(rows[epoch][column]) == best
        assert epoch == min(int(r["epoch"]) for r in rows if float(r[column]) == best)
    has_ema = name != "raw"
    assert ("state_dict_ema" in ckpt) == has_ema
    if has_ema:
        assert ckpt["state_dict_ema"].keys() == ckpt["state_dict"].keys()
        for k, v in ckpt["state_dict"].items():
            assert ckpt["state_dict_ema"][k].shape == v.shape, k


@pytest.mark.parametrize("name", ["ema", "two"])
def test_timm_load_checkpoint(runs, name):
    from timm.models import load_checkpoint

    path = runs.dir(name) / "last.pth.tar"
    ckpt = load(path)
    raw, ema = ckpt["state_dict"], ckpt["state_dict_ema"]
    assert any(not torch.equal(raw[k], ema[k]) for k in float_keys(raw))
    for use_ema, expected in ((True, ema), (False, raw)):
        model = timm.create_model("test_resnet", num_classes=3)
        load_checkpoint(model, str(path), use_ema=use_ema)
        got = model.state_dict()
        assert got.keys() == expected.keys()
        for k in got:
            assert torch.equal(got[k], expected[k]), (use_ema, k)


def test_ema_shadow_is_the_arithmetic_average(runs):
    """After exactly one update the 0.9 shadow is init + 0.1 * (trained - init), tensor by tensor."""
    ckpt = load(runs.dir("onestep") / "last.pth.tar")
    assert ckpt["counters"]["num_updates"] == 1
    init, trained, shadow = initial_weights(), ckpt["state_dict"], ckpt["state_dict_ema"]
    assert init.keys() == trained.keys() == shadow.keys()
    moved = 0
    for k in trained:
        if not trained[k].is_floating_point():
            assert torch.equal(shadow[k], trained[k]), k  # integer buffers are copied
            continue
        expected = init[k].lerp(trained[k], 0.1)
        torch.testing.assert_close(shadow[k], expected, rtol=1e-6, atol=1e-7, msg=k)
        if not torch.equal(init[k], trained[k]):
            moved += 1
            assert not torch.equal(shadow[k], trained[k]), k
            assert not torch.equal(shadow[k], init[k]), k
    assert moved > 10  # the check above is not vacuous


def test_ema_horizons_order(runs):
    """Over 8 updates a 0.99 shadow is still mostly the initial weights; a 0.9 one has moved on."""
    ckpt = load(runs.dir("two") / "last.pth.tar")
    init, final = flat(initial_weights()), flat(ckpt["state_dict"])
    s90, s99 = flat(ckpt["state_dict_ema"]), flat(ckpt["state_dict_ema_1"])
    assert (s99 - init).norm() < (s99 - final).norm()
    assert (s90 - final).norm() < (s99 - final).norm()
    assert (s90 - init).norm() > (s99 - init).norm()


# ----------------------------------------------------------------------------- validate.py
def _check_validation(validations, name, row, prefix):
    proc, res = validations[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert res is not None
    assert res["top1"] == float(row[f"{prefix}eval_top1"])
    assert res["top5"] == float(row[f"{prefix}eval_top5"])
    assert res["loss"] == float(row[f"{prefix}eval_loss"])
    assert f"top1 {res['top1']:.4f}" in proc.stdout
    return res


def test_validate_reproduces_training_log(runs, validations):
    last = read_rows(runs.dir("ema"))[-1]
    raw = _check_validation(validations, "ema_raw", last, "raw_")
    ema = _check_validation(validations, "ema_ema", last, "")
    assert raw["weights"] == "raw" and ema["weights"].startswith("ema")
    assert raw["loss"] != ema["loss"]


def test_validate_picks_second_ema(runs, validations):
    last = read_rows(runs.dir("two"))[-1]
    by_decay = _check_validation(validations, "two_decay", last, "ema0.99_")
    by_index = _check_validation(validations, "two_index", last, "ema0.99_")
    assert by_decay == by_index
    assert "0.99" in by_decay["weights"]
    assert by_decay["loss"] != float(last["eval_loss"])  # not the first (0.9) shadow


# ----------------------------------------------------------------------------- YAML recipes
def test_config_file_with_command_line_override(runs):
    """Recipe says epochs 1, the command line says 2: two rows, and the recipe's other values
    train exactly as the same flags do."""
    rows = read_rows(runs.dir("config"))
    assert len(rows) == 2
    saved = yaml.safe_load((runs.dir("config") / "args.yaml").read_text())
    assert saved["epochs"] == 2 and saved["warmup_epochs"] == 0 and saved["batch_size"] == 16
    assert saved["model_ema_decay"] == [0.9]
    assert rows == read_rows(runs.dir("ema"))


def test_args_yaml_fed_back_as_config(runs):
    proc = runs.proc("refed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = runs.dir("refed")
    rows = read_rows(run_dir)
    assert len(rows) == 1
    # Epoch 0 of a 1-epoch run with the recorded settings is epoch 0 of the original run.
    assert rows[0] == read_rows(runs.dir("ema"))[0]
    original = yaml.safe_load((runs.dir("ema") / "args.yaml").read_text())
    again = yaml.safe_load((run_dir / "args.yaml").read_text())
    changed = {k for k in original.keys() | again.keys() if original.get(k) != again.get(k)}
    assert changed == {"epochs", "experiment", "output"}


def test_the_log_says_how_long_how_fast_and_what_remains(runs):
    proc = runs.proc("two")
    out = proc.stdout + proc.stderr
    # Each log interval (here the epoch's last step): loss, LR, rate, data wait, remaining time.
    assert re.search(r"^  train 0 \[(\d+)/\1\] loss \d+\.\d{4} lr \S+ \d+ img/s data \d+% eta \S+$",
                     out, re.M), out
    assert re.search(r"^epoch 0 \(1/2\) [\d.]+s, eta [\dms.]+ \| lr \S+ train_loss [\d.]+$", out,
                     re.M), out
    assert re.search(r"^epoch 1 \(2/2\) [\d.]+s \| lr ", out, re.M), out  # nothing remains
    assert re.search(r"^  ema 0\.9 +top1 ", out, re.M) and "epoch 0/" not in out
    assert re.search(r"^done in [\dms.]+: ", out, re.M)
    assert ", 2 epochs" in out
    one = runs.proc("onestep")
    assert ", 1 epoch\n" in one.stdout + one.stderr
