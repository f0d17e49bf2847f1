"""Streams of shards (wds/, hfids/): disjoint shards per rank and loader worker, the same number
of full steps on every rank whatever the shard count, an order fixed by (seed, epoch), and a
resume in the middle of an epoch that gives the rest of the uninterrupted epoch bit for bit
(also after corrupt samples were skipped)."""
from __future__ import annotations

import hashlib

import pytest
import torch
from data_writers import corrupt_copy, write_shards
from torchvision import transforms

from ematrain.data import readers
from ematrain.data.readers import StreamPlan
from ematrain.util.errors import UserError

AUGMENT = transforms.Compose([transforms.RandomResizedCrop(24), transforms.PILToTensor()])


def wds_spec(shards, class_map, **kw):
    return readers.resolve_dataset("wds/test", str(shards), class_map=str(class_map),
                                   val_split="val", **kw)


def make_loader(spec, split="train", world=1, rank=0, workers=2, batch_size=4, seed=0,
                train=True):
    source = readers.open_source(spec, split)
    stream = readers.open_stream(spec, source, split, train=train, world=world, rank=rank,
                                 workers=workers, batch_size=batch_size, seed=seed, mode="RGB")
    stream.transform = AUGMENT
    return readers.stream_loader(stream, seed)


def epoch_batches(loader, epoch, start=0, state=None, stop=None):
    """The epoch's batches (the first `stop`), the loader's workers ended after."""
    loader.set_epoch(epoch, start, state)
    out = []
    try:
        for images, labels in loader:
            out.append((images, labels))
            if stop is not None and len(out) == stop:
                break
    finally:
        loader.close()
    return out


def keys(batches) -> set[str]:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for images, _ in batches for img in images}


def test_the_plan_deals_shards_to_readers_and_equal_steps_to_ranks():
    plan = StreamPlan(5, world=2, workers=2, batch_size=4, epoch_samples=30, train=True)
    assert (plan.readers, plan.steps, plan.batch) == (4, 3, 4)  # ceil(30 / 2) = 15 -> 3 x 4
    assert [plan.batches_of(w) for w in range(2)] == [2, 1]
    dealt = [plan.shards_of(r, epoch=0, seed=0) for r in range(4)]
    assert sorted(s for d in dealt for s in d) == [0, 1, 2, 3, 4]  # each shard to one reader
    dealings = {tuple(tuple(plan.shards_of(r, epoch=e, seed=0)) for r in range(4)) for e in range(6)}
    assert len(dealings) >= 4  # dealt anew each epoch
    assert "do not divide evenly" in plan.line("wds", "train")
    # Too few shards for the workers: fewer workers, said; for the processes: refused.
    lowered = StreamPlan(3, world=2, workers=4, batch_size=4, epoch_samples=30, train=True)
    assert lowered.workers == 1 and "-j 4 lowered to 1" in lowered.line("wds", "train")
    with pytest.raises(UserError, match="1 shard\\(s\\) for 2 processes"):
        StreamPlan(1, world=2, workers=1, batch_size=4, epoch_samples=30, train=True)
    # A rank's share smaller than a batch: one step of that share, as for folders.
    small = StreamPlan(5, world=2, workers=2, batch_size=64, epoch_samples=30, train=True)
    assert (small.steps, small.batch) == (1, 15)


def test_every_rank_runs_the_same_full_steps_on_disjoint_shards(same_data):
    spec = wds_spec(same_data["shards"], same_data["class_map"])
    for epoch in (0, 1):
        ranks = [epoch_batches(make_loader(spec, world=2, rank=r), epoch) for r in (0, 1)]
        assert [len(b) for b in ranks] == [3, 3]
        assert all(len(labels) == 4 for batches in ranks for _, labels in batches)
        assert not keys(ranks[0]) & keys(ranks[1])  # no sample on both ranks


def test_the_order_depends_on_seed_and_epoch_only(same_data):
    spec = wds_spec(same_data["shards"], same_data["class_map"])
    first = epoch_batches(make_loader(spec), 1)
    again = epoch_batches(make_loader(spec), 1)
    assert len(first) == 7
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other_epoch = epoch_batches(make_loader(spec), 2)
    other_seed = epoch_batches(make_loader(spec, seed=1), 1)
    for other in (other_epoch, other_seed):
        assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


@pytest.mark.parametrize("stop_at", [1, 4])
def test_a_mid_epoch_resume_gives_the_rest_of_the_epoch_bit_for_bit(same_data, stop_at):
    spec = wds_spec(same_data["shards"], same_data["class_map"])
    whole = epoch_batches(make_loader(spec), 1)
    interrupted = make_loader(spec)
    epoch_batches(interrupted, 1, stop=stop_at)
    state = interrupted.state_dict()
    rest = epoch_batches(make_loader(spec), 1, start=stop_at, state=state)
    assert len(rest) == len(whole) - stop_at
    for (a, la), (b, lb) in zip(whole[stop_at:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_a_mid_epoch_resume_with_other_readers_is_refused_in_one_line(same_data):
    spec = wds_spec(same_data["shards"], same_data["class_map"])
    interrupted = make_loader(spec, workers=2)
    epoch_batches(interrupted, 0, stop=2)
    with pytest.raises(UserError, match="with the readers it had \\(1 process\\(es\\) x 2 loader "
                                        "worker\\(s\\), now 1 x 1\\).*epoch's end"):
        make_loader(spec, workers=1).set_epoch(0, 2, interrupted.state_dict())
    # At an epoch's start the readers may change (the epoch then follows the new ones).
    assert len(epoch_batches(make_loader(spec, workers=1), 1)) == 7


@pytest.fixture(scope="module")
def corrupt_shards(same_data, tmp_path_factory):
    """The training shards with one member's image cut in half (in the first shard)."""
    import tarfile
    out = tmp_path_factory.mktemp("corrupt")
    write_shards(same_data["folder"] / "train", out, "train", per_shard=7)
    first = out / "train-000000.tar"
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(first, "w") as tar:
        import io
        for i, (member, data) in enumerate(members):
            if member.name.endswith("train000003.png"):
                data = corrupt_copy(data)
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return out


def test_a_corrupt_sample_stops_the_stream_in_one_line_or_is_skipped_and_counted(
        same_data, corrupt_shards):
    from ematrain.util.errors import one_line
    stop = wds_spec(corrupt_shards, same_data["class_map"])
    with pytest.raises(UserError) as caught:
        epoch_batches(make_loader(stop, workers=1), 0)
    line = one_line(str(caught.value))
    assert line.startswith("cannot read image shard ")
    assert "train-000000.tar sample train000003: image file is truncated" in line
    assert "--corrupt-samples skip" in line
    skip = wds_spec(corrupt_shards, same_data["class_map"], corrupt_samples="skip")
    loader = make_loader(skip, split="train", train=False, workers=2)  # one pass: 30 - 1 scored
    batches = epoch_batches(loader, 0)
    assert sum(len(labels) for _, labels in batches) == 29 and loader.skipped == 1


def test_a_resume_after_a_skipped_corrupt_sample_is_still_exact(same_data, corrupt_shards):
    spec = wds_spec(corrupt_shards, same_data["class_map"], corrupt_samples="skip")
    whole_loader = make_loader(spec)
    whole = epoch_batches(whole_loader, 0)
    assert whole_loader.skipped == 1 and len(whole) == 7  # the epoch keeps its length
    for stop_at in range(1, 7):
        interrupted = make_loader(spec)
        epoch_batches(interrupted, 0, stop=stop_at)
        state = interrupted.state_dict()
        rest = epoch_batches(make_loader(spec), 0, start=stop_at, state=state)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[stop_at:], rest)), stop_at
    # The position of a worker past the corrupt sample is one ahead of what it yielded.
    assert sum(p - y for p, y in zip(state["positions"], state["yielded"])) == 1


def test_the_epoch_length_comes_from_the_flags_or_the_metadata(same_data, tmp_path):
    base = dict(shards=same_data["shards"], class_map=same_data["class_map"])
    assert make_loader(wds_spec(**base)).plan.steps == 7                      # _info.json: 30
    assert make_loader(wds_spec(**base, train_num_samples=16)).plan.steps == 4
    assert make_loader(wds_spec(**base, epoch_repeats=2)).plan.steps == 15    # 60 samples
    bare = tmp_path / "bare"
    write_shards(same_data["folder"] / "train", bare, "train", per_shard=7, info=False)
    pattern = "train-{000000..000004}.tar"
    spec = readers.resolve_dataset("wds/bare", str(bare), train_split=pattern,
                                   class_map=str(same_data["class_map"]))
    with pytest.raises(UserError, match="size is unknown.*--train-num-samples"):
        make_loader(spec, split=pattern)
    counted = readers.resolve_dataset("wds/bare", str(bare), train_split=pattern + "|30",
                                      class_map=str(same_data["class_map"]))
    assert make_loader(counted, split=pattern + "|30").plan.steps == 7


def test_validation_reads_every_sample_once_across_ranks_and_workers(same_data):
    spec = wds_spec(same_data["shards"], same_data["class_map"])
    seen = []
    for rank in (0, 1):
        loader = make_loader(spec, split="val", world=2, rank=rank, workers=2, train=False)
        batches = epoch_batches(loader, 0)
        assert len(batches) == len(loader)  # the progress bar's length is the real one
        seen += [k for images, _ in batches for k in keys([(images, None)])]
    assert len(seen) == len(set(seen)) == 15
