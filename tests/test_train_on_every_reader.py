"""train.py and validate.py on data kept as timm users keep it: webdataset shards (`--dataset
wds/`), a Hugging Face dataset saved to disk (`--dataset hfds/`) or streamed from parquet files
(`hfids/`), a tar of images, with the EMA (and post-hoc EMA) on; validate.py's numbers equal the
log's; resume of a stream is exact at an epoch's end and
mid-epoch; timm's args.yaml with a dataset runs; a stream of unknown length is refused in one
line when the run needs its epoch length."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, run_in_process, tiny_args, torch_threads
from data_writers import write_shards

from ematrain.cli.train import main as train_main
from ematrain.cli.validate import main as validate_main

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")
EMA = ("--model-ema", "--model-ema-decay", "0.9")
POSTHOC = ("--model-ema-posthoc", "--model-ema-snapshot-every", "3it")


def wds(same_data) -> list[str]:
    return ["--dataset", "wds/same", "--data-dir", same_data["shards"], "--class-map",
            same_data["class_map"]]


def hfds(same_data) -> list[str]:
    return ["--dataset", f"hfds/{same_data['hf_saved']}"]


READERS = {"wds": wds, "hfds": hfds,
           "hfids": lambda same_data: ["--dataset", f"hfids/{same_data['parquet']}"],
           "tar": lambda same_data: ["--data-dir", same_data["tars"]]}


def train(out: Path, name: str, data: list, *extra, epochs: int = 2, workers: int = 0):
    r = run_in_process(train_main, "train.py", *data,
                       *tiny_args(*extra, epochs=epochs, workers=workers),
                       "--output", out, "--experiment", name)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / name, r


def validate(data: list, checkpoint: Path, *extra) -> dict:
    results = checkpoint.parent / f"results-{checkpoint.stem}-{len(extra)}.json"
    r = run_in_process(validate_main, "validate.py", *data, "--checkpoint", checkpoint,
                       "--results-file", results, "-b", "4", "-j", "0", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(results.read_text())


def rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "summary.csv")))


@pytest.fixture(scope="module")
def runs(same_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream_runs")
    with torch_threads(1):  # as the tests' validate.py runs score (one_thread_no_plots)
        return {name: train(out, name, data(same_data), *EMA,
                            *(POSTHOC if name in ("wds", "hfds") else ()))[0]
                for name, data in READERS.items()}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_run_on_the_reader_trains_both_weight_sets_and_validate_py_equals_the_log(
        runs, same_data, reader):
    run_dir = runs[reader]
    summary = rows(run_dir)
    assert [r["epoch"] for r in summary] == ["0", "1"]
    assert float(summary[-1]["raw_eval_top1"]) > 60.0  # 3 classes: chance is 33.3 %
    for name in ("last.pth.tar", "model_best.pth.tar", "args.yaml"):
        assert (run_dir / name).is_file()
    if reader in ("wds", "hfds"):
        assert len(list((run_dir / "posthoc").glob("*.pt*"))) >= 2
    recorded = yaml.safe_load((run_dir / "args.yaml").read_text())
    assert recorded["dataset"] == ("" if reader == "tar" else READERS[reader](same_data)[1])
    assert recorded["val_split"] == "validation"
    data = READERS[reader](same_data)
    last = run_dir / "last.pth.tar"
    for prefix, extra in (("raw_", ()), ("", ("--use-ema",))):
        res = validate(data, last, *extra)
        assert res["count"] == 15
        for metric in ("top1", "top5", "loss"):
            assert res[metric] == float(summary[-1][f"{prefix}eval_{metric}"]), (prefix, metric)


def test_validate_py_reads_a_tar_root_as_its_split(runs, same_data):
    """A .tar as the data root is the split itself (validate.py; train.py needs two)."""
    summary = rows(runs["tar"])
    res = validate([same_data["tars"] / "val.tar"], runs["tar"] / "last.pth.tar", "--use-ema")
    assert res["count"] == 15 and res["top1"] == float(summary[-1]["eval_top1"])


def test_args_yaml_records_a_local_dataset_folder_as_an_absolute_path(same_data, tmp_path,
                                                                       monkeypatch):
    """`-c args.yaml` and `--resume` work from any directory."""
    monkeypatch.chdir(same_data["root"])
    run_dir, _ = train(tmp_path, "rel", ["--dataset", "hfds/hf_saved"], epochs=1)
    recorded = yaml.safe_load((run_dir / "args.yaml").read_text())
    assert recorded["dataset"] == f"hfds/{same_data['hf_saved'].resolve()}"


def test_validate_py_posthoc_sweeps_a_stream_run(runs, same_data):
    r = run_in_process(validate_main, "validate.py", *wds(same_data), "--posthoc", runs["wds"],
                       "-b", "4", "-j", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (runs["wds"] / "posthoc.csv").is_file() and "15 images" in r.stdout


def test_the_same_weights_score_the_same_on_the_folder_its_shards_and_its_hf_dataset(
        runs, same_data):
    last = runs["wds"] / "last.pth.tar"
    folder = validate([same_data["folder"]], last)
    for data in (wds(same_data), hfds(same_data)):
        res = validate(data, last)
        assert res["count"] == folder["count"] == 15 and res["top1"] == folder["top1"]
        assert res["loss"] == pytest.approx(folder["loss"], rel=1e-5)  # summed in another order


def weights(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {"raw": ckpt["state_dict"], "ema": ckpt["state_dict_ema"], "epoch": ckpt["epoch"]}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa["epoch"] == wb["epoch"]
    for key in ("raw", "ema"):
        assert wa[key].keys() == wb[key].keys()
        for name in wa[key]:
            assert torch.equal(wa[key][name], wb[key][name]), (key, name)


def test_a_stream_resumed_at_an_epoch_end_is_bit_identical(runs, same_data, tmp_path):
    with torch_threads(1):  # as the runs fixture trained the whole run
        first, _ = train(tmp_path, "first", wds(same_data), *EMA, *POSTHOC, epochs=1)
        r = run_in_process(train_main, "train.py", "--resume", first / "last.pth.tar",
                           "--epochs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(runs["wds"] / "last.pth.tar", first / "last.pth.tar")


class StopAfter:
    """A stop request that comes after `n` polls (one per optimizer update)."""
    exit_code = 130

    def __init__(self, n: int):
        self.n = n

    def __call__(self) -> bool:
        self.n -= 1
        return self.n < 0


def test_a_stream_stopped_mid_epoch_resumes_bit_identical(same_data, tmp_path, workers=2):
    """Stopped a few steps into an epoch of 7, the run saves where each of its 2 loader workers
    stands in its shards; resumed, the rest of the epoch and the next are the uninterrupted
    run's (one reader, -j 0: tests/test_stream_order_and_resume.py; under torchrun:
    tests/test_distributed_streams.py)."""
    from conftest import make_training
    whole, _ = train(tmp_path, "whole", wds(same_data), *EMA, workers=workers)
    argv = [*wds(same_data), *tiny_args(*EMA, epochs=2, workers=workers), "--output", tmp_path,
            "--experiment", "cut"]
    tr = make_training(argv)
    tr.open_folder()
    try:
        assert tr.run_epoch(0, StopAfter(3)) == StopAfter.exit_code
    finally:
        tr.run.data.close()
        tr.folder.close()
    cut = tmp_path / "cut"
    state = torch.load(cut / "last.pth.tar", map_location="cpu", weights_only=True)
    step = state["counters"]["epoch_step"]
    assert 0 < step < 7 and state["data_stream"]["batches"] == step
    # Other readers cannot take the workers' positions: refused before the run folder is touched.
    before = {p.name: p.stat().st_mtime_ns for p in cut.iterdir()}
    r = run_in_process(train_main, "train.py", "--resume", cut / "last.pth.tar", "-j", "1")
    lines = r.stderr.strip().splitlines()  # the resume's notice of the new -j, then the error
    assert r.returncode == 2 and [l for l in lines if "error" in l] == lines[-1:], r.stderr
    assert "1 process(es) x 2 loader worker(s), now 1 x 1" in lines[-1], lines[-1]
    assert {p.name: p.stat().st_mtime_ns for p in cut.iterdir()} == before
    r = run_in_process(train_main, "train.py", "--resume", cut / "last.pth.tar")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(whole / "last.pth.tar", cut / "last.pth.tar")


def test_timms_args_yaml_with_a_wds_dataset_runs(same_data, tmp_path):
    recipe = yaml.safe_load((REPO_ROOT / "tests" / "fixtures" / "timm_args.yaml").read_text())
    recipe.update(dataset="wds/same", data_dir=str(same_data["shards"]),
                  class_map=str(same_data["class_map"]), val_split="val", device="cpu")
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir, r = train(tmp_path, "timm", ["-c", path], epochs=1)
    assert "5 shards over 1 process(es)" in r.stderr + r.stdout
    assert [row["epoch"] for row in rows(run_dir)] == ["0"]


def test_a_stream_of_unknown_length_is_refused_in_one_line_without_train_num_samples(
        same_data, tmp_path):
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        write_shards(same_data["folder"] / split, shards, split, per_shard=7, info=False)
    data = ["--dataset", "wds/bare", "--data-dir", shards, "--class-map", same_data["class_map"],
            "--train-split", "train-{000000..000004}.tar", "--val-split",
            "val-{000000..000002}.tar"]
    r = run_in_process(train_main, "train.py", *data, *tiny_args(
        "--model-ema", "--model-ema-half-life", "2ep"), "--output", tmp_path / "out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--train-num-samples" in lines[0], r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    run_dir, _ = train(tmp_path, "given", [*data, "--train-num-samples", "30"], "--model-ema",
                       "--model-ema-half-life", "2ep", epochs=1)
    assert rows(run_dir)[0]["epoch"] == "0"
