#!/usr/bin/env python3
"""Evaluate a checkpoint (raw or EMA weights): see `python validate.py --help`."""
import sys
from pathlib import Path

# Run from a checkout without installing: put src/ on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from ematrain.validate import entry  # noqa: E402

if __name__ == "__main__":
    entry()
