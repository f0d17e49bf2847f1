"""Which trackers a run logs to (timm's --log-wandb and its --wandb-* settings, and
--log-tensorboard), and the check that their packages are installed before training starts."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..util.errors import UserError

INSTALL = "pip install 'ematrain[log]'"


@dataclass(frozen=True)
class TrackerSpec:
    """The trackers of a run.

    Attributes:
        wandb: --log-wandb.
        wandb_project, wandb_tags: timm's --wandb-project and --wandb-tags.
        wandb_resume_id: timm's --wandb-resume-id: continue this W&B run (it must exist).
        tensorboard: --log-tensorboard's folder; "" for the default, ``<run>/tensorboard``;
            None when off.
    """
    wandb: bool = False
    wandb_project: str | None = None
    wandb_tags: tuple[str, ...] = ()
    wandb_resume_id: str = ""
    tensorboard: str | None = None

    @property
    def any(self) -> bool:
        return self.wandb or self.tensorboard is not None


def installed(module: str) -> bool:
    """`module` can be imported (without importing it: W&B takes a second)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_installed(spec: TrackerSpec) -> None:
    """One line naming the install command when a tracker asked for is not installed.

    Only a package that is absent counts: one that is installed but breaks on import is a
    tracker failure (a warning, and training goes on)."""
    missing = [(flag, package) for flag, package, wanted in (
        ("--log-wandb", "wandb", spec.wandb),
        ("--log-tensorboard", "tensorboard", spec.tensorboard is not None)) if wanted
        and not installed(package)]
    if missing:
        flags = " and ".join(f for f, _ in missing)
        packages = " and ".join(p for _, p in missing)
        raise UserError(f"{flags} need{'s' if len(missing) == 1 else ''} the {packages} "
                        f"package{'s' if len(missing) > 1 else ''}: {INSTALL}")
