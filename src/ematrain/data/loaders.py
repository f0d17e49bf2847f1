"""Data loaders whose order comes from their sampler alone, and their worker processes: ended on
an error, kept from epoch to epoch when persistent, silent about -j beyond the cores (the
commands say it once)."""
from __future__ import annotations

import contextlib
import warnings

from torch.utils.data import DataLoader

from ..util.seeding import loader_generator, seed_worker
from ..util.signals import in_loader_worker


@contextlib.contextmanager
def _worker_count_said():
    """Where -j exceeds the cores, train.py and validate.py say so once
    (`LoaderSpec.too_many_workers`): torch's own warning, which it repeats for every loader it
    makes and starts (once inside the progress bar), is silenced around those calls only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create",
                                category=UserWarning)
        yield


def make_loader(dataset, batch_size: int, workers: int, seed: int, drop_last: bool = False,
                pin_memory: bool = False, sampler=None, shuffle: bool = False,
                persistent: bool = False, collate_fn=None, batch_sampler=None) -> DataLoader:
    """A loader whose order comes from its sampler (or `seed`) alone. `persistent` keeps its
    worker processes from one pass to the next (the samples are seeded by their own key, so it
    does not matter which worker loads what)."""
    with _worker_count_said():
        if batch_sampler is not None:  # batches of their own sizes (--train-img-sizes)
            return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                              pin_memory=pin_memory, worker_init_fn=_init_worker,
                              generator=loader_generator(seed), collate_fn=collate_fn,
                              persistent_workers=persistent and workers > 0)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, num_workers=workers, drop_last=drop_last,
                          pin_memory=pin_memory, worker_init_fn=_init_worker,
                          generator=loader_generator(seed),
                          persistent_workers=persistent and workers > 0,
                          collate_fn=collate_fn)


@contextlib.contextmanager
def batches(loader):
    """Iterate `loader`; end its worker processes on an error (a reference to the iterator kept
    by the error's traceback would keep them running), and after the pass unless they persist."""
    with _worker_count_said():
        iterator = iter(loader)
    try:
        yield iterator
    except BaseException:
        end_workers(loader, iterator)
        raise
    if not loader.persistent_workers:
        end_workers(loader, iterator)


def end_workers(loader, iterator=None) -> None:
    """Shut the loader's worker processes down (if it has any running)."""
    iterator = iterator if iterator is not None else getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    if getattr(loader, "_iterator", None) is iterator:
        loader._iterator = None


def _init_worker(worker_id: int) -> None:
    in_loader_worker()
    seed_worker(worker_id)
