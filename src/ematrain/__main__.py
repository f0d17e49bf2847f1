"""`python -m ematrain train ...`, `python -m ematrain validate ...` and
`python -m ematrain export ...`."""
import sys

USAGE = "usage: python -m ematrain {train,validate,export} [ARGS ...]   (--version: the version)"


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in ("--version", "-V"):
        from . import __version__
        print(f"ematrain {__version__}")
        return
    if command not in ("train", "validate", "export"):
        print(f"{USAGE}\npython -m ematrain: error: expected train, validate or export, got "
              f"{command or 'nothing'!r}", file=sys.stderr)
        raise SystemExit(2)
    # Usage lines, errors and the resume hint name the command as typed.
    sys.argv = [f"python -m ematrain {command}"] + sys.argv[2:]
    if command == "export":
        from .export import entry
        entry()
        return
    from .cli import train_command, validate_command
    if command == "train":
        train_command()
    else:
        validate_command()


if __name__ == "__main__":
    main()
