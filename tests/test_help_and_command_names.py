"""--help states every default and lists real choices; --version; the commands name themselves
as the user typed them (python train.py, ematrain-train, python -m ematrain train)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, run_cli

from ematrain import __version__
from ematrain.cli import launcher
from ematrain.settings.flags import train_parser, validate_parser


def _value_options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and action.help is not argparse.SUPPRESS:
            yield action


@pytest.mark.parametrize("make", [train_parser, validate_parser], ids=["train", "validate"])
def test_every_option_that_takes_a_value_shows_its_default(make):
    parser = make("x")
    text = parser.format_help()
    assert "{," not in text and ",}" not in text  # no empty entry in a choice list
    formatter = parser._get_formatter()
    missing = [a.option_strings[-1] for a in _value_options(parser)
               if "default" not in formatter._get_help_string(a)]
    assert missing == []
    if make is train_parser:
        assert "{linear,sqrt}" in text and "{reduce,broadcast}" in text


def test_timms_empty_choices_are_still_accepted():
    args = train_parser("x").parse_args(["d", "--lr-base-scale", "", "--dist-bn", ""])
    assert args.lr_base_scale == "" and args.dist_bn == ""


@pytest.mark.parametrize("script", ["train.py", "validate.py"])
def test_version(script):
    r = run_cli(script, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"{script} (ematrain) {__version__}"


def _console(name: str) -> str | None:
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.isfile(path) else None


def test_console_scripts_name_themselves():
    train, validate = _console("ematrain-train"), _console("ematrain-validate")
    if not (train and validate):
        pytest.skip("package not installed with its console scripts")
    r = subprocess.run([train, "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "ematrain-train: error: unrecognized arguments: --bogus"
    r = subprocess.run([validate, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: ematrain-validate ")


def test_the_resume_hint_runs_the_command_as_typed():
    assert launcher("train.py") == "python train.py"
    assert launcher("ematrain-train") == "ematrain-train"
    assert launcher("python -m ematrain train") == "python -m ematrain train"


def test_python_dash_m_ematrain(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "ematrain", *a], capture_output=True,
                                    text=True, env=env, cwd=tmp_path)
    r = run("train", "--bogus")
    assert r.returncode == 2
    assert r.stderr.strip() == "python -m ematrain train: error: unrecognized arguments: --bogus"
    r = run("validate", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m ematrain validate ")
    r = run("export", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m ematrain export ")
    r = run()
    assert r.returncode == 2 and "expected train, validate or export" in r.stderr
    assert run("--version").stdout.strip() == f"ematrain {__version__}"


@pytest.mark.parametrize("enabled", [True, False])
def test_start_up_imports_run_with_the_collector_paused_then_frozen(enabled):
    """The commands import torch and timm with the garbage collector off, freeze what the
    imports made, and leave the collector as they found it."""
    import gc

    from ematrain.cli import collector_paused

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    frozen = gc.get_freeze_count()
    try:
        with collector_paused():
            during = gc.isenabled()
            made = [[i] for i in range(1000)]
        assert during is False
        assert gc.isenabled() is enabled
        assert gc.get_freeze_count() >= frozen + len(made)
    finally:
        gc.unfreeze()
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("name", ["train", "validate"])
def test_commands_run_with_the_collector_on(monkeypatch, name):
    """What a run allocates is collected as usual: the pause covers the imports only."""
    import gc
    import importlib

    from ematrain import cli

    module = importlib.import_module(f"ematrain.cli.{name}")
    seen = []
    monkeypatch.setattr(module, "entry", lambda: seen.append(gc.isenabled()))
    was = gc.isenabled()
    gc.enable()
    try:
        getattr(cli, f"{name}_command")()
    finally:
        gc.unfreeze()
        (gc.enable if was else gc.disable)()
    assert seen == [True]


def test_a_script_whose_path_holds_a_space_names_itself_by_its_file_name(tmp_path, monkeypatch):
    from ematrain.cli import command_name
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "my checkout" / "train.py"), "--help"])
    assert command_name("train.py") == "train.py"
    monkeypatch.setattr(sys, "argv", ["python -m ematrain validate"])
    assert command_name("validate.py") == "python -m ematrain validate"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_python_dash_m_ematrain_help_names_the_commands(tmp_path, flag):
    """`python -m ematrain --help` prints the usage and the commands, exit code 0; `python -m
    ematrain train --help` is train.py's help."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "ematrain", *a], capture_output=True,
                                    text=True, env=env, cwd=tmp_path)
    r = run(flag)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("usage: python -m ematrain {train,validate,export} [ARGS ...]\n")
    assert all(f"  {c}  " in r.stdout for c in ("train", "validate", "export"))
    r = run("train", flag)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m ematrain train ")
    assert "--model-ema-decay DECAY" in r.stdout and "Model exponential moving average" in r.stdout
