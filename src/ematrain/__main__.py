"""`python -m ematrain train ...` and `python -m ematrain validate ...`."""
import sys

USAGE = "usage: python -m ematrain {train,validate} [ARGS ...]"
HELP = f"""{USAGE}

Train a timm model with model-weight EMA, or evaluate a checkpoint's raw or EMA weights.

commands:
  train       python train.py: train on DIR/train, validate raw and EMA weights on DIR/val
  validate    python validate.py: evaluate a checkpoint (its raw or EMA weights), or
              reconstruct EMAs of any length from a run's post-hoc snapshots

options:
  -h, --help     show this help message and exit
  -V, --version  show the version and exit

`python -m ematrain train --help` shows every flag of a command."""


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in ("--version", "-V"):
        from . import __version__
        print(f"ematrain {__version__}")
        return
    if command in ("--help", "-h"):
        print(HELP)
        return
    if command not in ("train", "validate"):
        print(f"{USAGE}\npython -m ematrain: error: expected train or validate, got "
              f"{command or 'nothing'!r} (--help: the commands)", file=sys.stderr)
        raise SystemExit(2)
    # Usage lines, errors and the resume hint name the command as typed.
    sys.argv = [f"python -m ematrain {command}"] + sys.argv[2:]
    from .cli.entry import train_command, validate_command
    if command == "train":
        train_command()
    else:
        validate_command()


if __name__ == "__main__":
    main()
