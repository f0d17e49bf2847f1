"""The resume policy: `train.py --resume PATH` alone continues a run with the settings its
checkpoint records, and every setting given beside it is kept, applied or refused by the table in
`ematrain.settings.resume_policy`, never silently replaced or dropped."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_cli, run_in_process, tiny_args, torch_threads

from ematrain.checkpoint import files as ckpt_io
from ematrain.cli import train
from ematrain.run import restore
from ematrain.run.build import build_run
from ematrain.settings import resume_policy
from ematrain.settings.train_specs import resolve_train
from ematrain.util.errors import UserError

TINY = tiny_args("--seed", "3")
STEPS = 6  # 3 classes x 8 training images / batch 4


pytestmark = pytest.mark.usefixtures("one_thread_no_plots")


def train_in_process(*argv):
    return run_in_process(train.main, "train.py", *argv)


@pytest.fixture(scope="module")
def ema_run(small_data, tmp_path_factory) -> Path:
    """One finished epoch with two EMAs; tests copy it before resuming."""
    out = tmp_path_factory.mktemp("ema_run")
    with torch_threads(1):
        r = train_in_process(small_data, *TINY, "--model-ema", "--model-ema-decay", "0.9", "0.99",
                             "--output", out, "--experiment", "run")
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "run"


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


def rows(run: Path) -> list[dict]:
    with open(run / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- the four defects
def test_a_new_ema_interval_on_resume_applies_and_is_announced(ema_run, tmp_path):
    run = copy_run(ema_run, tmp_path)
    r = train_in_process("--resume", run / "last.pth.tar", "--model-ema-every", "4",
                         "--epochs", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resume: --model-ema-every 4 (the checkpoint's run had 1)" in r.stderr
    ckpt = torch.load(run / "last.pth.tar", weights_only=True)
    assert ckpt["ema"]["every"] == 4
    assert ckpt["ema"]["steps"] == 2 * STEPS
    # Every step of epoch 0, then every 4th of epoch 1 (steps 8 and 12).
    assert ckpt["ema"]["num_updates"] == STEPS + 2
    assert "model_ema_every: 4" in (run / "args.yaml").read_text()


def test_an_ema_run_resumed_without_ema_flags_keeps_its_ema(ema_run, small_data, tmp_path):
    run = copy_run(ema_run, tmp_path)
    r = train_in_process(small_data, "--model", "test_resnet", "--epochs", "2",
                         "--resume", run / "last.pth.tar")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(run / "last.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 1
    assert "state_dict_ema" in ckpt and "state_dict_ema_1" in ckpt
    assert ckpt["ema"]["decays"] == [0.9, 0.99] and ckpt["ema"]["steps"] == 2 * STEPS
    summary = rows(run)
    assert [r["epoch"] for r in summary] == ["0", "1"]
    assert all(r["eval_top1"] and r["raw_eval_top1"] and r["ema0.99_eval_top1"] for r in summary)


def test_an_ema_run_resumed_with_the_ema_switched_off_is_refused(ema_run, tmp_path):
    run = copy_run(ema_run, tmp_path)
    before = (run / "last.pth.tar").read_bytes()
    recipe = tmp_path / "off.yaml"
    recipe.write_text("model_ema: false\n")
    r = train_in_process("--resume", run / "last.pth.tar", "-c", recipe, "--epochs", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "it records --model-ema on, this run asks for off" in r.stderr
    assert (run / "last.pth.tar").read_bytes() == before


def test_renamed_class_folders_are_refused_on_resume(ema_run, small_data, tmp_path):
    run = copy_run(ema_run, tmp_path)
    renamed = tmp_path / "renamed"
    shutil.copytree(small_data, renamed)
    for split in ("train", "val"):
        (renamed / split / "class_0").rename(renamed / split / "class_z")
    before = (run / "last.pth.tar").read_bytes()
    r = train_in_process(renamed, "--resume", run / "last.pth.tar", "--epochs", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "class folders" in lines[0] and "differ" in lines[0]
    assert (run / "last.pth.tar").read_bytes() == before
    assert len(rows(run)) == 1


def test_the_printed_resume_command_alone_continues_the_run_exactly(small_data, tmp_path):
    """A run stopped after its first epoch prints `Resume with: python train.py --resume PATH`;
    that command, typed as printed in another directory, finishes the run exactly as an
    uninterrupted run ends."""
    flags = ["--model", "test_resnet", "--img-size", "32", "-b", "4", "-j", "0", "--epochs", "2",
             "--warmup-epochs", "0", "--lr", "0.07", "--drop", "0.1", "--model-ema",
             "--model-ema-half-life", "2it", "--seed", "11", "--sched", "step",
             "--decay-epochs", "1", "--smoothing", "0.05"]
    ref = run_cli("train.py", small_data, *flags, "--output", tmp_path / "ref", "--experiment", "r")
    assert ref.returncode == 0, ref.stderr[-2000:]
    stopper = tmp_path / "stop_after_first_epoch.py"
    stopper.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT / 'src')!r})\n"
        "from ematrain.cli import train\n"
        "from ematrain.run import training\n"
        "from ematrain.util import signals\n"
        "signals.StopRequest.__call__ = lambda self: self.signum is not None or "
        "getattr(self, 'epochs_seen', 0) > 0\n"
        "real = training.Training.finish_epoch\n"
        "def finish(self, epoch, loader, real=real):\n"
        "    real(self, epoch, loader)\n"
        "    signals.StopRequest.epochs_seen = 1\n"
        "training.Training.finish_epoch = finish\n"
        "sys.exit(train.main())\n")
    import subprocess
    import sys
    first = subprocess.run([sys.executable, stopper, small_data, *flags, "--output",
                            tmp_path / "out", "--experiment", "r"], capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 130, first.stderr[-2000:]
    hint = [line for line in first.stderr.splitlines() if "Resume with:" in line]
    assert len(hint) == 1 and "stopped after epoch 0" in hint[0]
    command = hint[0].split("Resume with: ")[1].split()
    assert command[:3] == ["python", "train.py", "--resume"] and len(command) == 4
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    second = run_cli(command[1], *command[2:], cwd=elsewhere)
    assert second.returncode == 0, second.stderr[-2000:]
    a = torch.load(tmp_path / "ref/r/last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "out/r/last.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    assert a["counters"] == b["counters"] and a["ema"]["decays"] == b["ema"]["decays"]
    assert (rows(tmp_path / "ref/r") == rows(tmp_path / "out/r"))


def test_a_stop_mid_epoch_prints_the_same_resume_command(ema_run, tmp_path, monkeypatch):
    """The stop in the middle of an epoch names the command the stop after an epoch names."""
    from ematrain.util import signals
    run = copy_run(ema_run, tmp_path)
    monkeypatch.setattr(signals.StopRequest, "__call__", lambda self: True)
    mid = train_in_process("--resume", run / "last.pth.tar", "--epochs", "2")
    assert mid.returncode == 130, mid.stderr[-2000:]
    last = run / "last.pth.tar"
    expected = f"Resume with: python train.py --resume {last}"
    line = [ln for ln in mid.stderr.splitlines() if "Resume with:" in ln]
    assert line == [f"train.py: stopped at epoch 1, step 1; saved {last}. {expected}"]
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["counters"]["epoch"] == 1 and ckpt["counters"]["epoch_step"] == 1


# ----------------------------------------------------------------------------- the table
def resolve(*argv):
    return resolve_train([str(a) for a in argv])


def test_the_checkpoint_seed_is_kept(ema_run):
    settings, source = resolve("--resume", ema_run / "last.pth.tar", "--seed", "99")
    assert settings.loop.seed == 3
    assert settings.model.model == "test_resnet" and settings.ema.decays == [0.9, 0.99]
    assert "seed" not in source.changed


def test_another_architecture_is_refused(ema_run):
    with pytest.raises(UserError, match=r"it records --model test_resnet, this run asks for "
                                        r"resnet18 \(the weights are that architecture's\)"):
        resolve("--resume", ema_run / "last.pth.tar", "--model", "resnet18")


def test_optimizer_settings_need_a_fresh_optimizer(ema_run):
    with pytest.raises(UserError, match="--weight-decay 0.1 .*add --no-resume-opt"):
        resolve("--resume", ema_run / "last.pth.tar", "--weight-decay", "0.1")
    settings, source = resolve("--resume", ema_run / "last.pth.tar", "--weight-decay", "0.1",
                               "--no-resume-opt")
    assert settings.optim.weight_decay == 0.1 and "weight_decay" in source.changed


def test_a_batch_size_change_is_refused_only_mid_epoch(ema_run, tmp_path):
    settings, _ = resolve("--resume", ema_run / "last.pth.tar", "-b", "2")
    assert settings.loader.batch_size == 2  # at an epoch boundary the new size applies
    ckpt = torch.load(ema_run / "last.pth.tar", weights_only=True)
    ckpt["counters"]["epoch_step"] = 2
    mid = tmp_path / "mid.pth.tar"
    torch.save(ckpt, mid)
    with pytest.raises(UserError, match="in the middle of an epoch with --batch-size 2"):
        resolve("--resume", mid, "-b", "2")


def test_a_longer_run_rebuilds_the_schedule_for_its_length(ema_run, tmp_path):
    run = copy_run(ema_run, tmp_path)
    settings, source = resolve("--resume", run / "last.pth.tar", "--epochs", "4")
    assert "epochs" in source.changed
    built = build_run(settings)
    restore.restore(built, source)
    # Cosine over 4 epochs, now at epoch 1: lr = 0.05 * (1 + cos(pi / 4)) / 2.
    import math
    expected = 0.05 * (1 + math.cos(math.pi / 4)) / 2
    assert built.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6)
    assert built.counters.epoch == 1 and built.emas.regular.steps == STEPS


def test_the_readme_shows_the_policy_table():
    readme = (REPO_ROOT / "README.md").read_text()
    assert resume_policy.policy_markdown() in readme


def test_resume_auto_before_any_checkpoint_keeps_the_folder(small_data, tmp_path, capsys):
    run = tmp_path / "x"
    run.mkdir(parents=True)
    (run / "args.yaml").write_text("model: test_resnet\n")  # a run killed before epoch 0 ended
    rc = train.main([str(small_data), *TINY, "--output", str(tmp_path), "--experiment", "x",
                         "--resume", "auto"])
    assert rc == 0
    assert (run / "last.pth.tar").is_file()
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["x"]


def test_resume_from_a_path_continues_in_that_runs_folder(small_data, tmp_path, capsys):
    assert train.main([str(small_data), *TINY, "--output", str(tmp_path),
                           "--experiment", "first"]) == 0
    last = tmp_path / "first/last.pth.tar"
    assert train.main([str(small_data), *TINY, "--epochs", "2", "--resume", str(last)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "first/summary.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["first"]


def test_no_resume_opt_resumes_at_the_schedules_lr(small_data, tmp_path, capsys):
    assert train.main([str(small_data), *TINY, "--epochs", "2", "--warmup-epochs", "1",
                           "--warmup-lr", "1e-4", "--sched", "step", "--decay-epochs", "10",
                           "--output", str(tmp_path), "--experiment", "w"]) == 0
    ckpt = tmp_path / "w/checkpoint-0.pth.tar"
    ckpt = ckpt if ckpt.exists() else tmp_path / "w/model_best.pth.tar"
    settings, source = resolve_train(["--resume", ckpt, "--no-resume-opt"])
    run = build_run(settings)
    restore.restore(run, source)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_resume_with_other_decays_is_refused(small_data, tmp_path, capsys):
    assert train.main([str(small_data), *TINY, "--output", str(tmp_path), "--experiment", "r",
                           "--model-ema-decay", "0.9"]) == 0
    rc = train.main([str(small_data), *TINY, "--epochs", "2", "--output", str(tmp_path),
                         "--experiment", "r", "--resume", "auto", "--model-ema-decay", "0.99"])
    err = capsys.readouterr().err
    assert rc == 2 and "it records --model-ema-decay 0.9, this run asks for 0.99" in err


def test_a_new_decay_is_refused_before_anything_is_built(ema_run):
    with pytest.raises(UserError, match=r"it records --model-ema-decay 0.9 0.99, this run asks "
                                        r"for 0.5 \(each EMA shadow is the average at its own decay\)"):
        resolve("--resume", ema_run / "last.pth.tar", "--model-ema-decay", "0.5")


def test_a_half_life_keeps_its_horizon_when_the_batch_size_changes(small_data, tmp_path):
    first = train_in_process(small_data, *TINY, "--model-ema-half-life", "1ep", "--output",
                             tmp_path, "--experiment", "h")
    assert first.returncode == 0, first.stderr[-2000:]
    last = tmp_path / "h" / "last.pth.tar"
    r = train_in_process("--resume", last, "-b", "2", "--epochs", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the same half-lives over other images per step" in r.stderr
    ckpt = torch.load(last, weights_only=True)
    # One epoch is now 12 steps of 2 images: the decay whose half-life is 12 steps.
    assert ckpt["ema"]["decays"] == [pytest.approx(0.5 ** (1 / 12), rel=1e-12)]
    assert ckpt["ema"]["steps"] == STEPS + 12


def test_no_resume_opt_applies_to_its_own_resume_only(ema_run, tmp_path):
    run = copy_run(ema_run, tmp_path)
    r = train_in_process("--resume", run / "last.pth.tar", "--no-resume-opt", "--epochs", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    settings, _ = resolve("--resume", run / "last.pth.tar", "--epochs", "3")
    assert settings.loop.no_resume_opt is False  # the next resume restores the optimizer again


def test_a_timm_checkpoint_resumes_with_fresh_parts_named(small_data, tmp_path):
    import argparse

    import timm
    from timm.optim import create_optimizer_v2
    model = timm.create_model("test_resnet", num_classes=3)
    # As timm's train.py builds it for --opt sgd --weight-decay 2e-5.
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, weight_decay=2e-5, momentum=0.9)
    path = tmp_path / "timm.pth.tar"
    torch.save({"epoch": 0, "arch": "test_resnet", "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "version": 2,
                "args": argparse.Namespace(model="test_resnet", epochs=1)}, path)
    r = train_in_process(small_data, *TINY, "--epochs", "2", "--output", tmp_path / "out",
                         "--resume", path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "is timm's: it holds no LR scheduler state (the schedule is rebuilt" in r.stderr
    assert "resumed from" in r.stderr and "at epoch 1" in r.stderr
    (run_dir,) = (tmp_path / "out").iterdir()
    assert [r["epoch"] for r in rows(run_dir)] == ["1"]


def test_the_start_weights_are_not_loaded_again_on_resume(small_data, tmp_path):
    import timm
    weights = tmp_path / "start.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), weights)
    first = train_in_process(small_data, *TINY, "--initial-checkpoint", weights, "--output",
                             tmp_path, "--experiment", "w")
    assert first.returncode == 0, first.stderr[-2000:]
    weights.unlink()  # moved away after the run started
    r = train_in_process("--resume", tmp_path / "w/last.pth.tar", "--epochs", "2")
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_new_batch_size_at_an_epoch_boundary_gets_its_own_learning_rate(small_data, tmp_path):
    # No --lr: --lr-base 0.1 per 256 images, with 4 images per step and then 8.
    no_lr = [a for a in TINY if a not in ("--lr", "0.05")]
    first = train_in_process(small_data, *no_lr, "--output", tmp_path, "--experiment", "b")
    assert first.returncode == 0, first.stderr[-2000:]
    settings, source = resolve("--resume", tmp_path / "b/last.pth.tar", "-b", "8",
                               "--epochs", "2")
    built = build_run(settings, resuming=True)
    restore.restore(built, source)
    import math
    peak = 0.1 * 8 / 256
    assert built.lr == pytest.approx(peak)
    # Cosine over 2 epochs, at epoch 1, from the new peak (not the checkpoint's 0.1 * 4 / 256).
    expected = peak * (1 + math.cos(math.pi / 2)) / 2
    assert built.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_a_stop_under_torchrun_names_torchrun(ema_run, monkeypatch):
    from ematrain.run.training import Training, resume_launcher
    from ematrain.util.distributed import DistInfo
    settings, source = resolve("--resume", ema_run / "last.pth.tar")
    tr = Training(build_run(settings, resuming=True), source)
    assert resume_launcher(tr.run, tr.prog) == "python train.py"
    tr.run.dist = DistInfo(rank=0, world_size=8, local_rank=0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_launcher(tr.run, tr.prog) == "torchrun --nnodes 2 --nproc_per_node 4 train.py"


# ------------------------------------------------------------------------- names and --resume auto
def test_the_default_run_name_is_timms_date_model_imgsize(small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with torch_threads(1):
        r = train_in_process(small_data, *TINY, "--model", "test_vit", "--img-size", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = (tmp_path / "output" / "train").iterdir()
    date, clock, model, size = run.name.split("-")
    assert (len(date), len(clock), model, size) == (8, 6, "test_vit", "16")


def _run_named(small_data, out, name, *extra):
    with torch_threads(1):
        r = train_in_process(small_data, *TINY, "--output", out, "--experiment", name, *extra)
    assert r.returncode == 0, r.stderr[-2000:]


def test_resume_auto_without_a_name_continues_the_newest_unfinished_run_of_the_model(
        small_data, tmp_path):
    out = tmp_path / "runs"
    _run_named(small_data, out, "old", "--epochs", "2")   # finished
    _run_named(small_data, out, "short", "--epochs", "1")  # finished
    _run_named(small_data, out, "vit", "--model", "test_vit")  # another model
    for name in ("short", "old"):  # unfinished, "old" newest: their --epochs raised in the record
        ckpt = torch.load(out / name / "last.pth.tar", weights_only=True)
        ckpt["args"]["epochs"] = 3
        torch.save(ckpt, out / name / "last.pth.tar")
    with torch_threads(1):
        r = train_in_process(small_data, *TINY, "--epochs", "3", "--output", out, "--resume",
                             "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    said = [l for l in r.stderr.splitlines() if l.startswith("--resume auto:")]
    assert len(said) == 1 and f"continuing {out / 'old'}" in said[0], r.stderr
    assert "at epoch 2 of 3" in said[0] and "also unfinished: short" in said[0]
    assert [int(row["epoch"]) for row in rows(out / "old")] == [0, 1, 2]
    assert sorted(p.name for p in out.iterdir()) == ["old", "short", "vit"]  # no new folder


def test_resume_auto_without_a_name_refuses_when_every_run_has_finished(small_data, tmp_path):
    out = tmp_path / "runs"
    _run_named(small_data, out, "a")
    _run_named(small_data, out, "b")
    with torch_threads(1):
        r = train_in_process(small_data, *TINY, "--output", out, "--resume", "auto")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "every test_resnet run under" in line and "(a, b)" in line and "--experiment" in line
    with torch_threads(1):  # nothing of that model there: a fresh run, said in one line
        r = train_in_process(small_data, *TINY, "--model", "test_vit", "--output", out, "--resume",
                             "auto")
    assert r.returncode == 0 and "--resume auto: no test_vit run under" in r.stderr


# --------------------------------------------------------------------------- a timm run, continued
def _timm_run(folder: Path, decay: float = 0.9) -> None:
    """Two epochs as timm's train.py leaves them, from timm's own code path: a ModelEmaV3
    updated with timm's step count, timm's CheckpointSaver (state_dict_ema, args as a
    Namespace, checkpoint-<epoch> history, model_best.pth.tar) and its update_summary."""
    import argparse

    import timm
    from timm.utils import CheckpointSaver, ModelEmaV3, update_summary
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    ema = ModelEmaV3(model, decay=decay)
    optimizer = timm.optim.create_optimizer_v2(model, "sgd", lr=0.05, weight_decay=2e-5,
                                               momentum=0.9)  # as timm's train.py makes it
    args = argparse.Namespace(model="test_resnet", model_ema=True, model_ema_decay=decay,
                              model_ema_warmup=False, model_ema_force_cpu=False, epochs=3)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder), decreasing=False, max_history=2)
    num_updates = 0
    for epoch, top1 in enumerate([60.0, 50.0]):
        for _ in range(STEPS):
            loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            ema.update(model, step=num_updates)
        update_summary(epoch, {"loss": 1.0 - epoch / 10},
                       {"loss": 0.9, "top1": top1, "top5": 100.0}, str(folder / "summary.csv"),
                       lr=0.05, write_header=epoch == 0)
        saver.save_checkpoint(epoch, metric=top1)


def test_a_timm_run_with_an_ema_resumes_with_its_ema(small_data, tmp_path):
    timm_dir = tmp_path / "timm" / "t"
    _timm_run(timm_dir)
    theirs = ckpt_io.load_file(timm_dir / "last.pth.tar")
    argv = [small_data, *TINY, "--epochs", "3", "--model-ema", "--model-ema-decay", "0.9",
            "--resume", timm_dir / "last.pth.tar"]
    settings, source = resolve_train([str(a) for a in argv])
    run = build_run(settings, resuming=True)
    restore.restore(run, source)
    assert run.counters.epoch == 2
    assert run.emas.regular.steps == run.counters.num_updates == 2 * STEPS  # timm's epoch x updates
    for key, value in theirs["state_dict_ema"].items():
        assert torch.equal(run.emas.regular.shadow_state_dict(0)[key], value), key
    # A changed decay is refused as for our runs; leaving the EMA out names the flags to add.
    for extra, words in ((["--model-ema", "--model-ema-decay", "0.99"], "averages decays 0.9"),
                         ([], "add --model-ema --model-ema-decay 0.9 to continue timm's EMA")):
        r = train_in_process(small_data, *TINY, "--epochs", "3", *extra, "--resume",
                             timm_dir / "last.pth.tar")
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_timm_run_continued_in_its_folder_keeps_its_rows_best_and_history(small_data, tmp_path):
    from conftest import assert_files_agree_with_records
    timm_dir = tmp_path / "timm" / "t"
    _timm_run(timm_dir)
    with torch_threads(1):
        r = train_in_process(small_data, *TINY, "--epochs", "3", "--model-ema", "--model-ema-decay",
                             "0.9", "--resume", timm_dir / "last.pth.tar",
                             "--output", timm_dir.parent, "--experiment", "t")
    assert r.returncode == 0, r.stderr[-3000:]
    said = [l for l in r.stderr.splitlines() if l.startswith("resume:")]
    assert any("continues from timm's state_dict_ema" in l and f"2 epochs x {STEPS} steps" in l
               for l in said), said
    assert any("holds no LR scheduler state" in l for l in said), said
    assert any(f"continuing in timm's folder {timm_dir}: 2 summary rows, best epoch 0" in l
               for l in said), said
    table = rows(timm_dir)
    assert [row["epoch"] for row in table] == ["0", "1", "2"]
    assert [float(row["eval_top1"]) for row in table[:2]] == [60.0, 50.0]  # timm's, kept
    assert table[2]["raw_eval_top1"] and not table[0]["raw_eval_top1"]
    ours = torch.load(timm_dir / "last.pth.tar", weights_only=True)
    assert ours["ema"]["steps"] == 3 * STEPS
    assert ours["keeper"]["best"]["ema 0.9"]["epoch"] in (0, 2)
    assert_files_agree_with_records(timm_dir)
    for epoch in (0, 1):  # timm's history files are kept, untouched
        kept = ckpt_io.load_file(timm_dir / f"checkpoint-{epoch}.pth.tar")
        assert "ematrain_version" not in kept and kept["epoch"] == epoch


def test_a_run_saved_before_primary_weights_goes_on_with_the_raw_weights_in_timms_names(
        small_data, tmp_path):
    """A version-3 checkpoint of before --primary-weights (its keeper and summary.csv kept the
    raw weights in eval_* and model_best.pth.tar) resumes in its own layout, even when asked
    for another (said in one line)."""
    from conftest import assert_files_agree_with_records
    _run_named(small_data, tmp_path, "old", "--model-ema", "--model-ema-decay", "0.9", "0.99",
               "--primary-weights", "raw")
    last = tmp_path / "old" / "last.pth.tar"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["args"]["primary_weights"], ckpt["ema"]["names"]  # as that version wrote them
    torch.save(ckpt, last)
    with torch_threads(1):
        r = train_in_process("--resume", last, "--epochs", "2", "--primary-weights", "ema")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "keeping --primary-weights raw from the checkpoint, not ema" in r.stderr
    table = rows(tmp_path / "old")
    assert list(table[0])[:6] == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5",
                                  "lr"]
    assert {"ema_eval_top1", "ema0.99_eval_top1"} <= set(table[0])
    assert "raw_eval_top1" not in table[0]
    assert sorted(p.name for p in (tmp_path / "old").glob("model_best*")) == [
        "model_best.pth.tar", "model_best_ema.pth.tar"]
    again = torch.load(last, weights_only=True)
    assert again["args"]["primary_weights"] == "raw"
    assert again["metric"] == float(table[1]["eval_top1"])  # the raw weights', as before
    assert_files_agree_with_records(tmp_path / "old")


@pytest.mark.parametrize("metric", ["top1", "loss"])
def test_the_best_file_and_history_follow_the_first_ema_by_the_eval_metric(metric):
    """With an EMA on, model_best.pth.tar and the checkpoint history are the first EMA's
    (timm's meaning), by --eval-metric, loss the lower the better; every other set keeps its
    own best file."""
    from ematrain.run.keeper import CheckpointKeeper
    from ematrain.run.weight_sets import weight_sets
    sets = weight_sets([0.9, 0.99])
    keeper = CheckpointKeeper(sets, metric, history_size=2, primary=False)
    # per epoch: (raw, ema 0.9, ema 0.99) scores, as top-1 (higher is better) or loss
    scores = [(90, 50, 40), (80, 70, 45), (85, 60, 60)]
    sign = -1 if metric == "loss" else 1
    improved = []
    for epoch, values in enumerate(scores):
        results = {s.name: {metric: sign * v} for s, v in zip(sets, values)}
        improved.append([s.best_file for s in keeper.record(epoch, results)])
    assert improved == [
        ["model_best_raw.pth.tar", "model_best.pth.tar", "model_best_ema0.99.pth.tar"],
        ["model_best.pth.tar", "model_best_ema0.99.pth.tar"],
        ["model_best_ema0.99.pth.tar"]]
    assert keeper.best["ema 0.9"] == {"metric": sign * 70, "epoch": 1}
    assert [e for _, e in keeper.history] == [1, 2]  # the EMA's two best epochs, best first
