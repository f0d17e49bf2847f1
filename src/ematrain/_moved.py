"""Module paths of earlier ematrain versions, which still import.

ematrain was one flat folder of modules before its code moved into folders by concern. A user's
``from ematrain.engine import train_step``, ``import ematrain.keeper`` or
``python -m ematrain.demo_data`` keeps working: the old name is given the module that now holds
its code (the very module object, when it moved whole), with a DeprecationWarning that names the
new path. A module that was split becomes a module holding the names of all its parts.

This is the one finder ematrain adds to ``sys.meta_path``; it is consulted last, and answers
for these names only (`MOVED`). The old paths that are packages now (`ematrain.ema`,
`ematrain.checkpoint`, `ematrain.data`, `ematrain.posthoc`, `ematrain.settings`, `ematrain.cli`)
need no finder: their ``__init__`` offers the old names.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# Each old module: where its code is now (the first holds the bulk of it).
MOVED: dict[str, tuple[str, ...]] = {
    "atomic": ("util.atomic",),
    "clock": ("util.clock",),
    "distributed": ("util.distributed",),
    "errors": ("util.errors",),
    "logs": ("util.logs",),
    "seeding": ("util.seeding",),
    "signals": ("util.signals",),
    "ema_tensors": ("ema._fused",),
    "ema_devices": ("ema.devices",),
    "ema_schedules": ("ema.schedules", "ema.half_life", "ema.horizons"),
    "ema_horizons": ("ema.horizons",),
    "ema_policies": ("ema.policies",),
    "demo_data": ("data.digits",),
    "timm_resume": ("run.restore", "checkpoint.timm_checkpoints"),
    "snapshots": ("posthoc.snapshots", "posthoc.series", "posthoc.schedule"),
    "posthoc_tracker": ("posthoc.schedule",),
    "posthoc_sweep": ("posthoc.sweep", "cli.validate", "run.evaluation"),
    "flags": ("settings.flags",),
    "config": ("settings.layers",),
    "timm_settings": ("settings.timm_unsupported",),
    "resume": ("settings.resume_policy", "run.restore"),
    "build": ("run.build", "run.parts", "run.weight_sets", "run.optimizer", "run.report"),
    "engine": ("run.loop", "run.step", "run.evaluation", "util.logs"),
    "train": ("cli.train", "run.training", "run.report", "run.folder"),
    "validate": ("cli.validate", "run.evaluation"),
    "keeper": ("run.keeper",),
    "outputs": ("run.folder", "run.summary", "run.curves", "run.report"),
    "weightsets": ("run.weight_sets",),
    "models": ("run.model", "util.modules"),
    "start_weights": ("run.start_weights",),
    "demo": ("cli.demo",),
}
_PACKAGE = __name__.rpartition(".")[0]


class _MovedPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``ematrain.<old>`` and loads it as its new module(s)."""

    @staticmethod
    def _targets(fullname: str) -> tuple[str, ...] | None:
        package, _, old = fullname.rpartition(".")
        if package != _PACKAGE or old not in MOVED:
            return None
        return tuple(f"{_PACKAGE}.{new}" for new in MOVED[old])

    def find_spec(self, fullname, path=None, target=None):
        if self._targets(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # the default module; `exec_module` fills or replaces it

    def exec_module(self, module) -> None:
        targets = self._targets(module.__name__)
        warnings.warn(f"{module.__name__} moved to {' and '.join(targets)}; import from there",
                      DeprecationWarning, stacklevel=2)
        modules = [importlib.import_module(name) for name in targets]
        if len(modules) == 1:  # moved whole: the old name is the module itself
            sys.modules[module.__name__] = modules[0]
            return
        for new in reversed(modules):  # split: the first part's names win
            module.__dict__.update({k: v for k, v in vars(new).items()
                                    if not k.startswith("__")})

    def get_code(self, fullname):
        """`python -m ematrain.<old>`: run the new module as the main program."""
        target = self._targets(fullname)[0]
        return compile(f"import runpy\nrunpy.run_module({target!r}, run_name='__main__', "
                       f"alter_sys=True)\n", f"<{fullname}, moved to {target}>", "exec")


def install() -> None:
    """Add the finder to the end of ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedPaths) for f in sys.meta_path):
        sys.meta_path.append(_MovedPaths())
