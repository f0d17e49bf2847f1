"""`python -m ematrain train ...`, `python -m ematrain validate ...` and
`python -m ematrain export ...`."""
import sys

USAGE = "usage: python -m ematrain {train,validate,export} [ARGS ...]"
HELP = f"""{USAGE}

Train a timm model with model-weight EMA, evaluate a checkpoint's raw or EMA weights, or hand
out one set of a run's weights as timm publishes weights.

commands:
  train       python train.py: train on DIR/train, validate raw and EMA weights on DIR/val
  validate    python validate.py: evaluate a checkpoint (its raw or EMA weights), or
              reconstruct EMAs of any length from a run's post-hoc snapshots
  export      one set of weights (raw, an EMA, the post-hoc best, an average of the best
              checkpoints) alone, as safetensors with timm's config.json beside it

options:
  -h, --help     show this help message and exit
  -V, --version  show the version and exit

`python -m ematrain train --help` shows every flag of a command."""
COMMANDS = ("train", "validate", "export")


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in ("--version", "-V"):
        from . import __version__
        print(f"ematrain {__version__}")
        return
    if command in ("--help", "-h"):
        print(HELP)
        return
    if command not in COMMANDS:
        print(f"{USAGE}\npython -m ematrain: error: expected train, validate or export, got "
              f"{command or 'nothing'!r} (--help: the commands)", file=sys.stderr)
        raise SystemExit(2)
    # Usage lines, errors and the resume hint name the command as typed.
    sys.argv = [f"python -m ematrain {command}"] + sys.argv[2:]
    from .cli import entry
    getattr(entry, f"{command}_command")()


if __name__ == "__main__":
    main()
