"""Streamed Hugging Face datasets (``hfids/``): each data file of the split is a shard.

As timm's `ReaderHfids`: `datasets.load_dataset_builder(name, cache_dir=--data-dir)` and its
streaming split, images from `image` and labels from `label`. Reading shard by shard (one data
file each, as datasets itself shards a stream) is what lets every rank and loader worker take
its own files. A parquet file's row count is in its footer, so the split's size is known without
reading it; for other files it takes --train-num-samples / --val-num-samples or the builder's
split info.
"""
from __future__ import annotations

from ...util.errors import UserError
from .extras import hub_access
from .hf import (
    IMAGE_KEY,
    LABEL_KEY,
    check_columns,
    image_bytes,
    local_path,
    remote_code,
)
from .images import decode
from .labels import ValueLabels, check_label, check_named
from .shards import ShardList


class HfidsSource:
    """The data files of one split, read as datasets streams them."""

    def __init__(self, spec, split: str, flag: str, num_classes: int | None):
        self.where = f"--dataset {spec.dataset} split {split}"
        self.split, self.download = split, spec.download
        self.image_key = spec.input_key or IMAGE_KEY
        self.label_key = spec.target_key or LABEL_KEY
        with hub_access(spec.download, "hfids") as datasets:
            path = local_path(spec.name, spec.root)
            try:
                self.builder = datasets.load_dataset_builder(
                    path or spec.name, cache_dir=spec.root,
                    **remote_code(spec.trust_remote_code, datasets))
            except (ConnectionError, FileNotFoundError, ValueError) as exc:
                where = path or f"not a local folder and not in the cache ({str(exc)[:80]})"
                raise UserError(f"--dataset {spec.dataset}: {where}; hfids/ streams local data "
                                f"files, or the hub with --dataset-download") from None
            files = dict(self.builder.config.data_files or {})
            if split not in files:
                raise UserError(f"{flag} {split}: {self.where.rsplit(' split', 1)[0]} has no such "
                                f"split (it has: {', '.join(files) or 'none'})")
            self.files = [str(f) for f in files[split]]
            features = self._stream(datasets).features
        check_columns(features, self.image_key, self.label_key, self.where)
        names = getattr(features[self.label_key], "names", None)
        self.names = list(names) if names else None
        self.labels = None if names and not spec.class_map else ValueLabels(
            spec.class_map, spec.root, num_classes, self.where)
        if names and self.labels is not None:
            check_named(self.labels.mapping, self.names, spec.class_map, self.where)
        self.classes = self.names if self.labels is None else self.labels.classes
        self.shards = ShardList(self.files, *self._lengths(spec.num_samples(split)))
        self._streams = None

    def _stream(self, datasets):
        stream = self.builder.as_streaming_dataset(split=self.split)
        if isinstance(stream.features.get(self.image_key), datasets.Image):
            stream = stream.cast_column(self.image_key, datasets.Image(decode=False))
        return stream

    def _lengths(self, given: int | None):
        if not all(f.endswith(".parquet") and "://" not in f for f in self.files):
            info = (self.builder.info.splits or {}).get(self.split)
            return None, given or getattr(info, "num_examples", None) or None
        import pyarrow.parquet as pq
        lengths = [pq.ParquetFile(f).metadata.num_rows for f in self.files]
        return lengths, given or sum(lengths)

    @property
    def num_shards(self) -> int:
        return len(self.files)

    def read(self, shard: int):
        if self._streams is None:  # made in the process that reads (a loader worker)
            with hub_access(self.download, "hfids") as datasets:
                self._streams = self._stream(datasets)
        part = self._streams.shard(num_shards=len(self.files), index=shard, contiguous=True)
        # `iter` (unlike iterating the dataset) reads all of the shard in a loader worker too:
        # datasets would otherwise split it again among the workers, which we already did.
        row_number = 0
        for batch in part.iter(batch_size=64):
            for i in range(len(next(iter(batch.values())))):
                row = {key: values[i] for key, values in batch.items()}
                row["__where__"] = f"{self.files[shard]} row {row_number}"
                row_number += 1
                yield row

    def name(self, row) -> str:
        return f"{self.where}: {row.get('__where__', '?')}"

    def decode(self, row, mode: str):
        where = self.name(row)
        value = row.get(self.label_key)
        if value is None:
            raise UserError(f"{where}: no label in '{self.label_key}'")
        if self.labels is not None:
            label = self.labels(self.names[value] if self.names and self.labels.mapping else value,
                                where)
        else:
            label = check_label(value, len(self.names), where)
        return decode(image_bytes(row.get(self.image_key), where), mode, where), label

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_streams"] = None
        return state
