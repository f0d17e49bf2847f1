"""The one error type the command-line tools turn into a single line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a path, a flag, a file. Printed as one line, exit code 2."""

    exit_code = 2
