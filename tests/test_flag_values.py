"""No traceback for any value of any flag.

Every option of train.py and validate.py, read from their parsers (a flag added tomorrow is
covered the day it is added), gets each value a user can mistype: 0, -1, 1e-200, 1e308, inf,
nan, an empty string, a word where a number goes, a number beyond any int64, and two huge lists
(10,000 distinct numbers). A flag that takes no value is given bare, and with a value. Each
outcome must be a normal start or exactly one ``train.py: error:`` / ``validate.py: error:``
line, last on stderr, with exit code 2; a traceback, another exit code or a second error line
fails the test, which lists every case that did.

The stages, in-process (``conftest.run_in_process``), as cheap as each question allows:

* train.py: the settings (`settings.resolve_train`) and the run's parts (`build.build_run`:
  data, model and its one-image probe, optimizer, scheduler, EMA), without training; a value
  they accept (about 170 of some 1400) then trains one epoch of one step, validates it and
  forms its checkpoint (not written), which is what only a run can tell (the step's arithmetic,
  the loader's transforms, the scheduler at the epoch's end). Such a run may also stop with one
  error line of exit code 1 that says why (a non-finite loss): it started normally.
* validate.py: the whole evaluation (6 images), or the whole post-hoc sweep.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import pytest
from conftest import make_imagefolder, run_in_process, tiny_args, torch_threads

from ematrain.cli import run_main, validate
from ematrain.cli import train as train_mod
from ematrain.run import training
from ematrain.settings.flags import train_parser, validate_parser

MISTYPED = ("0", "-1", "1e-200", "1e308", "inf", "nan", "", "word", "99999999999999999999")
HUGE = 10_000
HUGE_LISTS = {"10000 numbers": [f"{0.05 + i * 1e-5:.5f}" for i in range(HUGE)],
              "10000 counts": [str(i) for i in range(1, HUGE + 1)]}

# What a flag needs beside it to have an effect at all (its value is otherwise never read).
TRAIN_COMPANIONS = {
    "model_ema_snapshot_every": ["--model-ema-posthoc"],
    "model_ema_snapshot_dtype": ["--model-ema-posthoc"],
    "model_ema_bn_batches": ["--model-ema-bn", "recalibrate"],
    "model_ema_warmup_power": ["--model-ema-warmup"],
    **{dest: ["--mixup", "0.2"] for dest in ("mixup_prob", "mixup_switch_prob", "mixup_mode",
                                           "mixup_off_epoch")},
    "bce_target_thresh": ["--bce-loss"],
    **{dest: ["--sched", "step"] for dest in ("decay_epochs", "decay_rate")},
    "decay_milestones": ["--sched", "multistep"],
    "patience_epochs": ["--sched", "plateau"],
    **{dest: ["--lr-noise", "0.5"] for dest in ("lr_noise_pct", "lr_noise_std")},
    "clip_mode": ["--clip-grad", "1"],
    **{dest: ["--reprob", "0.5"] for dest in ("remode", "recount")},
    **{dest: ["--opt", "adamw"] for dest in ("opt_eps", "opt_betas")},
    "warmup_lr": ["--warmup-epochs", "1"],
}
def option(action: argparse.Action) -> str | None:
    """The spelling a user types (the longest), None for the positional DIR."""
    return max(action.option_strings, key=len) if action.option_strings else None


def values_of(action: argparse.Action) -> dict[str, list[str]]:
    """{label: the words after the flag} for every value tried on `action`."""
    opt = option(action)
    if action.nargs == 0:
        return {"bare": [opt], "given a value": [f"{opt}=word"]}
    count = action.nargs if isinstance(action.nargs, int) else 1
    tried = {repr(v): ([opt] if opt else []) + [v] * count for v in MISTYPED}
    tried.update({label: ([opt] if opt else []) + words for label, words in HUGE_LISTS.items()})
    return tried


def cases(parser: argparse.ArgumentParser, base: list[str], bases: dict, companions: dict):
    """(dest, label, argv) for every option of `parser` and every value tried on it. `base` is
    DIR and what every command needs; `bases` replaces it for some flags; the positional DIR
    takes the place of the base's first word."""
    for action in parser._actions:
        for label, words in values_of(action).items():
            head = bases.get(action.dest, base)
            if option(action) is None:
                argv = words + head[1:]
            else:
                argv = head + companions.get(action.dest, []) + words
            yield action.dest, label, argv


def outcome_problem(r, prog: str, run_failure_allowed: bool = False) -> str | None:
    """None for a normal start (exit 0) or one error line last on stderr with exit code 2
    (or, `run_failure_allowed`, 1 when the run says it stopped on a non-finite loss)."""
    if "Traceback" in r.stderr:
        return "a traceback"
    if r.returncode == 0:
        return None
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    if len(errors) != 1 or lines[-1] != errors[0]:
        return f"{len(errors)} error lines (exit {r.returncode})"
    if len(errors[0]) > 1000:  # one line, and one a terminal shows
        return f"an error line of {len(errors[0])} characters"
    if r.returncode == 2 or (run_failure_allowed and r.returncode == 1
                             and "non-finite" in errors[0]):
        return None
    return f"exit code {r.returncode}"


def report(failures: list) -> str:
    return f"{len(failures)} case(s):\n" + "\n".join(
        f"  {dest} {label}: {problem}\n    {' '.join(argv)[:200]}\n    "
        + "\n    ".join(line[:300] for line in r.stderr.strip().splitlines()[-3:])
        for dest, label, argv, problem, r
        in failures)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-class tree of one 32 px image per class and split, and a run on it that has EMA
    weights and a post-hoc series (for validate.py); torch on one thread, no network."""
    import huggingface_hub.constants

    base = tmp_path_factory.mktemp("flag_values")
    data = make_imagefolder(base / "data", num_classes=2, train_per_class=1, val_per_class=1)
    with pytest.MonkeyPatch.context() as mp, torch_threads(1):
        # --pretrained asks the hub, which this machine cannot reach: fail at once, as offline.
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.chdir(base)  # a relative --output of a case lands here, never in the checkout
        run = base / "runs" / "r"
        r = run_in_process(train_mod.main, "train.py", data, *TRAIN_BASE[1:], "--epochs", "2",
                           "--model-ema", "--model-ema-posthoc", "--output", run.parent,
                           "--experiment", run.name)
        assert r.returncode == 0, r.stderr[-2000:]
        yield {"data": data, "run": run, "base": base}


TRAIN_BASE = ["DATA", *tiny_args(batch=2, lr=None)]


def train_check(argv: list[str], out: Path | None):
    """train.py up to the start of training: settings and the run's parts; with `out`, one epoch
    of one step too (its validation, scheduler step and summary row)."""
    from ematrain.run.build import build_run
    from ematrain.settings.train_specs import resolve_train

    def body(args):
        settings, source = resolve_train(args)
        run = build_run(settings, resuming=source is not None)
        if out is None:
            return 0
        tr = training.Training(run, source)
        tr.run_dir = run.keeper.run_dir = out
        out.mkdir(parents=True)
        # The checkpoint is formed (ckpt_io.save) but not written: its writing, half of the
        # step's time, reads no flag value.
        run.keeper.save_epoch = lambda *args, **kwargs: None
        try:
            return tr.run_epoch(0, lambda: False) or 0
        finally:
            with contextlib.suppress(Exception):  # an error already on its way wins
                run.keeper.wait()
            run.data.close()
    return run_in_process(lambda a: run_main("train.py", body, a), "train.py", *argv)


def test_every_train_flag_value_is_a_start_or_one_error_line(world):
    data, scratch = world["data"], world["base"] / "one_step"
    base = [str(data)] + TRAIN_BASE[1:]
    failures, tried, ran = [], set(), 0
    with pytest.MonkeyPatch.context() as mp, torch_threads(1):
        import huggingface_hub.constants
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.chdir(world["base"])
        for dest, label, argv in cases(train_parser(), base, {}, TRAIN_COMPANIONS):
            tried.add(dest)
            r = train_check(argv, None)
            problem = outcome_problem(r, "train.py")
            if problem is None and r.returncode == 0:
                ran += 1
                r = train_check(argv, scratch / str(ran))
                problem = outcome_problem(r, "train.py", run_failure_allowed=True)
            if problem:
                failures.append((dest, label, argv, problem, r))
    assert not failures, report(failures)
    assert tried == {a.dest for a in train_parser()._actions} and ran > 100, ran


def test_every_validate_flag_value_is_a_start_or_one_error_line(world):
    data, run = str(world["data"]), world["run"]
    base = [data, "--checkpoint", str(run / "last.pth.tar")]
    posthoc = [data, "--posthoc", str(run)]
    bases = {"posthoc": [data], "checkpoint": [data], "pretrained_path": [data],
             "pretrained": [data, "--model", "test_resnet"], "sigma_rel": posthoc,
             "half_life": posthoc}
    failures, tried = [], set()
    with pytest.MonkeyPatch.context() as mp, torch_threads(1):
        import huggingface_hub.constants
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.chdir(world["base"])
        for dest, label, argv in cases(validate_parser(), base, bases, {}):
            tried.add(dest)
            r = run_in_process(validate.main, "validate.py", *argv)
            problem = outcome_problem(r, "validate.py")
            if problem:
                failures.append((dest, label, argv, problem, r))
    assert not failures, report(failures)
    assert tried == {a.dest for a in validate_parser()._actions}
