"""The trackers, read back with the libraries' own readers: TensorBoard's EventAccumulator and
the records W&B writes offline. What is logged is there at its step, a resumed run continues the
same tracker run with each step once, and a tracker that fails never raises into training."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import wandb_records

from ematrain.run.weight_sets import weight_sets
from ematrain.trackers import Trackers, TrackerSpec, check_installed, names
from ematrain.util.errors import UserError


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline (no account, no network), its files under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of an event folder as TensorBoard shows it: [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def as_tb(value: float) -> float:
    """A value as TensorBoard keeps it (float32)."""
    return float(np.float32(value))


SETS = weight_sets([0.99, 0.9], names=["0.99", "hl2ep"])


def epoch_of(epoch: int) -> dict:
    """One epoch's values as a run builds them: its summary row and every set's results."""
    results = {s.name: {"loss": 1.0 / (epoch + 2) + i, "top1": 40.0 + epoch + i, "top5": 90.0 + i}
               for i, s in enumerate(SETS)}
    row = {"epoch": epoch, "train_loss": 2.0 - epoch / 10, "lr": 0.1, "eval_loss": 0.5,
           "eval_top1": results["ema 0.99"]["top1"], "eval_top5": 91.0}
    return names.epoch_values(row, results, SETS, seconds=3.25,
                              half_lives={"ema 0.99": 0.5, "ema hl2ep": float("inf")})


def test_epoch_values_name_every_weight_set_and_keep_timms_keys():
    values = epoch_of(1)
    assert values["val/top1/raw"] == 41.0
    assert values["val/top1/ema_0.99"] == values["eval_top1"] == 42.0
    assert values["val/loss/ema_hl2ep"] == pytest.approx(1 / 3 + 2)
    assert {"epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"} <= set(values)
    assert values["ema/half_life_epochs/ema_0.99"] == 0.5
    # A half-life longer than the run so far is infinite: nothing is drawn.
    assert "ema/half_life_epochs/ema_hl2ep" not in values
    assert values["epoch/seconds"] == 3.25


def test_tensorboard_scalars_read_back_at_their_steps(tmp_path):
    run_dir = tmp_path / "run"
    t = Trackers(TrackerSpec(tensorboard=""))
    t.start(run_dir, "run")
    assert t.active == ["tensorboard"]
    t.log_hparams({"lr": 0.1, "model": "test_resnet", "decays": [0.99], "unset": None},
                  names.best_tags(SETS, "top1"))
    for step in range(1, 7):
        t.log_interval(step, names.interval_values(1.0 / step, 0.1, 250.0, 0.125))
    t.log_epoch(0, epoch_of(0), step=6)
    t.finish(names.best_values({"raw": {"metric": 40.0, "epoch": 0}}, SETS, "top1"))
    got = scalars(run_dir / "tensorboard")
    assert got["train/loss"] == [(s, as_tb(1.0 / s)) for s in range(1, 7)]
    assert got["train/data_wait"] == [(s, 0.125) for s in range(1, 7)]
    for tag, value in epoch_of(0).items():
        assert got[tag] == [(6, as_tb(value))], tag
    assert got["best/raw/top1"] == [(6, 40.0)] and got["best/raw/epoch"] == [(6, 0.0)]


def test_tensorboard_resume_purges_the_steps_after_the_checkpoint(tmp_path, monkeypatch):
    """A killed run logged steps 1-9 and was checkpointed after step 5; the resumed run logs 6-12
    again: TensorBoard shows each step once, 6-9 as the resumed run logged them."""
    run_dir = tmp_path / "run"
    killed = Trackers(TrackerSpec(tensorboard=""))
    with monkeypatch.context() as m:  # the killed process started well before the resumed one
        started = time.time() - 60
        m.setattr(time, "time", lambda: started)
        killed.start(run_dir, "run")
    for step in range(1, 10):
        killed.log_interval(step, {"train/loss": float(step)})
        if step == 5:
            state = killed.state_dict()
    killed.flush()  # then the process is killed: no close
    assert state["tensorboard"]["step"] == 5

    resumed = Trackers(TrackerSpec(tensorboard=""))
    resumed.load_state_dict(state)
    resumed.start(run_dir, "run", resume_at=5)
    for step in range(6, 13):
        resumed.log_interval(step, {"train/loss": 100.0 + step})
    resumed.close()
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    expected = [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 13)]
    assert scalars(run_dir / "tensorboard")["train/loss"] == expected


def test_wandb_offline_history_summary_and_config_read_back(tmp_path, offline_wandb):
    t = Trackers(TrackerSpec(wandb=True, wandb_project="ematrain-tests", wandb_tags=("a", "b")))
    t.start(tmp_path / "run", "run")
    assert t.active == ["wandb"]
    t.log_hparams({"lr": 0.1, "model_ema_decay": [0.99, 0.9]})
    for step in range(1, 7):
        t.log_interval(step, names.interval_values(1.0 / step, 0.1, 250.0, 0.125))
    t.log_epoch(0, epoch_of(0), step=6)
    best = names.best_values({"ema 0.99": {"metric": 41.0, "epoch": 0}}, SETS, "top1")
    t.finish(best)
    [path] = wandb_records.offline_files(offline_wandb)
    info = wandb_records.run_info(path)
    assert (info["project"], info["name"], info["tags"]) == ("ematrain-tests", "run", ["a", "b"])
    assert info["id"] == t.state["wandb"]["run_id"]
    rows = wandb_records.history(path)
    assert [r["_step"] for r in rows] == list(range(1, 7))
    assert [r["train/loss"] for r in rows] == [1.0 / s for s in range(1, 7)]
    for key, value in epoch_of(0).items():  # W&B keeps doubles: exactly the values logged
        assert rows[-1][key] == value, key
    final = wandb_records.summary(path)
    assert final["best/ema_0.99/top1"] == 41.0 and final["best/ema_0.99/epoch"] == 0
    config = {k: v for k, v in _config_updates(path).items()}
    assert config["lr"] == 0.1 and config["model_ema_decay"] == [0.99, 0.9]


def _config_updates(path: Path) -> dict:
    out = {}
    for record in wandb_records.records(path):
        kind = record.WhichOneof("record_type")
        items = (record.run.config.update if kind == "run" else
                 record.config.update if kind == "config" else [])
        out.update({i.key: __import__("json").loads(i.value_json) for i in items})
    return out


def test_wandb_resume_continues_the_same_run_with_each_step_once(tmp_path, offline_wandb):
    spec = TrackerSpec(wandb=True, wandb_project="ematrain-tests")
    killed = Trackers(spec)
    killed.start(tmp_path / "run", "run")
    for step in range(1, 10):
        killed.log_interval(step, {"train/loss": float(step)})
        if step == 5:
            state = killed.state_dict()
    killed.close(1)
    resumed = Trackers(spec)
    resumed.load_state_dict(state)
    resumed.start(tmp_path / "run", "run", resume_at=5)
    for step in range(6, 13):
        resumed.log_interval(step, {"train/loss": float(step)})
    resumed.close()
    run_id = state["wandb"]["run_id"]
    assert resumed.state["wandb"]["run_id"] == run_id
    files = wandb_records.offline_files(offline_wandb, run_id)
    assert len(files) == 2  # the killed segment and the resumed one, one W&B run
    # The resumed segment first logs again the checkpoint's last rows (a killed W&B service may
    # not have written them), then goes on.
    assert [r["_step"] for r in wandb_records.history(files[1])] == list(range(1, 13))
    rows = wandb_records.synced_history(files)
    assert [(r["_step"], r["train/loss"]) for r in rows] == [(s, float(s)) for s in range(1, 13)]


def test_wandb_steps_a_killed_service_lost_are_logged_again(tmp_path, offline_wandb):
    """The killed process's W&B service wrote nothing of the steps after 2 (as when killed
    within W&B's 15 s between writes): the resumed run still has every step once."""
    spec = TrackerSpec(wandb=True, wandb_project="ematrain-tests")
    killed = Trackers(spec)
    killed.start(tmp_path / "run", "run")
    for step in range(1, 3):
        killed.log_interval(step, {"train/loss": float(step)})
    killed.close(1)
    state = killed.state_dict()
    state["wandb"]["step"] = 6  # steps 3-6 were logged, checkpointed, and lost by W&B
    state["wandb"]["recent"] += [[s, {"train/loss": float(s)}] for s in range(3, 7)]
    resumed = Trackers(spec)
    resumed.load_state_dict(state)
    resumed.start(tmp_path / "run", "run", resume_at=6)
    for step in range(7, 9):
        resumed.log_interval(step, {"train/loss": float(step)})
    resumed.close()
    files = wandb_records.offline_files(offline_wandb, state["wandb"]["run_id"])
    rows = wandb_records.synced_history(files)
    assert [(r["_step"], r["train/loss"]) for r in rows] == [(s, float(s)) for s in range(1, 9)]


def test_wandb_resume_id_names_the_run_to_continue(tmp_path, offline_wandb):
    t = Trackers(TrackerSpec(wandb=True, wandb_project="p", wandb_resume_id="given123"))
    t.start(tmp_path / "run", "run")
    t.log_interval(1, {"train/loss": 1.0})
    t.close()
    [path] = wandb_records.offline_files(offline_wandb)
    assert wandb_records.run_info(path)["id"] == "given123"


# ----------------------------------------------------------------------------- failures
def test_a_tracker_that_cannot_start_is_one_warning_and_the_others_go_on(tmp_path, offline_wandb):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    warnings = []
    t = Trackers(TrackerSpec(tensorboard=str(blocker / "tb"), wandb=True, wandb_project="p"),
                 warn=warnings.append)
    t.start(tmp_path / "run", "run")
    assert t.active == ["wandb"]
    assert len(warnings) == 1 and warnings[0].startswith("warning: TensorBoard logging is off")
    assert "training goes on" in warnings[0] and "\n" not in warnings[0]
    for step in range(1, 4):
        t.log_interval(step, {"train/loss": float(step)})
    t.finish({})
    assert len(warnings) == 1
    [path] = wandb_records.offline_files(offline_wandb)
    assert [r["_step"] for r in wandb_records.history(path)] == [1, 2, 3]


def test_a_tracker_that_fails_later_warns_once_and_never_raises(tmp_path, monkeypatch, capfd):
    """Disk full under TensorBoard's writer: one warning at the first failure, then off; every
    later call (logging, the checkpoint's state, the end) goes on without it, and no traceback
    (of TensorBoard's writer thread) reaches stderr."""
    from tensorboard.summary.writer import record_writer

    warnings = []
    t = Trackers(TrackerSpec(tensorboard=""), warn=warnings.append)
    t.start(tmp_path / "run", "run")
    t.log_interval(1, {"train/loss": 1.0})
    good = t.state_dict()

    def full(self, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    for step in range(2, 30):
        t.log_interval(step, {"train/loss": float(step)})
        t.flush()
    assert t.active == []
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: TensorBoard logging failed (")
    assert "No space left on device" in warnings[0]
    assert t.state_dict() == good  # the last state it had, for a resume
    t.log_epoch(0, {"eval_top1": 1.0})
    t.finish({"best/raw/top1": 1.0})
    t.close()
    assert len(warnings) == 1
    assert "Traceback" not in capfd.readouterr().err


def test_only_the_primary_process_logs(tmp_path):
    t = Trackers(TrackerSpec(tensorboard="", wandb=True), primary=False)
    t.start(tmp_path / "run", "run")
    t.log_interval(1, {"train/loss": 1.0})
    t.finish({})
    assert t.active == [] and not (tmp_path / "run").exists()


def test_a_missing_package_is_one_line_naming_the_install(monkeypatch):
    check_installed(TrackerSpec(wandb=True, tensorboard=""))  # both installed here
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(UserError) as err:
        check_installed(TrackerSpec(wandb=True, tensorboard=""))
    assert str(err.value) == "--log-wandb needs the wandb package: pip install 'ematrain[log]'"
    check_installed(TrackerSpec(tensorboard=""))


def test_a_table_after_training_reads_back_in_both(tmp_path, offline_wandb):
    """validate.py --posthoc's table: TensorBoard's Text view and a W&B Table, after the run's
    last step, with its headline numbers."""
    spec = TrackerSpec(tensorboard="", wandb=True, wandb_project="p")
    run = Trackers(spec)
    run.start(tmp_path / "run", "run")
    run.log_interval(6, {"train/loss": 1.0})
    state = run.state_dict()
    run.finish({})
    later = Trackers(spec)  # validate.py, after training: the run's trackers again
    later.load_state_dict(state)
    later.start(tmp_path / "run", "run", resume_at=6)
    columns, rows = ["weights", "sigma_rel", "top1"], [["raw", None, 90.0], ["power", 0.05, 95.5]]
    later.log_table("posthoc/table", columns, rows, {"posthoc/best_top1": 95.5})
    later.close()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    [text] = acc.Tensors("posthoc/table/text_summary")
    assert text.step == 7
    assert text.tensor_proto.string_val[0].decode() == (
        "| weights | sigma_rel | top1 |\n|---|---|---|\n| raw | - | 90 |\n| power | 0.05 | 95.5 |")
    assert scalars(tmp_path / "run" / "tensorboard")["posthoc/best_top1"] == [(7, 95.5)]
    files = wandb_records.offline_files(offline_wandb, state["wandb"]["run_id"])
    assert len(files) == 2
    row = wandb_records.history(files[1])[-1]  # after the carried rows (see wandb_writer)
    assert row["_step"] == 7 and row["posthoc/table/_type"] == "table-file"
    table = json.loads((files[1].parent / "files" / row["posthoc/table/path"]).read_text())
    assert table["columns"] == columns and table["data"] == rows
    assert wandb_records.summary(files[1])["posthoc/best_top1"] == 95.5
