"""Streams under torchrun (2 processes, gloo): validation scores every sample exactly once across
the ranks, and every rank runs the same number of training steps, with a collective in each
(as DDP has), on webdataset shards and a streamed Hugging Face dataset whose shard counts do not
divide among the 2 x 2 readers."""
from __future__ import annotations

import json
import textwrap

from test_distributed import torchrun

SCRIPT = textwrap.dedent('''
    import hashlib, json, sys
    import torch, torch.distributed as dist
    from torchvision.transforms import PILToTensor
    from ematrain.data import readers

    out, shards, class_map, parquet, cache = sys.argv[1:6]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}
    specs = {"wds": (readers.resolve_dataset("wds/d", shards, class_map=class_map,
                                             val_split="val"), "train", "val"),
             "hfids": (readers.resolve_dataset("hfids/" + parquet, cache), "train", "validation")}
    for name, (spec, train_split, val_split) in specs.items():
        for split, train in ((train_split, True), (val_split, False)):
            source = readers.open_source(spec, split)
            stream = readers.open_stream(spec, source, split, train=train, world=world, rank=rank,
                                         workers=2, batch_size=4, seed=0, mode="RGB")
            stream.transform = PILToTensor()
            loader = readers.stream_loader(stream, 0)
            loader.set_epoch(1)
            steps, keys = 0, []
            for images, labels in loader:
                if train:  # a collective every step: a rank with fewer steps would hang here
                    dist.all_reduce(torch.ones(1))
                steps += 1
                keys += [hashlib.sha1(i.numpy().tobytes()).hexdigest() for i in images]
            loader.close()
            every = [None] * world
            dist.all_gather_object(every, {"steps": steps, "keys": keys,
                                           "line": stream.plan.line(name, split)})
            report[f"{name} {split}"] = every
    if rank == 0:
        json.dump(report, open(out, "w"))
    dist.destroy_process_group()
''')


def test_two_ranks_score_each_sample_once_and_train_the_same_steps(same_data, tmp_path):
    script, out = tmp_path / "streams.py", tmp_path / "report.json"
    script.write_text(SCRIPT)
    r = torchrun(script, out, same_data["shards"], same_data["class_map"], same_data["parquet"],
                 same_data["cache"], timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    for name, train, val in (("wds", "train", "val"), ("hfids", "train", "validation")):
        ranks = report[f"{name} {val}"]
        keys = [k for rank in ranks for k in rank["keys"]]
        assert len(keys) == len(set(keys)) == 15, name  # summed counts = the split's size
        assert all(r["keys"] for r in ranks)             # both ranks took a share
        ranks = report[f"{name} {train}"]
        assert [r["steps"] for r in ranks] == [3, 3], name  # ceil(30 / 2) = 15 -> 3 steps of 4
        assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])  # disjoint shards
    assert "do not divide evenly" in report["wds train"][0]["line"]      # 5 shards, 4 readers
    assert "-j 2 lowered to 1" in report["hfids train"][0]["line"]       # 3 shards, 2 ranks


# train.py on the shards under torchrun: 30 samples, 2 ranks x 1 reader, batch 4: 3 steps an
# epoch, 6 updates in all. Recovery saves at updates 2 and 4 (epoch 1, step 1); rank 1 kills
# itself at epoch 1, step 2, once that file is there.
def stream_args(same_data):
    from conftest import tiny_args
    return ["--dataset", "wds/same", "--data-dir", same_data["shards"], "--class-map",
            same_data["class_map"], *tiny_args(
                "--seed", "3", "--model-ema", "--model-ema-decay", "0.9", "--model-ema-posthoc",
                "--model-ema-snapshot-every", "1it", "--recovery-interval", "2", epochs=2)]


def test_train_py_on_shards_under_torchrun_validates_once_and_resumes_bit_identical(
        same_data, tmp_path):
    import csv

    import torch
    from conftest import REPO_ROOT
    from test_distributed_resume import HOOK, _assert_same

    args = stream_args(same_data)
    ref = torchrun(REPO_ROOT / "train.py", *args, "--output", tmp_path, "--experiment", "ref",
                   timeout=300)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    assert "every process runs 3 steps of 4 an epoch" in ref.stderr + ref.stdout
    hook = tmp_path / "hooked.py"
    hook.write_text(HOOK.format(src=str(REPO_ROOT / "src")).replace(
        "c.epoch_step == 3", "c.epoch_step == 2").replace("== (1, 2)", "== (1, 1)"))
    killed = torchrun(hook, *args, "--output", tmp_path, "--experiment", "run", timeout=300)
    assert killed.returncode != 0, killed.stderr[-3000:]
    again = torchrun(REPO_ROOT / "train.py", *args, "--output", tmp_path, "--experiment", "run",
                     "--resume", "auto", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "recovery.pth.tar at epoch 1, step 1" in again.stderr, again.stderr
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    a = torch.load(ref_dir / "last.pth.tar", weights_only=True)
    b = torch.load(run_dir / "last.pth.tar", weights_only=True)
    assert a["counters"] == b["counters"] and a["data_stream"] == b["data_stream"]
    _assert_same(a, b, "last.pth.tar")
    names = sorted(p.name for p in (ref_dir / "posthoc").iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in (run_dir / "posthoc").iterdir())
    assert (run_dir / "summary.csv").read_text() == (ref_dir / "summary.csv").read_text()
    # validate.py under torchrun: each of the 15 validation samples once, the log's numbers.
    results = tmp_path / "results.json"
    val = torchrun(REPO_ROOT / "validate.py", *args[:6], "--checkpoint",
                   ref_dir / "last.pth.tar", "--use-ema", "-b", "4", "-j", "0",
                   "--results-file", results, timeout=300)
    assert val.returncode == 0, val.stdout + val.stderr
    res = json.loads(results.read_text())
    row = list(csv.DictReader((ref_dir / "summary.csv").read_text().splitlines()))[-1]
    assert res["count"] == 15 and res["top1"] == float(row["eval_top1"])
