"""ematrain: timm-style image classification training with model-weight EMA done right.

The library part: ``from ematrain import ModelEma`` (the EMA library is `ematrain.ema`). It is
imported on first use, so that ``import ematrain`` (the commands, ``--version``) stays light
and changes nothing in the process: no torch import, no torch global (`ModelEma` installs the
hooks it needs when the first one is built). Module paths of earlier versions (`ematrain.engine`,
`ematrain.keeper`, ...) still import, with a DeprecationWarning naming the new one (`_moved`).
"""
__version__ = "0.1.0"

__all__ = ["ModelEma", "WeightSwapper", "decay_from_half_life", "half_life_from_decay",
           "__version__"]

from ._moved import install as _install_moved_paths  # noqa: E402  (after __version__)

_install_moved_paths()


def __getattr__(name: str):
    if name in __all__:
        from . import ema
        return getattr(ema, name)
    raise AttributeError(f"module 'ematrain' has no attribute {name!r}")
