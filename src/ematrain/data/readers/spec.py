"""timm's dataset settings, resolved once into a `DatasetSpec`, each with its check beside it.

The spellings and defaults are timm's train.py's (`--dataset`, `--train-split`, `--val-split`,
`--class-map`, `--input-img-mode`, `--input-key`, `--target-key`, `--train-num-samples`,
`--val-num-samples`, `--epoch-repeats`, `--dataset-download`, `--dataset-trust-remote-code`);
`--corrupt-samples` is ours (timm skips unreadable images with a warning per image). A setting
timm accepts but would ignore for the chosen reader is refused with the reason, never ignored.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from PIL import Image

from ...util.errors import UserError

FOLDER, TORCH, HFDS, HFIDS, WDS = "folder", "torch", "hfds", "hfids", "wds"
STREAMS = (HFIDS, WDS)
CORRUPT_POLICIES = ("stop", "skip")

# torchvision's datasets as timm's create_dataset names them (timm.data.dataset_factory).
TORCH_NAMES = ("cifar10", "cifar100", "mnist", "kmnist", "fashion_mnist", "qmnist", "places365",
               "inaturalist", "inat", "imagenet", "folder", "image_folder")
# Those with no download (imagenet) or that are read where they are (folders).
TORCH_LOCAL = ("imagenet", "folder", "image_folder")
TRAIN_SPLITS = ("train", "training")
EVAL_SPLITS = ("val", "valid", "validation", "eval", "evaluation")


@dataclass(frozen=True)
class DatasetSpec:
    """Where the data is and how to read it (resolved from timm's dataset flags)."""
    kind: str                       # folder | torch | hfds | hfids | wds
    name: str                       # what follows the kind's prefix ('' for a folder)
    root: str | None                # --data-dir
    train_split: str = "train"
    val_split: str = "validation"
    class_map: str = ""
    input_img_mode: str | None = None
    input_key: str | None = None
    target_key: str | None = None
    train_num_samples: int | None = None
    val_num_samples: int | None = None
    epoch_repeats: float = 0.0
    download: bool = False
    trust_remote_code: bool = False
    corrupt: str = "stop"

    @property
    def streaming(self) -> bool:
        return self.kind in STREAMS

    @property
    def dataset(self) -> str:
        """The --dataset value this spec came from."""
        return "" if self.kind == FOLDER else f"{self.kind}/{self.name}"

    def img_mode(self, in_chans: int = 3) -> str:
        """timm's rule: the given mode, else RGB for a 3-channel model and L for any other."""
        return self.input_img_mode or ("RGB" if in_chans == 3 else "L")

    def num_samples(self, split: str) -> int | None:
        return self.train_num_samples if split == self.train_split else self.val_num_samples

    def record(self) -> dict:
        """The settings under timm's argument names (args.yaml)."""
        return {"dataset": self.dataset, "data_dir": self.root, "train_split": self.train_split,
                "val_split": self.val_split, "class_map": self.class_map,
                "input_img_mode": self.input_img_mode, "input_key": self.input_key,
                "target_key": self.target_key, "train_num_samples": self.train_num_samples,
                "val_num_samples": self.val_num_samples, "epoch_repeats": self.epoch_repeats,
                "dataset_download": self.download,
                "dataset_trust_remote_code": self.trust_remote_code,
                "corrupt_samples": self.corrupt}

def resolve_dataset(dataset: str = "", data_dir: str | None = None, *, train_split: str = "train",
                    val_split: str = "validation", class_map: str = "",
                    input_img_mode: str | None = None, input_key: str | None = None,
                    target_key: str | None = None, train_num_samples: int | None = None,
                    val_num_samples: int | None = None, epoch_repeats: float = 0.0,
                    dataset_download: bool = False, dataset_trust_remote_code: bool = False,
                    corrupt_samples: str = "stop") -> DatasetSpec:
    """The `DatasetSpec` of timm's dataset flags, or one line saying which is wrong and why."""
    kind, name = _kind_and_name(dataset or "")
    spec = DatasetSpec(kind, name, data_dir or None, _split(train_split, "--train-split"),
                       _split(val_split, "--val-split"), class_map or "", input_img_mode,
                       input_key or None, target_key or None,
                       _count(train_num_samples, "--train-num-samples"),
                       _count(val_num_samples, "--val-num-samples"),
                       _repeats(epoch_repeats), bool(dataset_download),
                       bool(dataset_trust_remote_code), corrupt_samples)
    for check in (_check_root, _check_class_map, _check_mode, _check_keys, _check_stream_only,
                  _check_download, _check_remote_code, _check_corrupt):
        check(spec)
    return spec


def _kind_and_name(dataset: str) -> tuple[str, str]:
    # As timm: only the prefix is case-insensitive; torch/ names are lower-cased as well.
    prefix, sep, rest = dataset.partition("/")
    if not sep:
        if dataset:
            raise UserError(f"--dataset {dataset}: expected '<type>/<name>' (torch/, hfds/, "
                            f"hfids/, wds/) or nothing for an image folder or .tar")
        return FOLDER, ""
    kind = prefix.lower()
    if kind == "tfds":
        raise UserError(f"--dataset {dataset}: tfds/ needs TensorFlow, which ematrain does not "
                        f"depend on; write the data as wds/ shards or a Hugging Face dataset")
    if kind == TORCH:
        rest = rest.lower()
        if rest not in TORCH_NAMES:
            raise UserError(f"--dataset {dataset}: unknown torchvision dataset '{rest}' "
                            f"(timm knows {', '.join(TORCH_NAMES)})")
    elif kind not in (HFDS, HFIDS, WDS):
        raise UserError(f"--dataset {dataset}: unknown dataset type '{prefix}/' (known: torch/, "
                        f"hfds/, hfids/, wds/; tfds/ is not supported)")
    if kind in (HFDS, HFIDS) and not rest:
        raise UserError(f"--dataset {dataset}: name the Hugging Face dataset after '{prefix}/' "
                        f"(a hub name in the cache, or a local folder)")
    return kind, rest


def _split(value: str, flag: str) -> str:
    if not value or not str(value).strip():
        raise UserError(f"{flag} is empty: name a split (timm's defaults: train, validation)")
    return str(value)


def _count(value, flag: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{flag} must be a whole number of samples above 0, got {value!r}")
    return value


def _repeats(value) -> float:
    try:
        repeats = float(value or 0.0)
    except (TypeError, ValueError):
        raise UserError(f"--epoch-repeats must be a number, got {value!r}") from None
    if not math.isfinite(repeats) or repeats < 0:
        raise UserError(f"--epoch-repeats must be a finite number >= 0, got {value!r}")
    return repeats


def _check_root(spec: DatasetSpec) -> None:
    if spec.kind in (FOLDER, TORCH, WDS) and not spec.root:
        where = {FOLDER: "the image folder (or .tar)", TORCH: "the torchvision dataset's folder",
                 WDS: "the folder of the shards"}[spec.kind]
        raise UserError(f"no data: give --data-dir (or the positional data path) pointing at {where}")
    if spec.kind == WDS and "://" not in spec.root and not os.path.isdir(spec.root):
        raise UserError(f"--dataset {spec.dataset}: shard folder not found: {spec.root}")


def _check_class_map(spec: DatasetSpec) -> None:
    if not spec.class_map:
        return
    if spec.kind == TORCH:
        raise UserError(f"--class-map does not apply to --dataset {spec.dataset}: timm does not "
                        f"pass it to torchvision's datasets, whose classes are fixed")
    found = os.path.isfile(spec.class_map) or (
        spec.root and os.path.isfile(os.path.join(spec.root, spec.class_map)))
    if not found:
        raise UserError(f"--class-map {spec.class_map}: no such file")
    if os.path.splitext(spec.class_map)[1].lower() not in (".txt", ".pkl"):
        raise UserError(f"--class-map {spec.class_map}: expected a .txt file (one class name a "
                        f"line, in label order) or a .pkl of {{name: index}}, as timm reads")


def _check_mode(spec: DatasetSpec) -> None:
    mode = spec.input_img_mode
    if mode is not None and mode not in Image.MODES:
        raise UserError(f"--input-img-mode {mode}: not an image mode PIL knows "
                        f"(e.g. RGB, L, RGBA; all: {', '.join(Image.MODES)})")


def _check_keys(spec: DatasetSpec) -> None:
    for flag, key in (("--input-key", spec.input_key), ("--target-key", spec.target_key)):
        if key is None:
            continue
        if spec.kind in (FOLDER, TORCH):
            raise UserError(f"{flag} names a field of wds/, hfds/ or hfids/ samples; "
                            f"{'an image folder' if spec.kind == FOLDER else 'a torchvision dataset'}"
                            f" has none (its classes are its folders or fixed)")
        if flag == "--target-key" and "," in key:
            raise UserError(f"--target-key {key}: multi-field (multi-label) targets are not "
                            f"supported; name one field holding each image's class")


def _check_stream_only(spec: DatasetSpec) -> None:
    """Settings timm applies to iterable datasets only (it would ignore them for the others)."""
    if spec.streaming:
        return
    for flag, value in (("--train-num-samples", spec.train_num_samples),
                        ("--val-num-samples", spec.val_num_samples),
                        ("--epoch-repeats", spec.epoch_repeats or None)):
        if value is not None:
            raise UserError(f"{flag} applies to streamed datasets (wds/, hfids/), as in timm; "
                            f"{_described(spec)} is read by index and its size is its sample "
                            f"count (use --epochs for longer training)")


def _check_download(spec: DatasetSpec) -> None:
    if spec.download and spec.kind not in (TORCH, HFDS, HFIDS):
        raise UserError(f"--dataset-download fetches torch/ and Hugging Face datasets; "
                        f"{_described(spec)} is read where it is")
    if spec.download and spec.kind == TORCH and spec.name in TORCH_LOCAL:
        raise UserError(f"--dataset-download: torchvision cannot download torch/{spec.name}; "
                        f"it is read from --data-dir")


def _check_remote_code(spec: DatasetSpec) -> None:
    if spec.trust_remote_code and spec.kind not in (HFDS, HFIDS):
        raise UserError(f"--dataset-trust-remote-code applies to Hugging Face datasets (hfds/, "
                        f"hfids/); {_described(spec)} runs no code of its own")


def _check_corrupt(spec: DatasetSpec) -> None:
    if spec.corrupt not in CORRUPT_POLICIES:
        raise UserError(f"--corrupt-samples {spec.corrupt}: expected stop (the first unreadable "
                        f"image ends the run in one line) or skip (skipped and counted)")


def _described(spec: DatasetSpec) -> str:
    return "an image folder" if spec.kind == FOLDER else f"--dataset {spec.dataset}"
