"""Bad dataset input through train.py and validate.py: one line, exit 2, no traceback, and no run
folder left for a later run to trip over (the readers' own checks: test_readers_bad_input.py)."""
from __future__ import annotations

import io
import shutil
import tarfile

import pytest
from conftest import run_in_process, tiny_args
from data_writers import corrupt_copy, write_shards

from ematrain.cli.train import main as train_main
from ematrain.cli.validate import main as validate_main

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")


@pytest.fixture(scope="module")
def bad(same_data, tmp_path_factory):
    """Shard folders with one shard missing, and with one member's image cut in half."""
    root = tmp_path_factory.mktemp("bad_shards")
    missing = root / "missing"
    shutil.copytree(same_data["shards"], missing)
    (missing / "train-000003.tar").unlink()
    corrupt = root / "corrupt"
    shutil.copytree(same_data["shards"], corrupt)
    first = corrupt / "train-000000.tar"
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(first, "w") as tar:
        for member, data in members:
            if member.name.endswith(".png"):
                data = corrupt_copy(data)
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    bare = root / "bare"  # no _info.json: no class list, no counts
    write_shards(same_data["folder"] / "train", bare, "train", per_shard=7, info=False)
    return {"missing": missing, "corrupt": corrupt, "bare": bare}


def wds(root, *extra, class_map=None) -> list:
    return ["--dataset", "wds/d", "--data-dir", root,
            *(["--class-map", class_map] if class_map else []), *extra]


def cases(same_data, bad, tmp_path) -> dict[str, tuple[list, str]]:
    classes = same_data["class_map"]
    ghost = tmp_path / "ghost.txt"
    ghost.write_text("class_0\nclass_1\nclass_9\n")
    return {
        "missing shard": (wds(bad["missing"], class_map=classes), "1 of 5 shard(s) missing"),
        "corrupt member": (wds(bad["corrupt"], class_map=classes), "--corrupt-samples skip"),
        "no label key": (wds(same_data["shards"], "--target-key", "nope", class_map=classes),
                         "'nope'"),
        "label outside the classes": (wds(same_data["shards"], "--num-classes", "2"),
                                      "outside the 2 classes"),
        "class map naming absent classes": ([same_data["folder"], "--class-map", ghost],
                                            "class_9"),
        "hfds split not there": (["--dataset", f"hfds/{same_data['hf_saved']}", "--val-split",
                                  "test"], "test"),
        "download needed": (["--dataset", "torch/cifar10", "--data-dir", tmp_path / "empty"],
                            "--dataset-download"),
        "split not there": (wds(same_data["shards"], "--val-split", "nope", class_map=classes),
                            "nope"),
        "no count, no --train-num-samples": (
            wds(bad["bare"], "--train-split", "train-{000000..000004}.tar", "--val-split",
                "train-{000000..000001}.tar", class_map=classes), "--train-num-samples"),
        "tfds": (["--dataset", "tfds/mnist", "--data-dir", tmp_path], "TensorFlow"),
        "unknown type": (["--dataset", "s3/x", "--data-dir", tmp_path], "unknown dataset type"),
        "mode": ([same_data["folder"], "--input-img-mode", "L"], "RGB"),
    }


CASES = ["missing shard", "corrupt member", "no label key", "label outside the classes",
         "class map naming absent classes", "hfds split not there", "download needed",
         "split not there", "no count, no --train-num-samples", "tfds", "unknown type", "mode"]


@pytest.mark.parametrize("case", CASES)
def test_bad_dataset_input_is_one_line_and_leaves_no_run_folder(same_data, bad, tmp_path, case):
    (tmp_path / "empty").mkdir()
    data, expected = cases(same_data, bad, tmp_path)[case]
    out = tmp_path / "out"
    # A damaged sample is met in a loader worker: its error comes back as one line too.
    workers = 2 if case == "corrupt member" else 0
    r = run_in_process(train_main, "train.py", *data, *tiny_args(workers=workers), "--output", out)
    # Found at start-up, or by the loader in the first epoch (after the start-up lines).
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert r.returncode == 2 and errors == lines[-1:], r.stderr[-3000:]
    assert lines[-1].startswith("train.py: error: ") and expected in lines[-1], lines[-1]
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_validate_py_says_a_bad_split_in_one_line(same_data, runs_checkpoint):
    r = run_in_process(validate_main, "validate.py", "--dataset", "wds/d", "--data-dir",
                       same_data["shards"], "--class-map", same_data["class_map"], "--split",
                       "nope", "--checkpoint", runs_checkpoint, "--img-size", "32")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--split nope" in lines[0], r.stderr


@pytest.fixture(scope="module")
def runs_checkpoint(tmp_path_factory):
    """timm's checkpoint of an untrained test_resnet with 3 classes."""
    import timm
    import torch
    path = tmp_path_factory.mktemp("bad_ckpt") / "model.pth.tar"
    model = timm.create_model("test_resnet", num_classes=3)
    torch.save({"arch": "test_resnet", "state_dict": model.state_dict()}, path)
    return path
