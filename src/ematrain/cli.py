"""Shared entry-point plumbing: logging, devices, seeding, and errors as one line with exit 2."""
from __future__ import annotations

import logging
import random
import sys
from typing import Callable

import numpy as np
import torch

from .errors import UserError, one_line

log = logging.getLogger("ematrain")


def setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def resolve_device(name: str | None) -> torch.device:
    """The requested device, or CUDA when available, else the CPU."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_main(prog: str, body: Callable[[list[str] | None], int], argv=None) -> int:
    """Run `body`; turn a UserError into one line on stderr and exit code 2."""
    setup_logging()
    try:
        return body(argv)
    except UserError as exc:
        print(f"{prog}: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; files on disk are the last complete ones", file=sys.stderr)
        return 130
