"""Entry-point plumbing: logging set up, and errors as one line on stderr with their exit code."""
from __future__ import annotations

import sys
from typing import Callable

from .errors import UserError, one_line
from .logs import setup_logging


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
