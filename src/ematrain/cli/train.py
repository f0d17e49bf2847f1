"""train.py: train a timm model on an ImageFolder data set, validating raw and EMA weights.

`main` resolves the settings once (`settings.train_specs.resolve_train`), builds the run
(`run.build.build_run`) and hands it to `run.training.Training`, the epoch loop.
"""
from __future__ import annotations

from ..run.build import build_run
from ..run.training import Training
from ..settings.train_specs import resolve_train
from ..util.distributed import shutdown
from ..util.invocation import command_name
from .entry import exit_process, run_main


def _main(argv: list[str]) -> int:
    try:
        settings, source = resolve_train(argv)
        return Training(build_run(settings, resuming=source is not None), source).fit()
    finally:
        shutdown()


def main(argv=None) -> int:
    return run_main(command_name("train.py"), _main, argv)


def entry() -> None:
    """The command (`python train.py`, `ematrain-train`): main, then a quick exit."""
    exit_process(main())


if __name__ == "__main__":
    entry()
