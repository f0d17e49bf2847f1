"""validate.py --posthoc's selection protocol: the best weight set is chosen on some images and
its figure reported on others (--select-split, --select-fraction), the report part scores the
pick beside the raw weights and the tracked EMAs, the figures are the ones validate.py gives the
saved files on those images, and posthoc.csv and the best file record the protocol."""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from conftest import make_imagefolder, run_in_process, tiny_args, torch_threads

from ematrain.checkpoint import files as ckpt_files
from ematrain.cli import train, validate
from ematrain.data.folders import load_image_folder
from ematrain.posthoc import selection, sweep
from ematrain.run import curves

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")

TINY = tiny_args("--seed", "5", batch=8, epochs=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("select") / "data", num_classes=3,
                            train_per_class=16, val_per_class=8,
                            splits=("train", "val", "holdout"))


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    """2 epochs of 6 steps, a regular EMA 0.9 and power EMAs 0.05 0.10 snapshotted every 3
    steps (4 snapshots)."""
    out = tmp_path_factory.mktemp("select_run")
    with torch_threads(1), pytest.MonkeyPatch.context() as mp:
        mp.setattr(curves.CurveRenderer, "submit", lambda *a, **k: None)
        r = run_in_process(train.main, "train.py", data, *TINY, "--model-ema-decay", "0.9",
                           "--model-ema-posthoc",
                           "--model-ema-snapshot-every", "3it", "--output", out,
                           "--experiment", "r")
    assert r.returncode == 0, r.stderr
    return out / "r"


def sweep_copy(run_dir, tmp_path, data, *flags, monkeypatch=None):
    """The sweep of a copy of the run (each test its own outputs), with the image indices each
    scoring pass was given recorded."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    passes = []
    if monkeypatch is not None:
        original = validate.split_loader

        def recording(s, info, dataset, ckpt, data_config, device, indices=None, **kwargs):
            passes.append((dataset.root, None if indices is None else list(indices)))
            return original(s, info, dataset, ckpt, data_config, device, indices=indices,
                            **kwargs)
        monkeypatch.setattr(validate, "split_loader", recording)
    r = run_in_process(validate.main, "validate.py", data, "--posthoc", copy, "-j", "0",
                       "--sigma-rel", "0.03", "0.08", "0.2", *flags)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(copy / sweep.CSV)))
    return copy, r, rows, passes


def scored(data_root, ckpt, *flags) -> dict:
    """validate.py's own figures for a file on a data root (its val split)."""
    r = run_in_process(validate.main, "validate.py", data_root, "--checkpoint", ckpt, "-j", "0",
                       *flags)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if " top1 " in x)
    words = line.split()
    return {k: float(words[words.index(k) + 1]) for k in ("top1", "top5", "loss")}


def tree_of(dataset, indices, root):
    """An ImageFolder tree (its val split) of some of a split's images, in their classes."""
    for i in indices:
        path, target = dataset.samples[i]
        folder = root / "val" / dataset.classes[target]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder)
    return root


def test_a_fraction_chooses_on_one_stratified_part_and_reports_on_the_rest(
        run_dir, data, tmp_path, monkeypatch):
    copy, r, rows, passes = sweep_copy(run_dir, tmp_path, data, "--select-fraction", "0.5",
                                       monkeypatch=monkeypatch)
    # Two scoring passes over the val split: the choice's images, then disjoint ones.
    assert [p[0] for p in passes] == [str(data / "val")] * 2
    chose, reported = (set(p[1]) for p in passes)
    assert not chose & reported and len(chose | reported) == 24
    val = load_image_folder(data / "val")
    assert sorted(np.bincount([val.targets[i] for i in chose])) == [4, 4, 4]
    want = selection.stratified_parts(val.targets, 0.5, 0)
    assert (sorted(chose), sorted(reported)) == (list(want[0]), list(want[1]))
    # Both tables, the report one labelled; the csv holds both, the pick marked in each.
    assert "SELECTION: " in r.stdout and "REPORT: " in r.stdout
    assert sum(x.endswith("<- the pick, reported") and x.startswith("report ")
               for x in r.stdout.splitlines()) == 1
    select = [x for x in rows if x["part"] == "selection"]
    report = [x for x in rows if x["part"] == "report"]
    assert len(select) == 1 + 1 + 2 + 3
    assert [x["kind"] for x in report] == ["raw", "ema", "tracked", "tracked", "power"]
    assert report[1]["weights"] == "ema 0.9"
    assert {x["images"] for x in select} == {"12"} and {x["images"] for x in report} == {"12"}
    pick = next(x for x in select if x["chosen"] == "1")
    assert report[-1]["weights"] == pick["weights"] and report[-1]["chosen"] == "1"
    # The report figures are validate.py's on exactly the report images.
    best = ckpt_files.load_file(copy / sweep.BEST)["posthoc"]
    assert best["protocol"]["mode"] == "fraction" and best["protocol"]["fraction"] == 0.5
    assert best["selection"]["images"] == best["report"]["images"] == 12
    alone = tree_of(val, sorted(reported), tmp_path / "reported")
    got = scored(alone, copy / sweep.BEST, "--use-ema")
    assert got["top1"] == pytest.approx(best["report"]["top1"], abs=5e-5)
    assert got["loss"] == pytest.approx(best["report"]["loss"], abs=5e-5)
    assert best["top1"] == best["report"]["top1"]  # the figure to report
    raw = scored(alone, copy / "last.pth.tar")
    assert f"{raw['top1']:.4f}" == report[0]["top1"]
    ema = scored(alone, copy / "last.pth.tar", "--use-ema")
    assert f"{ema['top1']:.4f}" == report[1]["top1"]


def test_a_select_split_chooses_there_and_reports_on_split(run_dir, data, tmp_path,
                                                           monkeypatch):
    copy, r, rows, passes = sweep_copy(run_dir, tmp_path, data, "--select-split", "holdout",
                                       "--select-metric", "loss", monkeypatch=monkeypatch)
    assert passes == [(str(data / "holdout"), None), (str(data / "val"), None)]
    select = [x for x in rows if x["part"] == "selection"]
    assert {x["split"] for x in select} == {"holdout"}
    assert {x["split"] for x in rows if x["part"] == "report"} == {"val"}
    # By loss: the lowest of the reconstructions on the selection part.
    candidates = [x for x in select if x["kind"] in ("power", "exp")]
    pick = next(x for x in select if x["chosen"] == "1")
    assert float(pick["loss"]) == min(float(x["loss"]) for x in candidates)
    assert {x["select_metric"] for x in rows} == {"loss"}
    assert "the best (lowest loss) is chosen here" in r.stdout
    best = ckpt_files.load_file(copy / sweep.BEST)["posthoc"]
    assert best["protocol"] == {**best["protocol"], "mode": "split", "select_split": "holdout",
                                "report_split": "val", "metric": "loss"}
    assert best["target"] == pick["weights"]
    got = scored(data, copy / sweep.BEST, "--use-ema")
    assert got["top1"] == pytest.approx(best["report"]["top1"], abs=5e-5)
    on_holdout = scored(data, copy / sweep.BEST, "--use-ema", "--split", "holdout")
    assert on_holdout["loss"] == pytest.approx(best["selection"]["loss"], abs=5e-5)


def test_without_a_protocol_the_table_says_the_choice_saw_the_same_images(run_dir, data,
                                                                           tmp_path):
    copy, r, rows, _ = sweep_copy(run_dir, tmp_path, data)
    assert "is chosen on these same images, so its figure is optimistic" in r.stdout
    assert "highest top1, ties: lower loss" in r.stdout
    assert list(rows[0]) == sweep.CSV_COLUMNS
    assert {x["part"] for x in rows} == {"same"} and len(rows) == 1 + 1 + 2 + 3
    best = ckpt_files.load_file(copy / sweep.BEST)["posthoc"]
    assert best["protocol"]["mode"] == "same" and best["report"] is None
    # Highest top-1, ties broken by the lower loss.
    candidates = [x for x in rows if x["kind"] == "power"]
    top = max(float(x["top1"]) for x in candidates)
    tied = [x for x in candidates if float(x["top1"]) == top]
    assert best["target"] == min(tied, key=lambda x: float(x["loss"]))["weights"]


def test_stratified_parts_are_seeded_disjoint_and_cover_the_split():
    targets = [0] * 10 + [1] * 5 + [2] * 7
    a, b = selection.stratified_parts(targets, 0.4, 3)
    assert set(a).isdisjoint(b) and sorted([*a, *b]) == list(range(22))
    assert list(np.bincount(np.asarray(targets)[a])) == [4, 2, 3]
    again = selection.stratified_parts(targets, 0.4, 3)
    other = selection.stratified_parts(targets, 0.4, 4)
    assert list(again[0]) == list(a) and list(other[0]) != list(a)


def test_ties_go_to_the_lower_loss():
    results = [{"top1": 50.0, "top5": 90.0, "loss": 1.0}, {"top1": 60.0, "top5": 90.0, "loss": 2.0},
               {"top1": 60.0, "top5": 80.0, "loss": 1.5}]
    assert selection.best_index(results, [0, 1, 2], "top1") == 2
    assert selection.best_index(results, [0, 1, 2], "top5") == 0
    assert selection.best_index(results, [0, 1, 2], "loss") == 0
    assert selection.best_index(results, [0, 1], "top1") == 1


@pytest.mark.parametrize("flags,text", [
    (["--select-fraction", "0"], "--select-fraction is the part of --split that chooses, in (0, 1)"),
    (["--select-fraction", "1"], "in (0, 1), got 1"),
    (["--select-fraction", "nan"], "--select-fraction: expected a finite number"),
    (["--select-fraction", "0.05"], "--select-fraction 0.05 leaves class class_0 (8 image(s)) "
                                    "with no image in the selection part"),
    (["--select-fraction", "0.97"], "with no image in the report part"),
    (["--select-split", "nope"], "split 'nope' not found"),
    (["--select-split", "val"], "--select-split val is "),
    (["--split", "val", "--select-split", "val"], "--select-split val is the --split that is reported"),
    (["--select-split", "validation"], "--select-split validation is the --split that is reported"),
    (["--split", "val", "--select-split", "validation"], "/val, the split that is reported"),
    (["--select-split", "holdout", "--select-fraction", "0.5"], "give one"),
    (["--select-metric", "top3"], "--select-metric: invalid choice"),
    (["--select-seed", "-1"], "--select-seed must be >= 0"),
])
def test_bad_selections_are_one_line_before_any_work(run_dir, data, tmp_path, flags, text):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    r = run_in_process(validate.main, "validate.py", data, "--posthoc", copy, "-j", "0", *flags)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (copy / sweep.CSV).exists() and not (copy / sweep.BEST).exists()


def test_select_flags_need_posthoc(data):
    r = run_in_process(validate.main, "validate.py", data, "--checkpoint", "x",
                       "--select-fraction", "0.5")
    assert r.returncode == 2 and "--select-fraction choose(s) among --posthoc's" in r.stderr


def test_the_demo_prints_the_picks_report_figure_beside_its_selection_figure(run_dir, data,
                                                                             tmp_path, capsys):
    from ematrain.cli import demo
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert demo._posthoc(data, copy, 0) == 0
    out = capsys.readouterr().out
    best = ckpt_files.load_file(copy / sweep.BEST)["posthoc"]
    assert f"post-hoc EMA pick: {best['target']} " in out
    assert f"on the half that chose it:    {best['selection']['top1']:6.2f} (selection" in out
    assert f"on the other half:            {best['report']['top1']:6.2f} (report)" in out
    assert "raw " in out.split("beside it:")[1] and "ema 0.9 " in out.split("beside it:")[1]


def test_a_streaming_split_is_refused_a_selection(run_dir, data, tmp_path):
    """A stream's loader reads --split's shards in its own order: no fixed images to divide."""
    from data_writers import write_class_map, write_shards
    shards = tmp_path / "shards"
    for split in ("val", "holdout"):
        write_shards(data / split, shards, split, per_shard=8)
    classes = write_class_map([f"class_{i}" for i in range(3)], tmp_path / "classes.txt")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    r = run_in_process(validate.main, "validate.py", "--dataset", "wds/d", "--data-dir", shards,
                       "--class-map", classes, "--split", "val", "--posthoc", copy, "-j", "0",
                       "--select-split", "holdout")
    assert r.returncode == 2, r.stderr
    assert "need a map-style split" in r.stderr and "Traceback" not in r.stderr, r.stderr
