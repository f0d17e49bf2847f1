"""validate.py refuses what it cannot do before any of its work, in one line with exit code 2: a
--sigma-rel no profile has, a --crop-pct that resizes to millions of pixels, a snapshot series
mixed from runs of different networks, a run folder the sweep's files cannot be written to."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import make_imagefolder, run_in_process, tiny_args, torch_threads

from ematrain.cli import train, validate
from ematrain.posthoc import series
from ematrain.posthoc import sweep as posthoc_sweep

TRAIN = tiny_args("--model-ema-posthoc")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two post-hoc runs on trees of 3 and of 4 classes (3 and 4 snapshots)."""
    base = tmp_path_factory.mktemp("posthoc_refusals")
    made = {}
    for classes in (3, 4):
        data = make_imagefolder(base / f"data{classes}", num_classes=classes, train_per_class=4,
                                val_per_class=2)
        with torch_threads(1):
            r = run_in_process(train.main, "train.py", data, *TRAIN, "--output", base / "out",
                               "--experiment", f"r{classes}")
        assert r.returncode == 0, r.stderr[-2000:]
        made[classes] = (data, base / "out" / f"r{classes}")
    return made


@pytest.fixture
def no_sweep(monkeypatch):
    """The sweep's work (forming the weights) fails the test if it starts."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the sweep ran")
    monkeypatch.setattr(series, "synthesize", forbidden)
    monkeypatch.setattr(series, "accumulate", forbidden)


def one_line(*argv) -> str:
    with torch_threads(1):
        r = run_in_process(validate.main, "validate.py", *argv)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("validate.py: error: "), r.stderr
    return lines[0]


def test_a_sigma_rel_no_profile_has_is_one_line(runs, no_sweep):
    """Item 4: sigma_rel ** -2 overflowed (1e-200)."""
    data, run = runs[3]
    line = one_line(data, "--posthoc", run, "--sigma-rel", "1e-200")
    assert "--sigma-rel must be in [1e-12, 0.2887] (the uniform average), got 1e-200" in line


def test_a_crop_pct_that_resizes_to_millions_of_pixels_is_one_line(runs):
    """Item 10: a MemoryError in the loader's resize (here: 32 px / 0.00001 = 3.2M px)."""
    data, run = runs[3]
    line = one_line(data, "--checkpoint", run / "last.pth.tar", "--crop-pct", "0.00001")
    assert "--crop-pct 1e-05 would resize every image to 3199999 px" in line


def test_a_snapshot_of_another_class_count_is_refused_by_name(runs, tmp_path, no_sweep):
    """Item 11: one snapshot copied in from a run of 4 classes into a series of 3: a tensor size
    mismatch inside the sweep, before."""
    data, run = runs[3]
    mixed = tmp_path / "mixed"
    shutil.copytree(run, mixed)
    series = sorted((mixed / "posthoc").glob("snapshot-*.pth.tar"))
    other = sorted((runs[4][1] / "posthoc").glob("snapshot-*.pth.tar"))
    shutil.copy(other[1], series[1])
    line = one_line(data, "--posthoc", mixed)
    assert "mixes snapshots of different runs or settings, which differ in the class count" in line
    assert "(test_resnet, 4 classes," in line and "(test_resnet, 3 classes," in line


def test_a_folder_in_the_way_of_the_sweeps_files_is_found_before_the_sweep(runs, tmp_path,
                                                                          no_sweep):
    """Item 14: the sweep took minutes and then failed writing posthoc.csv."""
    data, run = runs[3]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / posthoc_sweep.CSV).mkdir()
    line = one_line(data, "--posthoc", copy)
    assert f"cannot write {copy / posthoc_sweep.CSV}: a folder of that name is in the way" in line


def test_a_read_only_run_folder_is_found_before_the_sweep(runs, tmp_path, monkeypatch,
                                                         no_sweep):
    """Item 14: a run folder the sweep cannot write into."""
    data, run = runs[3]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    copy.chmod(0o555)
    try:
        if os.access(copy, os.W_OK):  # root writes anyway: let the folder refuse as it would
            mkstemp = tempfile.mkstemp
            def refusing(*args, dir=None, **kwargs):
                if Path(dir) == copy:
                    raise PermissionError(13, "Permission denied", str(copy))
                return mkstemp(*args, dir=dir, **kwargs)
            monkeypatch.setattr(posthoc_sweep.tempfile, "mkstemp", refusing)
        line = one_line(data, "--posthoc", copy)
    finally:
        copy.chmod(0o755)
    assert f"into {copy}: permission denied" in line
    assert not (copy / posthoc_sweep.CSV).exists()
