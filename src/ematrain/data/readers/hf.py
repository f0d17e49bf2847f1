"""Hugging Face datasets, map-style (``hfds/``): a folder written by `save_to_disk`, a folder of
data files (parquet, arrow, ...) or a hub name already in the cache.

As timm's `ReaderHfds`: `datasets.load_dataset(name, split=..., cache_dir=--data-dir)`, images
from the `image` column and labels from `label` (--input-key, --target-key), the label's
ClassLabel names as the classes. A `save_to_disk` folder (which timm cannot read) is opened with
`load_from_disk`. Without --dataset-download the hub is offline: nothing is fetched.
"""
from __future__ import annotations

import os

from ...util.errors import UserError
from . import labels as lab
from .extras import hub_access
from .mapped import MappedSplit, _mapped

IMAGE_KEY, LABEL_KEY = "image", "label"


def is_saved_to_disk(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def local_path(name: str, root: str | None) -> str | None:
    """The folder `name` names: as given, else inside --data-dir; None for a hub name."""
    for path in (name, os.path.join(root, name) if root else None):
        if path and os.path.isdir(path):
            return path
    return None


def remote_code(trust: bool, datasets) -> dict:
    if not trust:
        return {}
    import inspect
    if "trust_remote_code" not in inspect.signature(datasets.load_dataset).parameters:
        raise UserError(f"--dataset-trust-remote-code: datasets {datasets.__version__} runs no "
                        f"loading scripts (removed in datasets 4.0); use a dataset of data files "
                        f"(parquet) or leave the flag out")
    return {"trust_remote_code": True}


def load_split(spec, split: str, flag: str):
    """The split as a `datasets.Dataset`, or one line saying why not."""
    where = f"--dataset {spec.dataset}"
    with hub_access(spec.download) as datasets:
        path = local_path(spec.name, spec.root)
        if path and is_saved_to_disk(path):
            return _from_disk(datasets, path, split, flag, where)
        try:
            return datasets.load_dataset(path or spec.name, split=split, cache_dir=spec.root,
                                         **remote_code(spec.trust_remote_code, datasets))
        except ValueError as exc:
            if "Unknown split" in str(exc):
                raise UserError(f"{flag} {split}: {where} has no such split "
                                f"({str(exc).split('Should be', 1)[-1].strip(' .')})") from None
            raise UserError(f"{where}: {str(exc)[:160]}") from None
        except (ConnectionError, FileNotFoundError) as exc:
            if path:
                raise UserError(f"{where}: {path} holds no dataset Hugging Face can read "
                                f"({str(exc)[:100]})") from None
            if spec.download:
                raise UserError(f"{where}: cannot fetch it ({str(exc)[:120]})") from None
            raise UserError(f"{where}: not a local folder and not in the cache"
                            f"{f' {spec.root}' if spec.root else ''}; give --dataset-download to "
                            f"fetch it from the hub (nothing is fetched without it)") from None


def _from_disk(datasets, path: str, split: str, flag: str, where: str):
    try:
        saved = datasets.load_from_disk(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: cannot read the saved dataset {path} ({str(exc)[:120]})") from None
    if not isinstance(saved, datasets.DatasetDict):
        raise UserError(f"{where}: {path} is one Dataset without splits; save a DatasetDict "
                        f"(e.g. {{'train': ..., 'validation': ...}}) so that {flag} {split} "
                        f"names one")
    if split not in saved:
        raise UserError(f"{flag} {split}: {where} has no such split (it has: "
                        f"{', '.join(saved)})")
    return saved[split]


def check_columns(features, input_key: str, target_key: str, where: str) -> None:
    columns = list(features or {})
    for flag, key in (("--input-key", input_key), ("--target-key", target_key)):
        if key not in columns:
            raise UserError(f"{where}: no '{key}' field (fields: {', '.join(columns)}); "
                            f"give {flag}")


def image_bytes(value, where: str):
    """An image cell with decoding off: {'bytes', 'path'}, or raw bytes."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path") or b""
    if isinstance(value, (bytes, bytearray)):
        return value
    raise UserError(f"{where}: the image field holds {type(value).__name__}, not an image")


class HfdsSplit(MappedSplit):
    """One split of a map-style Hugging Face dataset."""

    def __init__(self, spec, split: str, mode: str, num_classes: int | None = None,
                 flag: str = "--val-split"):
        import datasets

        ds = load_split(spec, split, flag)
        where = f"--dataset {spec.dataset} split {split}"
        image_key, label_key = spec.input_key or IMAGE_KEY, spec.target_key or LABEL_KEY
        check_columns(ds.features, image_key, label_key, where)
        if isinstance(ds.features[image_key], datasets.Image):
            ds = ds.cast_column(image_key, datasets.Image(decode=False))
        values = list(ds.with_format(None)[label_key])
        names = getattr(ds.features[label_key], "names", None)
        if names:  # a ClassLabel: its names are the classes, as in timm
            targets = [lab.check_label(v, len(names), f"{where} sample {i}")
                       for i, v in enumerate(values)]
            classes, keep, targets = _mapped(where, list(names), targets, spec.class_map, spec.root)
        else:
            to_index = lab.ValueLabels(spec.class_map, spec.root, num_classes, where)
            classes, keep = to_index.classes, list(range(len(values)))
            targets = [to_index(v, f"{where} sample {i}") for i, v in enumerate(values)]
        super().__init__(where, classes, targets, mode, spec.corrupt)
        self.dataset = ds.select(keep) if len(keep) != len(ds) else ds
        self.image_key = image_key

    def raw(self, index: int):
        value = self.dataset[index][self.image_key]
        return image_bytes(value, self.where), f"{self.where} sample {index}"
