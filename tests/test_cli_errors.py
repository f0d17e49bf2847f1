"""train.py refuses bad data layouts, flags and recipes with exit code 2 and one line on stderr,
before it creates anything in the output folder.

All cases run once in a module fixture; each test asserts on one of them. Most run in-process
through ``ematrain.cli.train.main(argv)`` (captured as a process would be: see
``conftest.run_in_process``); a few run the real ``train.py`` script in a subprocess, concurrently,
to show the entry point behaves the same at the process level (no traceback, one line).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from conftest import make_imagefolder, run_cli, run_in_process, run_jobs, tiny_args, torch_threads

from ematrain.cli import train
from ematrain.settings.train_specs import train_settings
from ematrain.util.errors import UserError

COMMON = tiny_args(batch=16)

# Cases run as `python train.py ...`: a refusal before any data is read (pays the full import
# at the process level, so import-time warnings would show) and a failure inside forked
# DataLoader workers (which an in-process run must not fork from the test process).
SUBPROCESS = ("corrupt_image_workers", "missing_root")


def run_all(jobs: dict) -> dict:
    return run_jobs(jobs, as_process=SUBPROCESS)


def small_tree(root: Path, **kw) -> Path:
    return make_imagefolder(root, train_per_class=4, val_per_class=2, **kw)


class Case:
    def __init__(self, data, args=(), expect=(), rc=2):
        self.data, self.args, self.expect, self.rc = data, list(args), list(expect), rc


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("config_errors")
    good = small_tree(base / "good")

    no_val = small_tree(base / "no_val", splits=("train",))
    validation = small_tree(base / "validation", splits=("train", "validation"))

    empty_split = small_tree(base / "empty_split", splits=("train",))
    for c in range(3):
        (empty_split / "val" / f"class_{c}").mkdir(parents=True)

    empty_class = small_tree(base / "empty_class")
    for split in ("train", "val"):
        (empty_class / split / "class_9").mkdir()

    mismatch = small_tree(base / "mismatch")
    (mismatch / "val" / "class_2").rename(mismatch / "val" / "class_x")

    corrupt = small_tree(base / "corrupt")
    (corrupt / "train" / "class_1" / "0001.png").write_bytes(b"\x00garbage, not a PNG" * 20)

    unknown_key = base / "unknown_key.yaml"
    unknown_key.write_text("model: test_resnet\nepochs: 1\nbogus_key: 3\n")
    bad_yaml = base / "bad_yaml.yaml"
    bad_yaml.write_text("model: [test_resnet\n  epochs: 1\n")
    scalar_decay = base / "scalar_decay.yaml"
    # timm's own recipes spell a single decay as a scalar.
    scalar_decay.write_text("model_ema: true\nmodel_ema_decay: 0.9\n")

    table = {
        "missing_root": Case(base / "no_such_root", expect=["not found", "no_such_root"]),
        "missing_split": Case(no_val, expect=["val", "not found"]),
        "validation_alias": Case(validation, rc=0),
        "empty_split": Case(empty_split, expect=["val", "no images"]),
        "empty_class_folder": Case(empty_class, expect=["class_9", "no images"]),
        "class_mismatch": Case(mismatch, expect=["class_2", "class_x"]),
        "unknown_model": Case(good, ["--model", "test_resnt"], expect=["test_resnt", "test_resnet"]),
        "unknown_config_key": Case(good, ["-c", unknown_key], expect=["bogus_key"]),
        "bad_yaml": Case(good, ["-c", bad_yaml], expect=["yaml", "bad_yaml.yaml"]),
        "decay_out_of_range": Case(good, ["--model-ema-decay", "1.5"],
                                   expect=["--model-ema-decay", "1.5"]),
        "decay_and_half_life": Case(good, ["--model-ema-decay", "0.9", "--model-ema-half-life", "2ep"],
                                    expect=["--model-ema-decay", "--model-ema-half-life"]),
        "unknown_ema_schedule": Case(good, ["--model-ema-schedule", "cosine"],
                                     expect=["--model-ema-schedule", "cosine", "debias"]),
        "power_with_a_decay": Case(good, ["--model-ema-schedule", "power", "--model-ema-decay",
                                          "0.9"], expect=["power", "--model-ema-sigma-rel"]),
        "warmup_and_debias": Case(good, ["--model-ema-warmup", "--model-ema-schedule", "debias"],
                                  expect=["--model-ema-warmup", "debias"]),
        "sigma_rel_too_wide": Case(good, ["--model-ema-sigma-rel", "0.5"],
                                   expect=["--model-ema-sigma-rel", "0.5"]),
        "bn_batches_0": Case(good, ["--model-ema-bn", "recalibrate", "--model-ema-bn-batches",
                                    "0"], expect=["--model-ema-bn-batches", "0"]),
        "batch_size_0": Case(good, ["-b", "0"], expect=["batch", "0"]),
        "epochs_0": Case(good, ["--epochs", "0"], expect=["epochs", "0"]),
        "workers_negative": Case(good, ["-j", "-1"], expect=["workers", "-1"]),
        "num_classes_mismatch": Case(good, ["--num-classes", "7"], expect=["7", "3"]),
        "corrupt_image": Case(corrupt, expect=["0001.png"]),
        "corrupt_image_workers": Case(corrupt, ["-j", "2"], expect=["0001.png"]),
        # Bugs found while writing these tests, fixed since: kept as regression cases.
        "yaml_scalar_decay": Case(good, ["-c", scalar_decay]),
        "img_size_0": Case(good, ["--img-size", "0"], expect=["size"]),
        "smoothing_out_of_range": Case(good, ["--smoothing", "1.5"], expect=["smoothing"]),
    }
    jobs = {}
    for name, case in table.items():
        case.out = base / "out" / name
        case.argv = [case.data, *COMMON, *case.args, "--output", case.out, "--experiment", name]
        jobs[name] = ("train.py", case.argv)
    procs = run_all(jobs)
    for name, case in table.items():
        case.proc = procs[name]
    return table


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def assert_refused_up_front(case: Case) -> None:
    proc = case.proc
    assert proc.returncode == case.rc, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = nonempty_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("train.py: error: ")
    for word in case.expect:
        assert word.lower() in line.lower(), (word, line)
    assert files_under(case.out) == []


REFUSED = ["missing_root", "missing_split", "empty_split", "empty_class_folder", "class_mismatch",
           "unknown_model", "unknown_config_key", "bad_yaml", "decay_out_of_range",
           "decay_and_half_life", "batch_size_0", "epochs_0", "workers_negative",
           "num_classes_mismatch"]


@pytest.mark.parametrize("name", REFUSED)
def test_refused_with_one_line(cases, name):
    assert_refused_up_front(cases[name])


def test_in_process_run_matches_the_script(cases, tmp_path):
    """The in-process runner reports what `python train.py` reports (so the other cases hold for
    the script too): same exit code, same stdout, same stderr."""
    case = cases["missing_root"]
    assert "missing_root" in SUBPROCESS
    with torch_threads(1):
        here = run_in_process(train.main, "train.py", *case.argv)
    assert (here.returncode, here.stdout, here.stderr) == (
        case.proc.returncode, case.proc.stdout, case.proc.stderr)


def test_unknown_model_suggests_close_names(cases):
    line = cases["unknown_model"].proc.stderr.strip()
    # The suggestion comes after the bad name, not just an echo of it.
    assert line.index("test_resnet") > line.index("test_resnt")


def test_validation_folder_accepted_for_val(cases):
    case = cases["validation_alias"]
    assert case.proc.returncode == 0, case.proc.stderr[-2000:]
    run_dir = case.out / "validation_alias"
    with open(run_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0"]
    assert 0.0 <= float(rows[0]["eval_top1"]) <= 100.0  # validated on the 'validation' folder
    assert (run_dir / "last.pth.tar").is_file()


@pytest.mark.parametrize("name", ["corrupt_image", "corrupt_image_workers"])
def test_corrupt_image_named(cases, name):
    """A corrupt image is found only when it is read, mid-epoch: still one error line naming it."""
    case = cases[name]
    proc = case.proc
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in nonempty_lines(proc.stderr) if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("train.py: error: ")
    assert "class_1" in errors[0] and "0001.png" in errors[0]
    # Nothing half-done: the run folder that never got a checkpoint is gone again.
    assert files_under(case.out) == [], files_under(case.out)


def test_yaml_scalar_for_list_flag(cases):
    proc = cases["yaml_scalar_decay"].proc
    assert "Traceback" not in proc.stderr
    if proc.returncode == 2:  # refusing with one line would be acceptable too
        assert len(nonempty_lines(proc.stderr)) == 1
        assert "model_ema_decay" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        run_dir = cases["yaml_scalar_decay"].out / "yaml_scalar_decay"
        with open(run_dir / "summary.csv", newline="") as f:
            assert {"eval_top1", "raw_eval_top1"} <= set(next(csv.reader(f)))


def test_img_size_zero_refused(cases):
    assert_refused_up_front(cases["img_size_0"])


def test_smoothing_out_of_range_refused(cases):
    assert_refused_up_front(cases["smoothing_out_of_range"])


@pytest.mark.parametrize("flags,message", [
    (["--aa", "bogus"], "cannot build the training augmentation (--aa bogus"),
    (["--gp", "bogus"], "cannot create model 'test_resnet': Invalid pool type: bogus"),
])
def test_bad_augmentation_and_pool_names_are_one_line(tmp_path, flags, message):
    data = make_imagefolder(tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1)
    r = run_cli("train.py", data, "--model", "test_resnet", "--img-size", "32", "-b", "2", "-j", "0",
                "--output", tmp_path / "out", *flags)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert message in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--model-ema-every", "0"], "--model-ema-every must be >= 1, got 0"),
    (["--cutmix-minmax", "0.9", "0.1"],
     "--cutmix-minmax takes MIN MAX with 0 < MIN < MAX <= 1, got 0.9 0.1"),
    (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    (["--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),
    (["--weight-decay=-inf"], "argument --weight-decay: expected a finite number, got '-inf'"),
    (["--model-ema-decay", "nan"], "argument --model-ema-decay: expected a finite number"),
    (["--model-ema-half-life", "1e309it"], "bad half-life '1e309it': must be a positive finite"),
    (["--img-size", "100000"], "--img-size must be between 1 and 4096 pixels, got 100000"),
    (["--input-size", "3", "64", "9000"], "--input-size must be between 1 and 4096 pixels"),
])
def test_bad_values_are_named_by_their_flag(tmp_path, flags, message):
    with pytest.raises(UserError) as err:
        train_settings([str(tmp_path), *flags])
    assert message in str(err.value)


@pytest.mark.parametrize("half_life,word", [("1e20it", "long"), ("1e-300it", "short")])
def test_a_half_life_no_decay_can_express_is_one_line(tmp_path, half_life, word):
    data = small_tree(tmp_path / "d")
    with torch_threads(1):
        r = run_in_process(train.main, "train.py", data, *COMMON, "--model-ema-half-life",
                           half_life, "--output", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert nonempty_lines(r.stderr) == [
        f"train.py: error: --model-ema-half-life {half_life} is "
        f"{float(half_life[:-2]):.3g} optimizer steps, too {word} for a decay in (0, 1)"]
    assert files_under(tmp_path / "out") == []


# ----------------------------------------------------------------------------- data trees
def run_tiny(tmp_path, data, *flags):
    with torch_threads(1):
        return run_in_process(train.main, "train.py", data, *COMMON, "--output", tmp_path / "out",
                              "--experiment", "e", *flags)


def assert_one_error_line(r, *words):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in nonempty_lines(r.stderr) if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("train.py: error: "), r.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])


def test_a_folder_link_loop_is_refused_not_multiplied(tmp_path):
    data = small_tree(tmp_path / "d")
    (data / "train" / "class_0" / "loop").symlink_to("..")
    r = run_tiny(tmp_path, data)
    assert_one_error_line(r, "leads back to", "loop")
    assert files_under(tmp_path / "out") in ([], ["train"])


def test_a_class_folder_that_is_a_link_is_followed(tmp_path):
    data = small_tree(tmp_path / "d")
    elsewhere = tmp_path / "elsewhere"
    (data / "train" / "class_2").rename(elsewhere)
    (data / "train" / "class_2").symlink_to(elsewhere)
    r = run_tiny(tmp_path, data)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "12 train / 6 val images" in r.stderr


def _png_header_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_one_line_naming_it(tmp_path):
    data = small_tree(tmp_path / "d")
    (data / "train" / "class_1" / "0001.png").write_bytes(_png_header_claiming(100000, 100000))
    r = run_tiny(tmp_path, data)
    assert_one_error_line(r, "0001.png", "decompression bomb")


def test_hidden_files_and_folders_are_skipped_and_counted(tmp_path):
    data = small_tree(tmp_path / "d")
    notebook = data / "train" / ".ipynb_checkpoints"
    notebook.mkdir()
    (notebook / "x.png").write_bytes((data / "train/class_0/0000.png").read_bytes())
    (data / "train" / "class_0" / "._0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (data / "train" / "class_1" / ".hidden.png").write_bytes(
        (data / "train/class_1/0000.png").read_bytes())
    r = run_tiny(tmp_path, data)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "12 train / 6 val images, 3 classes" in r.stderr
    assert "skipped 3 hidden file(s) and folder(s)" in r.stderr


def test_an_unreadable_folder_is_named_with_its_reason(tmp_path, monkeypatch):
    from ematrain.data import folders as data_mod
    data = small_tree(tmp_path / "d")
    locked = data / "train" / "class_1"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root reads anyway: let the folder refuse as it would
            scandir = os.scandir
            def refusing_scandir(path="."):
                if Path(path) == locked:
                    raise PermissionError(13, "Permission denied", str(locked))
                return scandir(path)
            monkeypatch.setattr(data_mod.os, "scandir", refusing_scandir)
        with pytest.raises(UserError, match=f"cannot read folder {locked}: permission denied"):
            data_mod.load_image_folder(data / "train")
    finally:
        locked.chmod(0o755)


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    recipe = tmp_path / "b.yaml"
    recipe.write_bytes(b"\xff\xfe\x00x")
    r = run_tiny(tmp_path, small_tree(tmp_path / "d"), "-c", recipe)
    assert_one_error_line(r, "b.yaml", "not UTF-8")


def test_a_loss_that_is_nan_before_any_checkpoint_names_no_file(tmp_path):
    with torch_threads(1):
        r = run_in_process(train.main, "train.py", small_tree(tmp_path / "d"), *COMMON, "-b", "4",
                           "--lr", "1e30", "--log-interval", "1", "--output", tmp_path / "out")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "non-finite loss at epoch 0" in r.stderr
    assert "no checkpoint was saved before it" in r.stderr and "last.pth.tar" not in r.stderr
    assert files_under(tmp_path / "out") in ([], ["train"])
