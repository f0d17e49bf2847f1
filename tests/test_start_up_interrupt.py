"""Ctrl-C while a command is still importing torch and timm (seconds, at every start) is one
line and exit code 130, as at any later moment, never importlib's KeyboardInterrupt traceback.

The interrupt is a real SIGINT, sent by the process to itself at the moment it starts importing
torch (an audit hook sees the import begin), so the test does not depend on timing.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT

SCRIPT = """
import os, signal, sys
sys.path.insert(0, {src!r})
def interrupt_at_torch(event, args):
    if event == "import" and args[0] == "torch":
        os.kill(os.getpid(), signal.SIGINT)
sys.addaudithook(interrupt_at_torch)
sys.argv = [{script!r}, "no-such-data"]
from ematrain.cli import {command}
{command}()
"""


@pytest.mark.parametrize("command,script", [("train_command", "train.py"),
                                            ("validate_command", "validate.py")])
def test_ctrl_c_during_the_start_up_imports_is_one_line(tmp_path, command, script):
    code = SCRIPT.format(src=str(REPO_ROOT / "src"), script=script, command=command)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 130, r.stderr[-2000:]
    assert r.stderr == f"{script}: interrupted while starting; nothing was written\n"
    assert list(tmp_path.iterdir()) == []
