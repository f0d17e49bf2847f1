"""The same images kept as a folder, a tar, webdataset shards, a saved Hugging Face dataset, parquet
files (map-style and streamed) and torchvision's MNIST files: every reader gives the same classes,
the same number of samples and the same (image, label) pairs."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from data_writers import write_mnist
from torchvision.transforms import PILToTensor

from ematrain.data import EpochSampler, SeededSamples, readers

TO_TENSOR = PILToTensor()


def pixels_key(image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


def mapped_pairs(split) -> list[tuple[str, int]]:
    return [(pixels_key(split[i][0]), split[i][1]) for i in range(len(split))]


def stream_pairs(spec, split, workers=0, world=1, batch_size=4) -> list[tuple[str, int]]:
    source = readers.open_source(spec, split)
    pairs = []
    for rank in range(world):
        stream = readers.open_stream(spec, source, split, train=False, world=world, rank=rank,
                                     workers=workers, batch_size=batch_size, seed=0, mode="RGB")
        stream.transform = TO_TENSOR
        loader = readers.stream_loader(stream, seed=0)
        loader.set_epoch(0)
        for images, labels in loader:
            pairs += [(pixels_key(img.permute(1, 2, 0).numpy()), int(t))
                      for img, t in zip(images, labels)]
        loader.close()
    return pairs


@pytest.fixture(scope="module")
def folder_pairs(same_data):
    spec = readers.resolve_dataset("", str(same_data["folder"]))
    return {split: mapped_pairs(readers.open_mapped(spec, split, "RGB"))
            for split in ("train", "validation")}


def test_a_folder_and_its_tars_give_the_same_samples_in_the_same_order(same_data, folder_pairs):
    spec = readers.resolve_dataset("", str(same_data["tars"]))
    for split in ("train", "validation"):  # validation finds val.tar, as it finds val/
        tar = readers.open_mapped(spec, split, "RGB")
        assert tar.classes == same_data["classes"]
        assert mapped_pairs(tar) == folder_pairs[split]


@pytest.mark.parametrize("where", ["hf_saved", "parquet"])
def test_a_hugging_face_dataset_gives_the_folders_samples(same_data, folder_pairs, where):
    spec = readers.resolve_dataset(f"hfds/{same_data[where]}", str(same_data["cache"]))
    for split in ("train", "validation"):
        ds = readers.open_mapped(spec, split, "RGB")
        assert ds.classes == same_data["classes"]
        assert mapped_pairs(ds) == folder_pairs[split]


@pytest.mark.parametrize("workers, world", [(0, 1), (2, 1), (2, 2)])
def test_shards_stream_each_of_the_folders_samples_once(same_data, folder_pairs, workers, world):
    spec = readers.resolve_dataset("wds/same", str(same_data["shards"]),
                                   class_map=str(same_data["class_map"]), val_split="val")
    source = readers.open_source(spec, "train")
    assert source.classes == same_data["classes"]
    assert source.shards.total == len(folder_pairs["train"]) == 30
    for split, folder in (("train", "train"), ("val", "validation")):
        pairs = stream_pairs(spec, split, workers, world)
        assert sorted(pairs) == sorted(folder_pairs[folder])


def test_a_streamed_hugging_face_dataset_gives_the_folders_samples(same_data, folder_pairs):
    spec = readers.resolve_dataset(f"hfids/{same_data['parquet']}", str(same_data["cache"]))
    source = readers.open_source(spec, "train")
    assert source.classes == same_data["classes"]
    assert (source.num_shards, source.shards.lengths) == (3, [10, 10, 10])  # parquet footers
    for split in ("train", "validation"):
        assert sorted(stream_pairs(spec, split, workers=2, world=2)) == sorted(folder_pairs[split])


def test_wds_labels_from_a_json_field_equal_those_of_cls(same_data):
    cls = readers.resolve_dataset("wds/same", str(same_data["shards"]), val_split="val",
                                  class_map=str(same_data["class_map"]))
    field = readers.resolve_dataset("wds/same", str(same_data["shards"]), val_split="val",
                                    class_map=str(same_data["class_map"]), target_key="label")
    assert stream_pairs(cls, "val") == stream_pairs(field, "val")


def test_torchvision_mnist_files_are_read_as_timm_names_them(tmp_path):
    write_mnist(tmp_path, train=20, test=10)
    spec = readers.resolve_dataset("torch/MNIST", str(tmp_path))  # torch/ names: any case
    train = readers.open_mapped(spec, "train", "RGB", flag="--train-split")
    test = readers.open_mapped(spec, "validation", "RGB")
    assert (len(train), len(test)) == (20, 10)
    assert train.classes[:2] == ["0 - zero", "1 - one"]
    image, label = test[3]
    assert (image.mode, image.size, label) == ("RGB", (28, 28), 3)
    grey = readers.open_mapped(spec, "validation", "L")[3][0]
    assert grey.mode == "L" and np.asarray(grey)[8, 10] == 250  # the bar of digit 3


def test_map_style_splits_plug_into_the_seeded_sampler(same_data):
    """The run's sampler and per-sample seeding work on any map-style reader: two passes of
    the same (seed, epoch) give the same augmented batches."""
    from torchvision import transforms
    spec = readers.resolve_dataset(f"hfds/{same_data['hf_saved']}", None)
    ds = readers.open_mapped(spec, "train", "RGB", flag="--train-split")
    ds.transform = transforms.Compose([transforms.RandomResizedCrop(16), transforms.PILToTensor()])

    def epoch(e):
        samples = SeededSamples(ds, seed=3)
        samples.set_epoch(e)
        sampler = EpochSampler(len(ds), seed=3)
        sampler.set_epoch(e)
        return torch.stack([samples[i][0] for i in sampler])
    assert torch.equal(epoch(0), epoch(0))
    assert not torch.equal(epoch(0), epoch(1))


def test_a_tar_root_is_one_split_and_torch_folder_reads_the_folders(same_data, folder_pairs):
    from ematrain.util.errors import UserError
    spec = readers.resolve_dataset("", str(same_data["tars"] / "val.tar"))  # validate.py's use
    assert mapped_pairs(readers.open_mapped(spec, "validation", "RGB")) == folder_pairs["validation"]
    with pytest.raises(UserError, match="is one .tar, which would be both train and validation"):
        readers.check_distinct(spec, "train", "validation")
    torchvision_folder = readers.resolve_dataset("torch/folder", str(same_data["folder"]))
    split = readers.open_mapped(torchvision_folder, "validation", "RGB")
    assert split.classes == same_data["classes"]
    assert mapped_pairs(split) == folder_pairs["validation"]
