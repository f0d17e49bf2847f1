"""Streams of shards (wds/, hfids/) under torchrun: who reads which shard, how many samples each
reads, and in which order.

Every rank runs R loader workers (R = -j, at least 1: without workers the main process reads);
each of the W x R *readers* takes its own shards, dealt round-robin from the shard list (training:
from a permutation drawn from (seed, epoch), so each epoch deals them anew; validation: in list
order). Nothing is read twice in a pass and no two readers share a shard.

Training. Every rank runs the same number of steps S = floor(ceil(N / W) / B) (N the epoch's
samples: --train-num-samples or the metadata, times --epoch-repeats; B the batch size), so no rank
waits in a collective for another. Reader r of a rank yields its share of those S batches; when
its shards run out before that, it reads them again (a new pass, in a new order), and when it has
more it stops: shards are whole, so a count that does not divide evenly repeats or leaves out at
most about a shard per reader in an epoch, never the same ones two epochs running. With fewer
shards than W x R the workers per rank are lowered (each reader needs a shard); with fewer than W
training is refused. Within a reader, each pass goes through a shuffle buffer seeded by (seed, epoch, reader, pass),
and each sample's augmentation is seeded by (seed, epoch, reader, position): the epoch depends on
(seed, epoch, W, R) and nothing else.

Validation: every reader reads each of its shards once, to the end: the counts summed over ranks
are the split's size (nothing padded, nothing dropped).

Resume: torch's loader takes batches from its workers in turn (batch j from worker j mod R), so
after b batches each worker's consumed count is known; each sample carries its reader's position
in the raw stream (which counts skipped corrupt samples too), the loader (`StreamLoader`) keeps
the last one of each worker, and a resumed worker replays its raw stream to that position without
decoding a single image, then goes on: the rest of the epoch is the uninterrupted run's, bit for
bit. Workers are renumbered so that the worker whose turn it was comes first.
"""
from __future__ import annotations

import itertools
import math
import multiprocessing
import random

import torch

from ...util.errors import UserError
from ...util.seeding import seed_sample
from .images import MAX_CONSECUTIVE, CorruptSample, corrupt_hint

SHUFFLE_BUFFER = 1000  # raw samples each training reader holds for its shuffle


class StreamPlan:
    """The arithmetic of one split's stream: readers, shards per reader, steps per epoch."""

    def __init__(self, num_shards: int, world: int, workers: int, batch_size: int,
                 epoch_samples: int | None, train: bool, where: str = "the stream"):
        self.num_shards, self.world, self.train, self.where = num_shards, world, train, where
        self.asked = max(1, workers)
        if train and num_shards < world:
            raise UserError(f"{where}: {num_shards} shard(s) for {world} processes: every process "
                            f"needs shards of its own; write the split as at least {world} shards")
        # Training: each reader needs a shard; validation: a reader without one would idle.
        most = num_shards // world if train else math.ceil(num_shards / world)
        self.workers = max(1, min(self.asked, most))
        self.loader_workers = self.workers if workers > 0 else 0
        self.readers = world * self.workers
        self.epoch_samples = epoch_samples
        if train:
            per_rank = math.ceil(epoch_samples / world)
            full = per_rank >= batch_size
            self.steps = per_rank // batch_size if full else 1
            self.batch = batch_size if full else per_rank
        else:
            self.steps, self.batch = None, batch_size

    def shards_of(self, reader: int, epoch: int, seed: int) -> list[int]:
        order = list(range(self.num_shards))
        if self.train:
            random.Random(_key(seed, epoch, -1)).shuffle(order)
        return order[reader::self.readers]

    def batches_of(self, worker: int) -> int:
        """Training batches worker `worker` of a rank yields in an epoch."""
        return self.steps // self.workers + (worker < self.steps % self.workers)

    def consumed(self, worker: int, batches: int) -> int:
        """Of a rank's first `batches` batches, those worker `worker` made (batch j is worker
        j mod R's)."""
        return max(0, math.ceil((batches - worker) / self.workers))

    def line(self, kind: str, split: str) -> str:
        """What the start of a run says about the stream."""
        per = sorted({len(self.shards_of(r, 0, 0)) for r in range(self.readers)})
        each = f"{per[0]}" if len(per) == 1 else f"{per[0]}-{per[-1]}"
        lowered = (f" (-j {self.asked} lowered to {self.workers}: each reader needs a shard)"
                   if self.workers < self.asked else "")
        head = (f"{kind} {split}: {self.num_shards} shards over {self.world} process(es) x "
                f"{self.workers} loader worker(s) = {self.readers} readers, {each} shards each"
                f"{lowered}")
        if not self.train:
            return f"{head}; each reads its shards once (every sample scored exactly once)"
        even = self.num_shards % self.readers == 0
        return (f"{head}; every process runs {self.steps} steps of {self.batch} an epoch "
                f"({self.epoch_samples} samples); "
                + ("shards divide evenly" if even else
                   "shards do not divide evenly: a reader short of samples reads its shards "
                   "again and one with more stops, dealt anew each epoch"))


def _key(*parts: int) -> int:
    return hash(tuple(parts)) % 2**63


def buffer_shuffle(items, size: int, rng: random.Random):
    """A shuffle buffer of `size` items (webdataset's idea), driven by `rng` alone."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class ShardStream(torch.utils.data.IterableDataset):
    """One split's samples as a stream of ``(image, label, worker, position, yielded)``:
    `StreamLoader` strips the last three (the resume state) from each batch."""

    def __init__(self, source, plan: StreamPlan, rank: int, seed: int, mode: str, corrupt: str,
                 shuffle_buffer: int = SHUFFLE_BUFFER):
        self.source, self.plan, self.rank, self.seed = source, plan, rank, seed
        self.mode, self.corrupt, self.shuffle_buffer = mode, corrupt, shuffle_buffer
        self.transform = None
        self.classes = source.classes
        # Read by loader workers at each pass; they may outlive an epoch (persistent workers),
        # so the epoch, the start batch and the workers' positions are in shared memory.
        self._shared = multiprocessing.Array("q", 2 + plan.workers, lock=False)

    def set_epoch(self, epoch: int, start_batch: int = 0, positions=None) -> None:
        """The epoch to read, from batch `start_batch` (resume); `positions`: each worker's raw
        position there, as `StreamLoader.state_dict` gave them (None: no corrupt samples were
        skipped, so positions equal the samples consumed)."""
        if start_batch and not self.plan.train:
            raise ValueError("validation streams start at their beginning")
        self._shared[0], self._shared[1] = epoch, start_batch
        for w in range(self.plan.workers):
            done = self.plan.consumed(w, start_batch) * self.plan.batch if self.plan.train else 0
            self._shared[2 + w] = positions[w] if positions is not None else done

    @property
    def epoch(self) -> int:
        return self._shared[0]

    def positions(self) -> list[int]:
        """Each worker's raw position where the epoch (re)starts."""
        return [self._shared[2 + w] for w in range(self.plan.workers)]

    def _raw(self, reader: int, epoch: int):
        """The reader's raw samples: its shards, pass after pass (training), each pass through
        its own shuffle buffer (a pass ends before the next begins: no sample twice in one)."""
        shards = self.plan.shards_of(reader, epoch, self.seed)
        for n in itertools.count():
            order = list(shards)
            if n:
                random.Random(_key(self.seed, epoch, reader, n)).shuffle(order)
            items = (sample for shard in order for sample in self.source.read(shard))
            if self.plan.train:
                rng = random.Random(_key(self.seed, epoch, reader, n, 1))
                items = buffer_shuffle(items, self.shuffle_buffer, rng)
            count = 0
            for sample in items:
                count += 1
                yield sample
            if not self.plan.train:
                return
            if not count:
                raise UserError(f"{self.plan.where}: reader {reader}'s shards hold no samples")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        epoch, start = self._shared[0], self._shared[1]
        worker = ((info.id if info else 0) + start) % self.plan.workers
        reader = self.rank * self.plan.workers + worker
        position = self._shared[2 + worker]
        if self.plan.train:
            done = self.plan.consumed(worker, start) * self.plan.batch
            wanted = self.plan.batches_of(worker) * self.plan.batch - done
        else:
            done, wanted = 0, None
        raw = itertools.islice(self._raw(reader, epoch), position, None)
        yield from self._samples(raw, epoch, reader, worker, position, done, wanted)

    def _samples(self, raw, epoch, reader, worker, position, yielded, wanted):
        bad = 0
        if wanted is not None and wanted <= 0:
            return
        for sample in raw:
            position += 1
            try:
                img, label = self.source.decode(sample, self.mode)
            except CorruptSample as exc:
                if self.corrupt == "stop":
                    raise UserError(corrupt_hint(str(exc))) from None
                bad += 1
                if bad >= MAX_CONSECUTIVE:
                    raise UserError(f"{self.plan.where}: {bad} unreadable samples in a row, the "
                                    f"last: {exc}; the data is damaged") from None
                continue
            bad = 0
            seed_sample(self.seed, epoch, reader * 2**32 + yielded)
            if self.transform is not None:
                img = self.transform(img)
            yielded += 1
            yield img, label, worker, position, yielded
            if wanted is not None:
                wanted -= 1
                if wanted <= 0:
                    return


class StreamLoader:
    """A loader of a `ShardStream`: yields ``(images, labels)`` batches like torch's, and keeps
    where each worker is (`state_dict`) and how many samples were skipped as unreadable.

    It stands in for the DataLoader wherever one is iterated (`data.batches` and `end_workers`
    reach the loader's worker processes through it)."""

    def __init__(self, stream: ShardStream, loader):
        self.stream, self.loader = stream, loader
        self.positions = [0] * stream.plan.workers
        self.yielded = [0] * stream.plan.workers
        self.batches = 0

    @property
    def plan(self) -> StreamPlan:
        return self.stream.plan

    def set_epoch(self, epoch: int, start_batch: int = 0, state: dict | None = None) -> None:
        """Start `epoch` at batch `start_batch`, from a checkpoint's `state_dict()` (mid-epoch)."""
        if start_batch and state is not None:
            if (state.get("epoch"), state.get("batches")) != (epoch, start_batch):
                raise ValueError(f"stream state of epoch {state.get('epoch')} batch "
                                 f"{state.get('batches')}, resuming epoch {epoch} batch {start_batch}")
            then, now = (state.get("world"), state.get("workers")), (self.plan.world, self.plan.workers)
            if then != now:
                raise UserError(
                    f"{self.plan.where}: a stream resumes mid-epoch with the readers it had "
                    f"({then[0]} process(es) x {then[1]} loader worker(s), now {now[0]} x "
                    f"{now[1]}): their shards and positions are those readers'; resume with the "
                    f"same, or from the checkpoint of the epoch's end")
        positions = list(state["positions"]) if start_batch and state is not None else None
        self.stream.set_epoch(epoch, start_batch, positions)
        self.batches = start_batch
        self.positions = self.stream.positions()
        self.yielded = [self.plan.consumed(w, start_batch) * self.plan.batch if self.plan.train
                        else 0 for w in range(self.plan.workers)]

    def state_dict(self) -> dict:
        return {"epoch": self.stream.epoch, "batches": self.batches,
                "positions": list(self.positions), "yielded": list(self.yielded),
                "workers": self.plan.workers, "world": self.plan.world}

    @property
    def skipped(self) -> int:
        """Samples left out as unreadable so far this epoch, on this rank."""
        return sum(p - y for p, y in zip(self.positions, self.yielded))

    def __len__(self) -> int:
        if self.plan.train:
            return self.plan.steps - self.batches
        lengths = self.stream.source.shards.lengths
        if lengths is None:
            total = self.stream.source.shards.total or 0
            return math.ceil(total / self.plan.world / self.plan.batch)
        rank = self.stream.rank
        return sum(math.ceil(sum(lengths[s] for s in self.plan.shards_of(r, 0, 0)) / self.plan.batch)
                   for r in range(rank * self.plan.workers, (rank + 1) * self.plan.workers))

    def __iter__(self):
        return _Batches(self, iter(self.loader))

    def close(self) -> None:
        """End the loader's worker processes (they persist from epoch to epoch otherwise)."""
        from ..loaders import end_workers
        end_workers(self.loader)

    @property
    def persistent_workers(self) -> bool:
        return self.loader.persistent_workers

    @property
    def _iterator(self):
        return getattr(self.loader, "_iterator", None)

    @_iterator.setter
    def _iterator(self, value) -> None:
        self.loader._iterator = value


class _Batches:
    def __init__(self, owner: StreamLoader, inner):
        self.owner, self.inner = owner, inner

    def __iter__(self):
        return self

    def __next__(self):
        images, labels, workers, positions, yielded = next(self.inner)
        owner, w = self.owner, int(workers[-1])
        owner.positions[w], owner.yielded[w] = int(positions[-1]), int(yielded[-1])
        owner.batches += 1
        return images, labels

    def _shutdown_workers(self) -> None:
        shutdown = getattr(self.inner, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
