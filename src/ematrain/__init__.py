"""ematrain: timm-style image classification training with model-weight EMA done right.

The library part: ``from ematrain import ModelEma`` (see `ematrain.ema`). It is imported on first
use, so that ``import ematrain`` (the commands, ``--version``) stays light.
"""
__version__ = "0.1.0"

__all__ = ["ModelEma", "WeightSwapper", "decay_from_half_life", "half_life_from_decay",
           "__version__"]


def __getattr__(name: str):
    if name in __all__:
        from . import ema
        return getattr(ema, name)
    raise AttributeError(f"module 'ematrain' has no attribute {name!r}")
