"""The commands: train.py, validate.py (and --posthoc), export, make demo, and their start.

`entry` is what the console scripts (``ematrain-train = ematrain.cli:train_command``) and
``python -m ematrain`` call; it imports `train` or `validate` only then, so that ``--help`` and a
bad flag are quick. Everything here is light to import.
"""
from ..util.invocation import command_name, launcher
from .entry import (
                    collector_paused,
                    exit_process,
                    export_command,
                    run_main,
                    train_command,
                    validate_command,
)

__all__ = ["collector_paused", "command_name", "exit_process", "export_command", "launcher",
           "run_main",
           "train_command", "validate_command"]
