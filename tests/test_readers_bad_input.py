"""Every bad dataset input is one line naming what is wrong (a `UserError`: exit 2 in the tools):
settings timm's readers would take or ignore, missing or damaged data, missing fields, labels
and classes that do not fit, splits that are not there, downloads not allowed, a missing extra."""
from __future__ import annotations

import io
import json
import sys
import tarfile

import pytest
from data_writers import corrupt_copy, hf_splits, png_bytes, write_class_map

from ematrain.data import readers
from ematrain.util.errors import UserError, one_line


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__"):  # a stream's first batch reads its data
            for _ in result:
                pass
    line = one_line(str(caught.value))
    assert "\n" not in str(caught.value) or "Traceback" in str(caught.value)
    return line


@pytest.mark.parametrize("kwargs, says", [
    (dict(dataset="tfds/imagenet2012", data_dir="x"), "tfds/ needs TensorFlow"),
    (dict(dataset="foo/bar", data_dir="x"), "unknown dataset type 'foo/'"),
    (dict(dataset="torch/svhn", data_dir="x"), "unknown torchvision dataset 'svhn'"),
    (dict(dataset="cifar10", data_dir="x"), "expected '<type>/<name>'"),
    (dict(dataset="hfds/", data_dir="x"), "name the Hugging Face dataset"),
    (dict(dataset=""), "no data: give --data-dir"),
    (dict(dataset="wds/x", data_dir="/nonexistent/shards"), "shard folder not found"),
    (dict(dataset="", data_dir=".", class_map="nothere.txt"), "--class-map nothere.txt: no such file"),
    (dict(dataset="", data_dir=".", input_img_mode="XYZ"), "not an image mode PIL knows"),
    (dict(dataset="", data_dir=".", input_key="jpg"), "--input-key names a field of wds/"),
    (dict(dataset="wds/x", data_dir=".", target_key="a,b"), "multi-field (multi-label)"),
    (dict(dataset="", data_dir=".", train_num_samples=100), "applies to streamed datasets"),
    (dict(dataset="hfds/x", epoch_repeats=2), "--epoch-repeats applies to streamed"),
    (dict(dataset="wds/x", data_dir=".", train_num_samples=0), "a whole number of samples above 0"),
    (dict(dataset="wds/x", data_dir=".", epoch_repeats=-1), "finite number >= 0"),
    (dict(dataset="wds/x", data_dir=".", dataset_download=True), "is read where it is"),
    (dict(dataset="torch/folder", data_dir=".", dataset_download=True), "cannot download"),
    (dict(dataset="", data_dir=".", dataset_trust_remote_code=True), "runs no code of its own"),
    (dict(dataset="torch/mnist", data_dir=".", class_map=__file__), "does not apply to"),
    (dict(dataset="wds/x", data_dir=".", corrupt_samples="ignore"), "expected stop"),
    (dict(dataset="", data_dir=".", val_split=""), "--val-split is empty"),
])
def test_a_bad_setting_is_refused_in_one_line(kwargs, says):
    assert says in refused(readers.resolve_dataset, **kwargs)


def test_timm_spellings_are_recorded_for_args_yaml():
    spec = readers.resolve_dataset("WDS/imagenet", "/tmp", train_split="a-{0..3}.tar",
                                   train_num_samples=40)
    record = spec.record()
    assert record["dataset"] == "wds/imagenet" and record["train_split"] == "a-{0..3}.tar"
    assert {"dataset_download", "dataset_trust_remote_code", "class_map", "input_img_mode",
            "input_key", "target_key", "train_num_samples", "val_num_samples", "epoch_repeats",
            "data_dir", "val_split", "corrupt_samples"} <= set(record)


# ----------------------------------------------------------------------------- shards
def write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def info_json(folder, split, names, lengths):
    (folder / "_info.json").write_text(json.dumps({"splits": {split: {
        "name": split, "filenames": names, "shard_lengths": lengths,
        "num_samples": sum(lengths)}}}))


def open_val(folder, split="val", **kw):
    spec = readers.resolve_dataset("wds/t", str(folder), val_split=split, **kw)
    source = readers.open_source(spec, split, num_classes=kw.pop("num_classes", None) or 3)
    stream = readers.open_stream(spec, source, split, train=False, world=1, rank=0, workers=0,
                                 batch_size=2, seed=0, mode="RGB")
    from torchvision.transforms import PILToTensor
    stream.transform = PILToTensor()
    loader = readers.stream_loader(stream, 0)
    loader.set_epoch(0)
    return loader


def test_a_missing_shard_and_an_empty_shard_list(tmp_path):
    write_tar(tmp_path / "val-0.tar", {"a.png": png_bytes(), "a.cls": b"0"})
    info_json(tmp_path, "val", ["val-0.tar", "val-1.tar"], [1, 1])
    assert "1 of 2 shard(s) missing, the first: " in refused(open_val, tmp_path)
    info_json(tmp_path, "val", [], [])
    assert "the shard list is empty" in refused(open_val, tmp_path)
    assert "no such split of the shards" in refused(open_val, tmp_path, split="test")


def test_a_sample_without_its_image_or_label_or_with_a_label_outside_the_classes(tmp_path):
    cases = {
        "noimage": ({"a.txt": b"hi", "a.cls": b"0"}, {}, "no image (jpg;png;webp; it has: "),
        "nolabel": ({"a.png": png_bytes()}, {}, "no label (.cls)"),
        "nofield": ({"a.png": png_bytes(), "a.json": b'{"y": 1}'}, {"target_key": "label"},
                    "no 'label' in its .json (it has: y)"),
        "outside": ({"a.png": png_bytes(), "a.cls": b"7"}, {},
                    "label 7 is outside the 3 classes (0..2)"),
        "name": ({"a.png": png_bytes(), "a.cls": b"cat"}, {}, "label 'cat' is not a class index"),
    }
    for name, (members, kw, says) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        write_tar(folder / "val-0.tar", members)
        line = refused(open_val, folder, split="val-0.tar|1", **kw)
        assert says in line and "val-0.tar sample a" in line, line


def test_a_damaged_shard_stops_in_one_line_or_is_cut_short_with_a_warning(tmp_path, caplog):
    members = {}
    for i in range(4):
        members.update({f"s{i}.cls": b"1", f"s{i}.png": png_bytes((i * 40, 0, 0))})
    write_tar(tmp_path / "whole.tar", members)
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "val-0.tar").write_bytes(data[:512 * 7 + 100])  # cut inside a member
    assert "val-0.tar: damaged after 1 sample(s)" in refused(open_val, tmp_path, split="val-0.tar|4")
    loader = open_val(tmp_path, split="val-0.tar|4", corrupt_samples="skip")
    assert sum(len(labels) for _, labels in loader) == 1
    assert "the rest of the shard is skipped" in caplog.text
    # Cut between members, a tar reads as a shorter one: the metadata's count tells.
    (tmp_path / "val-0.tar").write_bytes(data[:len(data) // 2 - 1024])
    info_json(tmp_path, "val", ["val-0.tar"], [4])
    assert "val-0.tar: 2 sample(s) where the metadata says 4" in refused(open_val, tmp_path)


# ----------------------------------------------------------------------------- folders, tars
def test_a_class_map_naming_classes_the_data_lacks(same_data, tmp_path):
    bad = write_class_map(["class_0", "class_9"], tmp_path / "map.txt")
    spec = readers.resolve_dataset("", str(same_data["folder"]), class_map=str(bad))
    assert "names 1 class(es) that" in refused(readers.open_mapped, spec, "train", "RGB")
    spec = readers.resolve_dataset(f"hfds/{same_data['hf_saved']}", None, class_map=str(bad))
    assert "class_9" in refused(readers.open_mapped, spec, "train", "RGB")
    # A map naming some of the classes keeps those, in its order.
    part = write_class_map(["class_2", "class_0"], tmp_path / "part.txt")
    spec = readers.resolve_dataset("", str(same_data["folder"]), class_map=str(part))
    split = readers.open_mapped(spec, "train", "RGB")
    assert split.classes == ["class_2", "class_0"] and len(split) == 20
    assert sorted(set(split.targets)) == [0, 1]


def test_a_corrupt_tar_member_stops_in_one_line_or_is_replaced_and_counted(tmp_path):
    good = png_bytes()
    write_tar(tmp_path / "val.tar", {"a/0.png": good, "a/1.png": corrupt_copy(good),
                                    "b/2.png": png_bytes((0, 0, 200))})
    stop = readers.open_mapped(readers.resolve_dataset("", str(tmp_path)), "val", "RGB")
    assert len(stop) == 3 and stop.classes == ["a", "b"]
    line = refused(stop.__getitem__, 1)
    assert "val.tar:a/1.png" in line and "--corrupt-samples skip" in line
    skip = readers.open_mapped(readers.resolve_dataset("", str(tmp_path), corrupt_samples="skip"),
                               "val", "RGB")
    _, label = skip[1]  # the next sample stands in for it
    assert label == 1 and skip.skipped.value == 1


def test_a_split_that_is_not_there(same_data, tmp_path):
    folder = readers.resolve_dataset("", str(same_data["folder"]))
    assert "--val-split test: not found" in refused(readers.open_mapped, folder, "test", "RGB")
    saved = readers.resolve_dataset(f"hfds/{same_data['hf_saved']}", None)
    assert "no such split (it has: train, validation)" in refused(
        readers.open_mapped, saved, "test", "RGB")
    files = readers.resolve_dataset(f"hfds/{same_data['parquet']}", str(same_data["cache"]))
    assert "has no such split" in refused(readers.open_mapped, files, "test", "RGB")
    stream = readers.resolve_dataset(f"hfids/{same_data['parquet']}", str(same_data["cache"]))
    assert "has no such split (it has: train, validation)" in refused(
        readers.open_source, stream, "test")
    mnist = readers.resolve_dataset("torch/mnist", str(tmp_path))
    assert "torch/mnist has a train split" in refused(readers.open_mapped, mnist, "dev", "RGB")


def test_an_hfds_folder_without_splits(same_data, tmp_path):
    hf_splits(same_data["folder"])["train"].save_to_disk(str(tmp_path / "one"))
    spec = readers.resolve_dataset(f"hfds/{tmp_path / 'one'}", None)
    assert "is one Dataset without splits" in refused(readers.open_mapped, spec, "train", "RGB")


def test_hfds_fields_and_labels_that_do_not_fit(same_data, tmp_path):
    spec = readers.resolve_dataset(f"hfds/{same_data['hf_saved']}", None, input_key="img")
    assert "no 'img' field (fields: image, label); give --input-key" in refused(
        readers.open_mapped, spec, "train", "RGB")
    import datasets
    plain = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(), "path": None}] * 3, "label": [0, 1, 2]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))})
    plain.save_to_disk(str(tmp_path / "plain"))
    spec = readers.resolve_dataset(f"hfds/{tmp_path / 'plain'}", None)
    assert "give --num-classes N or a --class-map" in refused(
        readers.open_mapped, spec, "train", "RGB")
    assert "label 2 is outside the 2 classes" in refused(
        readers.open_mapped, spec, "train", "RGB", num_classes=2)


def test_nothing_is_downloaded_without_dataset_download(tmp_path):
    spec = readers.resolve_dataset("torch/cifar10", str(tmp_path))
    assert "give --dataset-download to fetch it" in refused(readers.open_mapped, spec, "train", "RGB")
    hub = readers.resolve_dataset("hfds/someone/not-cached", str(tmp_path))
    line = refused(readers.open_mapped, hub, "train", "RGB")
    assert "not a local folder and not in the cache" in line and "--dataset-download" in line
    assert not any(tmp_path.iterdir()) or not list(tmp_path.rglob("*.tar.gz"))


@pytest.mark.parametrize("package, dataset", [("webdataset", "wds/x"), ("datasets", "hfids/x")])
def test_a_missing_optional_package_names_the_extra(tmp_path, monkeypatch, package, dataset):
    monkeypatch.setitem(sys.modules, package, None)  # what Python does for an absent package
    spec = readers.resolve_dataset(dataset, str(tmp_path))
    line = refused(readers.open_source, spec, "train")
    assert f"needs the '{package}' package" in line and "pip install 'ematrain[data]'" in line
