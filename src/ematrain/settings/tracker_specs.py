"""The run's trackers (--log-wandb and timm's --wandb-* flags, --log-tensorboard), resolved once
from the flags or from a run's recorded settings, with their checks: an uninstalled package asked
for is one line naming the install command, before any work starts."""
from __future__ import annotations

from pathlib import Path

from ..trackers.spec import TrackerSpec, check_installed
from ..util.errors import UserError

# The recorded settings that say which trackers a run has.
TRACKER_SETTINGS = ("log_wandb", "wandb_project", "wandb_tags", "wandb_resume_id",
                    "log_tensorboard")


def tracker_spec(settings: dict, resuming: bool = False, check: bool = True) -> TrackerSpec:
    """The trackers that `settings` (flag values by dest: a Namespace's vars or a checkpoint's
    `args`) ask for. `resuming`: the run continues a checkpoint (--wandb-resume-id needs one,
    as in timm's train.py); `check`: refuse a package that is not installed."""
    folder = settings.get("log_tensorboard")
    tags = settings.get("wandb_tags") or ()
    resume_id = settings.get("wandb_resume_id") or ""
    wandb = bool(settings.get("log_wandb"))
    if wandb and resume_id and not resuming:
        raise UserError("--wandb-resume-id continues a W&B run: give it with --resume, as "
                        "timm's train.py")
    spec = TrackerSpec(
        wandb=wandb, wandb_project=settings.get("wandb_project") or None,
        wandb_tags=tuple(str(t) for t in ([tags] if isinstance(tags, str) else tags)),
        wandb_resume_id=str(resume_id),
        # A folder given is kept absolute: a resume from another directory logs to the same one.
        tensorboard=None if folder is None else (str(Path(folder).resolve()) if folder else ""))
    if check:
        check_installed(spec)
    return spec
