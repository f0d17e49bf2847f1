"""How this process was invoked: the command as the user typed it (for usage lines, errors and
the resume hint), and what runs it again."""
from __future__ import annotations

import os
import sys


def command_name(script: str) -> str:
    """The command as the user typed it, for usage, errors and the resume hint: the console
    script (`ematrain-train`), `python -m ematrain train`, or else `script` (`train.py`)."""
    invoked = sys.argv[0] if sys.argv else ""
    # `python -m ematrain` sets argv[0] so (a script's path may hold spaces too).
    if invoked.startswith("python -m ematrain "):
        return invoked
    name = os.path.basename(invoked)
    return name if name.startswith("ematrain-") else script


def launcher(prog: str) -> str:
    """What runs `prog` again: `python train.py`, or the command itself."""
    return f"python {prog}" if prog.endswith(".py") else prog
