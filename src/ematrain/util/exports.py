"""A package's public names, imported from their modules on first use.

A package ``__init__`` lists what it offers and where each name is defined; nothing is imported
until a name is asked for, so importing one module of a package never pulls in its siblings (and
``import ematrain`` stays light). Code inside ematrain imports names from the modules that define
them, never through these tables.
"""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for `package`, whose `names` map each public name to the
    module (relative to the package, e.g. ``.model_ema``) that defines it."""
    def __getattr__(name: str):
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module, package), name)

    def __dir__() -> list[str]:
        return sorted(names)
    return __getattr__, __dir__
