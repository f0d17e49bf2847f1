"""The commands' start: imports with the garbage collector paused, logging set up, errors as
one line on stderr with their exit code, and a quick exit."""
from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import sys
from typing import Callable

from ..util.errors import UserError, one_line
from ..util.invocation import command_name
from ..util.logs import setup_logging


@contextlib.contextmanager
def collector_paused():
    """The start-up imports (torch, timm, torchvision) with Python's cyclic garbage collector off.

    They create some 400,000 long-lived objects and almost no garbage, yet make the collector
    run full sweeps over all of them, each longer than the last: turned off, a command starts
    about 1.5 s sooner on the 2-core development machine (4.6 s -> 3.0 s). Afterwards what they
    made is frozen out of the collector's sweeps (`gc.freeze`), and it runs as usual.
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_on:
            gc.enable()


def _command(module: str) -> None:
    """Import the command's module with the collector paused, then run its entry point.

    Ctrl-C during the imports (seconds of torch and timm) is one line and exit code 130, as at
    any later moment, not importlib's traceback: nothing has been written yet.
    """
    try:
        with collector_paused():
            entry = importlib.import_module(f"{__package__}.{module}").entry  # ematrain.cli.train
        entry()
    except KeyboardInterrupt:
        print(f"{command_name(module + '.py')}: interrupted while starting; nothing was written",
              file=sys.stderr)
        exit_process(130)


def train_command() -> None:
    """`python train.py`, `ematrain-train`, `python -m ematrain train`."""
    _command("train")


def validate_command() -> None:
    """`python validate.py`, `ematrain-validate`, `python -m ematrain validate`."""
    _command("validate")


def export_command() -> None:
    """`python -m ematrain export`."""
    _command("export")


def run_main(prog: str, body: Callable[[list[str]], int], argv=None) -> int:
    """Run `body`; turn a UserError into one line on stderr and its exit code (2, or 1)."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        return body(argv)
    except UserError as exc:
        print(f"{prog}: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; files on disk are the last complete ones", file=sys.stderr)
        return 130


def exit_process(rc: int) -> None:
    """End a command-line process without the interpreter's teardown.

    Everything a run leaves is written and closed by the time its main returns (checkpoints,
    summary, pictures, loader workers, the process group); what is left is Python taking torch
    apart, module by module, for about a second. Output is flushed first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc if isinstance(rc, int) else 1)
