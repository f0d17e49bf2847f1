#!/usr/bin/env python3
"""Evaluate a checkpoint (raw or EMA weights): see `python validate.py --help`."""
import sys
from pathlib import Path

# Run from a checkout without installing: put src/ on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from ematrain.cli import validate_command  # noqa: E402  (light: torch comes in with the command)

if __name__ == "__main__":
    validate_command()
