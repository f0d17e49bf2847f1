"""The checkpoint schema: `ematrain.checkpoint.schema.SCHEMA` names every key a checkpoint holds, every
stateful part of a run round-trips through it, older checkpoints are read, and the README shows the
same table."""
from __future__ import annotations

import pytest
import torch
from conftest import REPO_ROOT, make_training, run_epochs, tiny_args

from ematrain.checkpoint import files
from ematrain.checkpoint import schema as schema_mod
from ematrain.util.errors import UserError

TINY = tiny_args(epochs=3)


pytestmark = pytest.mark.usefixtures("one_thread_no_plots")


def keys_named(ckpt: dict) -> set[str]:
    return {"state_dict_ema_<i>" if k.startswith("state_dict_ema_") else k for k in ckpt}


def test_a_checkpoint_holds_exactly_the_schemas_keys(small_data, tmp_path):
    tr = make_training([small_data, *TINY, "--model-ema", "--model-ema-decay", "0.9", "0.99"])
    run_epochs(tr, tmp_path)
    ckpt = files.load_file(tmp_path / "last.pth.tar")
    schema = {k.name for k in schema_mod.SCHEMA}
    # Missing: the float16 AMP scaler (CUDA), the post-hoc EMAs (off in this run), the
    # post-hoc key of model_posthoc_best.pth.tar (tests/test_posthoc.py) and the per-process
    # buffers of torchrun (tests/test_distributed_resume.py), a stream's position
    # (tests/test_train_on_every_reader.py), the trackers' state (off here:
    # tests/test_trackers_in_training.py), feature distillation's projection
    # (tests/test_distillation_in_training.py).
    assert keys_named(ckpt) == schema - {"amp_scaler", "posthoc_ema", "posthoc", "rank_buffers",
                                         "data_stream", "trackers", "task_state"}
    assert ckpt["version"] == schema_mod.CHECKPOINT_VERSION
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == "test_resnet"
    assert ckpt["ema"]["keys"] == ["state_dict_ema", "state_dict_ema_1"]
    owners = {owner for k in schema_mod.SCHEMA for owner in k.owner.split(", ")}
    assert set(tr.run.parts()) - {"amp_scaler"} <= owners


def state_of(part):
    return part.full_state_dict() if hasattr(part, "full_state_dict") else part.state_dict()


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_every_stateful_part_round_trips(small_data, tmp_path):
    """Train one epoch and stop mid-way through the next; a fresh run restored from the saved
    file has every part's state equal, part by part."""
    argv = [small_data, *TINY, "--model-ema", "--model-ema-decay", "0.9", "0.99", "--seed", "5"]
    tr = make_training(argv)
    run_epochs(tr, tmp_path)
    loader, _ = tr.run.data.loaders(1, 0, seed=5)
    updates = tr.loop.run(loader)
    next(updates)
    next(updates)  # two optimizer updates into epoch 1
    tr.loop.check()
    path = tmp_path / "mid.pth.tar"
    files.write_file(path, schema_mod.save(tr.run))
    updates.close()
    fresh = make_training([*argv[:-1], "9"])  # another seed: other initial weights
    schema_mod.restore(fresh.run, files.load_file(path), path)
    parts, restored = tr.run.parts(), fresh.run.parts()
    assert parts.keys() == restored.keys() == {"model", "optimizer", "scheduler", "emas",
                                               "counters", "keeper", "summary"}
    for name in parts:
        assert_same(state_of(parts[name]), state_of(restored[name]), name)
    assert tr.run.counters.epoch == 1 and tr.run.counters.epoch_step == 2


def test_a_version_2_checkpoint_is_read_in_the_current_layout():
    old = {"epoch": 4, "state_dict": {}, "num_updates": 60, "version": 2,
           "ema": {"decays": [0.9, 0.99]},
           "resume_state": {"best": [{"metric": 80.0, "epoch": 3}, {"metric": 85.0, "epoch": 4},
                                     {"metric": 70.0, "epoch": 4}],
                            "history": [[80.0, 3]], "rows": [{"epoch": 0}], "skipped_nonfinite": 1,
                            "epoch": 5, "epoch_step": 7, "loss_sum": 3.5, "loss_count": 28}}
    new = schema_mod.upgrade(old)
    assert new["counters"] == {"epoch": 5, "epoch_step": 7, "loss_sum": 3.5, "loss_count": 28,
                               "num_updates": 60, "skipped_nonfinite": 1}
    assert new["keeper"] == {"best": {"raw": {"metric": 80.0, "epoch": 3},
                                      "ema 0.9": {"metric": 85.0, "epoch": 4},
                                      "ema 0.99": {"metric": 70.0, "epoch": 4}},
                             "history": [[80.0, 3]]}
    assert new["summary"] == {"rows": [{"epoch": 0}]}
    # timm's checkpoints have no counters: the run goes on after their epoch.
    assert schema_mod.upgrade({"epoch": 9, "state_dict": {}})["counters"]["epoch"] == 10


@pytest.mark.parametrize("key,value,reason", [
    ("counters", "seven", "counters"),
    ("keeper", {"best": 3}, "keeper"),
    ("ema", {"decays": [0.9], "keys": ["state_dict_ema_7"]}, "ema"),
])
def test_a_part_that_does_not_fit_is_one_line(small_data, tmp_path, key, value, reason):
    tr = make_training([small_data, *TINY, "--model-ema", "--model-ema-decay", "0.9"])
    ckpt = schema_mod.save(tr.run)
    ckpt[key] = value
    with pytest.raises(UserError, match=f"its '{reason}' does not fit"):
        schema_mod.restore(make_training([small_data, *TINY, "--model-ema", "--model-ema-decay",
                                       "0.9"]).run, ckpt, "x.pth.tar")


def test_the_readme_shows_the_schema():
    readme = (REPO_ROOT / "README.md").read_text()
    assert schema_mod.schema_markdown() in readme
