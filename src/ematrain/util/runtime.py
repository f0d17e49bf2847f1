"""Process-wide switches of timm's scripts: --device-modules, --fast-norm, --synchronize-step,
--torchcompile-mode. Each is set for the command's run and, where it is a process global,
put back afterwards (the commands also run in-process, from tests and library users)."""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Iterator, Sequence

import torch
from timm.layers import is_fast_norm, set_fast_norm

from .errors import UserError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def import_device_modules(names: Sequence[str] | None) -> None:
    """--device-modules: import each module (a device backend such as torch_npu registers itself
    on import), before the device is chosen, as timm's train.py does."""
    for name in names or ():
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"--device-modules {name}: cannot import it ({exc})") from None
        except Exception as exc:  # a backend's own start-up failure, said in one line
            raise UserError(f"--device-modules {name}: its import failed: "
                            f"{type(exc).__name__}: {str(exc)[:120]}") from None


@contextlib.contextmanager
def fast_norm(enabled: bool) -> Iterator[None]:
    """--fast-norm: timm's fast normalization layers for the models built inside (timm's norm
    layers read the switch when they are constructed); the previous value after."""
    before = is_fast_norm()
    set_fast_norm(enabled or before)
    try:
        yield
    finally:
        set_fast_norm(before)


def check_compile_mode(mode: str | None, backend: str | None) -> None:
    """--torchcompile: a backend torch knows; --torchcompile-mode: one of torch.compile's modes,
    and only with --torchcompile (train.py and validate.py alike)."""
    if backend:
        import torch._dynamo
        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise UserError(f"--torchcompile: unknown backend {backend!r} "
                            f"(e.g. {', '.join(torch._dynamo.list_backends())}, eager)")
    if mode is None:
        return
    if not backend:
        raise UserError("--torchcompile-mode sets how --torchcompile compiles: give "
                        "--torchcompile too")
    if mode not in COMPILE_MODES:
        raise UserError(f"--torchcompile-mode must be one of {', '.join(COMPILE_MODES)}, "
                        f"got {mode!r}")


def step_synchronizer(device: torch.device, enabled: bool) -> Callable[[], None] | None:
    """--synchronize-step: wait for the device at the end of each optimizer step (timm's: honest
    step times at the cost of the pipeline); nothing to wait for on the CPU."""
    if not enabled or device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None)
    if sync is None:
        return None
    return lambda: sync(device)
