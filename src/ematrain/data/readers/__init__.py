"""The data readers timm's train.py and validate.py know (`--dataset`), with exact resume,
exactly-once validation and one-line errors for each.

- `spec`: timm's dataset flags resolved once into a `DatasetSpec`, each with its check.
- `mapped`, `hf`: map-style splits (image folder, image-in-tar, torch/, hfds/) for the run's
  seeded samplers.
- `shards`, `hfstream`: the shards of a stream (wds/, hfids/) and their samples.
- `streams`: who reads which shard under torchrun, epoch length, order and resume of a stream.
- `opening`: opening a split of a spec; `extras`: the optional packages (``ematrain[data]``).
"""
from .opening import (
                      check_distinct,
                      epoch_samples,
                      open_mapped,
                      open_source,
                      open_stream,
                      split_path,
                      stream_loader,
)
from .spec import STREAMS, DatasetSpec, resolve_dataset
from .streams import ShardStream, StreamLoader, StreamPlan

__all__ = [
                      "STREAMS",
                      "DatasetSpec",
                      "ShardStream",
                      "StreamLoader",
                      "StreamPlan",
                      "check_distinct",
                      "epoch_samples",
                      "open_mapped",
                      "open_source",
                      "open_stream",
                      "resolve_dataset",
                      "split_path",
                      "stream_loader",
]
