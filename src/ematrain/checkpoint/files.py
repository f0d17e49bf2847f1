"""Checkpoint files on disk: written atomically, read by the one safe loader.

Every reader of a file ematrain or timm wrote (a checkpoint, a weights file, a post-hoc
snapshot) goes through `safe_load`: ``torch.load(weights_only=True)`` with only
``argparse.Namespace`` allow-listed (timm's train.py stores its args that way), so no pickled
code ever runs. `load_file` adds the checks of a whole file: what a refused or broken file is,
in one line, and that each known key holds what it must (`check_structure`).
"""
from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from ..util.atomic import atomic_write
from ..util.errors import UserError


def write_file(path: str | Path, ckpt: dict) -> None:
    """Write a checkpoint atomically: a crash leaves the previous file whole."""
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp), by_path=True)


# ----------------------------------------------------------------------------- loading
def safe_load(path: str | Path, mmap: bool = False):
    """``torch.load`` as every reader here calls it: to the CPU, weights only, timm's
    ``argparse.Namespace`` the one class allowed; `mmap`: tensors mapped, not read."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_file(path: str | Path) -> dict:
    """Load a checkpoint, a state dict or a .safetensors file as a dict of tensors and values.

    Anything that would need code to unpickle is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"cannot read {path}: not a valid .safetensors file ({exc})") from None
    try:
        data = safe_load(path)
    except pickle.UnpicklingError as exc:
        # Pickled code is a GLOBAL the allow-list lacks; anything else the unpickler refuses
        # (an opcode of random bytes, a truncated stream) is a file that is no checkpoint.
        unsafe = _unsafe_globals(path)
        if unsafe or "unsupported global" in str(exc).lower():
            what = f" ({', '.join(unsafe[:3])})" if unsafe else ""
            raise UserError(f"refusing {path}: loading it would run pickled code{what}; only "
                            f"plain weights are accepted") from None
        raise UserError(f"cannot read {path}: truncated, corrupt or not a PyTorch checkpoint "
                        f"({_unpickler_reason(exc)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as exc:
        raise UserError(f"cannot read {path}: truncated, corrupt or not a checkpoint "
                        f"({short_reason(exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"cannot read {path}: expected a dict of weights, got {type(data).__name__}")
    check_structure(data, path)
    return data


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ema_meta_fits(meta, ckpt) -> bool:
    if not isinstance(meta, dict):
        return False
    decays, keys = meta.get("decays", []), meta.get("keys", [])
    names = meta.get("names", [])
    return (isinstance(decays, list) and all(isinstance(d, (int, float)) for d in decays)
            and isinstance(keys, list) and all(isinstance(k, str) and k in ckpt for k in keys)
            and isinstance(names, list) and all(isinstance(n, str) for n in names))


# What each key a checkpoint may hold must be, checked on load so that a malformed file is one
# line naming the key, wherever it is read.
_SHAPES = {
    "epoch": (lambda v, c: _whole(v), "a whole number"),
    "state_dict": (lambda v, c: _is_state_dict(v), "a dict of tensors"),
    "state_dict_ema": (lambda v, c: _is_state_dict(v), "a dict of tensors"),
    "ema": (_ema_meta_fits, "a mapping of decays and keys that name entries of the file"),
    "num_classes": (lambda v, c: _whole(v) and v > 0, "a positive whole number"),
    "class_names": (lambda v, c: isinstance(v, list) and all(isinstance(x, str) for x in v),
                    "a list of folder names"),
    "data_config": (lambda v, c: isinstance(v, dict), "a mapping"),
    "optimizer": (lambda v, c: isinstance(v, dict), "a mapping"),
    "scheduler": (lambda v, c: isinstance(v, dict), "a mapping"),
    "counters": (lambda v, c: isinstance(v, dict), "a mapping"),
    "posthoc_ema": (lambda v, c: isinstance(v, dict) and isinstance(v.get("ema"), dict),
                    "a mapping with the power EMAs' state under 'ema'"),
    "posthoc": (lambda v, c: isinstance(v, dict), "a mapping"),
    "keeper": (lambda v, c: isinstance(v, dict), "a mapping"),
    "summary": (lambda v, c: isinstance(v, dict), "a mapping"),
    "run_id": (lambda v, c: v is None or isinstance(v, str), "a string"),
    "rank_buffers": (lambda v, c: isinstance(v, list) and all(isinstance(r, list) for r in v),
                     "a list (by rank) of lists of buffers"),
}


def check_structure(ckpt: dict, path) -> None:
    """Refuse a checkpoint whose known keys hold something else than they must."""
    if _is_state_dict(ckpt):
        return  # a plain state dict
    for key, value in ckpt.items():
        name = "state_dict_ema" if key.startswith("state_dict_ema_") else key
        fits, what = _SHAPES.get(name, (None, None))
        if fits is not None and not fits(value, ckpt):
            shown = repr(value) if not isinstance(value, dict) else "a mapping that does not fit"
            raise UserError(f"cannot read {path}: its '{key}' must be {what}, got {shown[:60]}")


def _unsafe_globals(path: Path) -> list[str]:
    """Names of the code a pickle would call, read without running it."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - only a hint for the message
        return []


def _unpickler_reason(exc: BaseException) -> str:
    """The unpickler's own words in torch's long weights_only message ("Unsupported operand
    199"), else its first sentence."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for before, line in zip(lines, lines[1:]):
        if before.endswith("WeightsUnpickler error:"):
            return line[:120]
    return short_reason(exc)


def short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0][:120]


def is_state_dict(data) -> bool:
    """A non-empty dict of tensors."""
    return _is_state_dict(data)


def _is_state_dict(data) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, torch.Tensor) for v in data.values())
