"""webdataset shards (``wds/``): the split's shard list, and the samples of one shard.

A split is named as timm's `ReaderWds` names it: a brace pattern of tar files under --data-dir
(``imagenet-train-{0000..0127}.tar``, optionally ``|N`` for its sample count), or a split name in
the folder's ``_info.json`` (timm's format: ``splits.<name>.{filenames, shard_lengths,
num_samples}``). Samples are grouped by webdataset's own tar reader; images come from the first of
--input-key's extensions (``jpg;png;webp``), labels from ``.cls`` or, with --target-key, from
that field of the ``.json`` sidecar, as timm decodes them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml

from ...util.errors import UserError
from .extras import need
from .images import corrupt_hint, decode
from .labels import ValueLabels

INFO_FILES = ("_info.json", "info.json", "_info.yaml", "info.yaml")
IMAGE_EXTS = "jpg;png;webp"


@dataclass
class ShardList:
    """One split's shards, and what the metadata says of their sizes."""
    paths: list[str]
    lengths: list[int] | None   # samples in each shard, when the metadata gives them
    total: int | None           # samples in the split: metadata, a '|N' pattern, or lengths


def read_info(root: str) -> dict:
    for name in INFO_FILES:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f) if name.endswith(".json") else yaml.safe_load(f)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise UserError(f"cannot read {path}: {str(exc)[:120]}") from None
        if not isinstance(info, dict):
            raise UserError(f"{path}: expected a mapping with 'splits', got {type(info).__name__}")
        return info
    return {}


def shard_list(root: str, split: str, flag: str) -> ShardList:
    """The shards `split` names under `root`, each checked to be there."""
    need("webdataset", "wds")
    from webdataset.shardlists import expand_urls

    info = read_info(root)
    splits = info.get("splits") or {}
    known = {f: n for s in splits.values() if isinstance(s, dict)
             for f, n in zip(s.get("filenames", ()), s.get("shard_lengths", ()))}
    if "tar" in split or ".." in split:  # timm's test for a pattern rather than a split name
        pattern, _, count = split.partition("|")
        try:
            names = expand_urls(pattern.strip())
        except ValueError as exc:
            raise UserError(f"{flag} {split}: not a shard pattern ({exc})") from None
        total = _count(count, flag, split) if count else None
    else:
        # As for folders: timm's default 'validation' finds a split named 'val' (and back).
        entry = splits.get(split)
        if entry is None:
            entry = splits.get({"val": "validation", "validation": "val"}.get(split, split))
        if not isinstance(entry, dict) or "filenames" not in entry:
            have = f"it has: {', '.join(splits)}" if splits else "there is no _info.json with splits"
            raise UserError(f"{flag} {split}: no such split of the shards in {root} ({have}); "
                            f"or name the shards: {flag} 'name-{{0000..0099}}.tar'")
        names, total = list(entry["filenames"] or ()), entry.get("num_samples")
    names = [n for n in names if n]
    if not names:
        raise UserError(f"{flag} {split}: the shard list is empty")
    paths = [n if "://" in n else os.path.join(root, n) for n in names]
    missing = [p for p in paths if "://" not in p and not os.path.isfile(p)]
    if missing:
        raise UserError(f"{flag} {split}: {len(missing)} of {len(paths)} shard(s) missing, the "
                        f"first: {missing[0]}")
    lengths = [known[n] for n in names] if all(n in known for n in names) else None
    if total is None and lengths is not None:
        total = sum(lengths)
    return ShardList(paths, lengths, total)


def _count(text: str, flag: str, split: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"{flag} {split}: the count after '|' must be a number of samples above 0")
    return value


class WdsSource:
    """Reading and decoding the samples of a split's shards."""

    def __init__(self, shards: ShardList, labels: ValueLabels, input_key: str | None,
                 target_key: str | None, corrupt: str, where: str):
        self.shards, self.labels, self.where, self.corrupt = shards, labels, where, corrupt
        self.exts = [e.strip().lstrip(".").lower() for e in (input_key or IMAGE_EXTS).split(";")
                     if e.strip()]
        self.target_key = target_key
        self.classes = labels.classes

    @property
    def num_shards(self) -> int:
        return len(self.shards.paths)

    def read(self, shard: int):
        """The raw samples of one shard, in file order. A damaged tar ends its shard: under
        `stop` in one line, under `skip` with a warning (the samples read so far stand)."""
        from webdataset.tariterators import tarfile_samples

        path, seen = self.shards.paths[shard], 0
        try:
            for sample in tarfile_samples([{"url": path}], handler=_reraise):
                seen += 1
                yield sample
        # webdataset and tarfile raise whatever the damage causes
        except Exception as exc:  # noqa: BLE001
            self._damaged(f"shard {path}: damaged after {seen} sample(s) "
                          f"({str(exc).splitlines()[0][:100]})")
            return
        # A tar cut at a member boundary reads as a shorter one: the metadata tells.
        expected = self.shards.lengths[shard] if self.shards.lengths else None
        if expected is not None and seen < expected:
            self._damaged(f"shard {path}: {seen} sample(s) where the metadata says {expected} "
                          f"(a truncated file?)")

    def _damaged(self, message: str) -> None:
        if self.corrupt == "stop":
            raise UserError(corrupt_hint(message))
        from ...util.logs import log
        log.warning(f"warning: {message}: the rest of the shard is skipped")

    def name(self, sample) -> str:
        return f"shard {sample.get('__url__', '?')} sample {sample.get('__key__', '?')}"

    def decode(self, sample, mode: str):
        where = self.name(sample)
        ext = next((e for e in self.exts if e in sample), None)
        if ext is None:
            have = ", ".join(k for k in sample if not k.startswith("__"))
            raise UserError(f"{where}: no image ({';'.join(self.exts)}; it has: {have}); give "
                            f"--input-key")
        return decode(sample[ext], mode, where), self.labels(self._label(sample, where), where)

    def _label(self, sample, where: str):
        if not self.target_key:
            if "cls" not in sample:
                raise UserError(f"{where}: no label (.cls); give --target-key to read a field "
                                f"of its .json")
            return sample["cls"]
        if "json" not in sample:
            raise UserError(f"{where}: no .json, where --target-key {self.target_key} is read")
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            raise UserError(f"{where}: its .json is not valid JSON") from None
        if not isinstance(meta, dict) or self.target_key not in meta:
            keys = ", ".join(meta) if isinstance(meta, dict) else type(meta).__name__
            raise UserError(f"{where}: no '{self.target_key}' in its .json (it has: {keys}); "
                            f"give --target-key")
        return meta[self.target_key]


def _reraise(exc: Exception) -> bool:
    raise exc
