"""Error types the command-line tools turn into a single line on stderr and an exit code."""


class UserError(Exception):
    """Bad input from the user: a path, a flag, a file. Printed as one line, exit code 2."""

    exit_code = 2


class RunFailure(UserError):
    """The run could not go on (disk full, non-finite loss). One line, exit code 1."""

    exit_code = 1


def one_line(message: str) -> str:
    """The message's meaningful line.

    An error raised in a DataLoader worker comes back wrapped with the worker's traceback; the
    user needs only its last line, without the exception's module path.
    """
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return ""
    if len(lines) == 1:
        return lines[0]
    last = lines[-1]
    for prefix in (f"{__name__}.UserError: ", f"{__name__}.RunFailure: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last
