"""Checkpoints: timm-compatible keys, atomic writes, and loading that never runs pickled code."""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .errors import UserError

CHECKPOINT_VERSION = 2


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


# ----------------------------------------------------------------------------- atomic files
def atomic_write(path: str | Path, write: Callable) -> None:
    """Write `path` through a temporary file in the same folder, fsync it, then rename it over.

    A crash or a full disk at any moment leaves either the old file or the new one, never a
    half-written file. `write` receives a binary file object.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the folder entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    def write(f):
        with open(src, "rb") as s:
            while chunk := s.read(1 << 22):
                f.write(chunk)
    atomic_write(dst, write)


# ----------------------------------------------------------------------------- building
def build_checkpoint(*, epoch: int, arch: str, model, optimizer, scheduler, ema, args: dict,
                     metric: float | None, num_updates: int, data_config: dict, num_classes: int,
                     class_names: list[str], extra: dict | None = None) -> dict:
    """A checkpoint with timm's keys plus what validate.py and resume need."""
    from .ema import unwrap_model
    ckpt = {
        "epoch": epoch,
        "arch": arch,
        "state_dict": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "args": args,
        "metric": metric,
        "version": CHECKPOINT_VERSION,
        "ematrain_version": __version__,
        "num_updates": num_updates,
        "data_config": dict(data_config),
        "num_classes": num_classes,
        "class_names": list(class_names),
    }
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if ema is not None:
        ckpt["state_dict_ema"] = ema.shadow_state_dict(0)
        meta = ema.state_dict()
        shadows = meta.pop("shadows")
        for i in range(1, len(shadows)):
            ckpt[f"state_dict_ema_{i}"] = shadows[i]
        meta["keys"] = ["state_dict_ema"] + [f"state_dict_ema_{i}" for i in range(1, len(shadows))]
        # The dtype validation scored the shadows in: their own, or the live model's when a
        # shadow on another device is swapped into it. validate.py reproduces it.
        live = next(unwrap_model(model).parameters())
        scored = live.dtype if ema.device != live.device else ema.dtype
        meta["eval_dtype"] = str(scored).removeprefix("torch.")
        ckpt["ema"] = meta
    if extra:
        ckpt.update(extra)
    return ckpt


# ----------------------------------------------------------------------------- loading
def load_file(path: str | Path) -> dict:
    """Load a checkpoint, a state dict or a .safetensors file as a dict of tensors and values.

    Uses ``torch.load(weights_only=True)``, allow-listing only ``argparse.Namespace`` (timm's
    train.py stores its args that way). Anything else that would need code to unpickle is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"cannot read {path}: not a valid .safetensors file ({exc})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path)
        if unsafe or "weights_only" in str(exc).lower() or "global" in str(exc).lower():
            what = f" ({', '.join(unsafe[:3])})" if unsafe else ""
            raise UserError(f"refusing {path}: loading it would run pickled code{what}; only "
                            f"plain weights are accepted") from None
        raise UserError(f"cannot read {path}: not a PyTorch checkpoint") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as exc:
        raise UserError(f"cannot read {path}: truncated, corrupt or not a checkpoint "
                        f"({_short_reason(exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"cannot read {path}: expected a dict of weights, got {type(data).__name__}")
    return data


def _unsafe_globals(path: Path) -> list[str]:
    """Names of the code a pickle would call, read without running it."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - only a hint for the message
        return []


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0][:120]


def _is_state_dict(data: dict) -> bool:
    return bool(data) and all(isinstance(v, torch.Tensor) for v in data.values())


def ema_keys(ckpt: dict) -> list[str]:
    """Keys of the EMA shadows in a checkpoint, first (timm's `state_dict_ema`) first."""
    meta = ckpt.get("ema")
    if isinstance(meta, dict) and meta.get("keys"):
        return [k for k in meta["keys"] if k in ckpt]
    return [k for k in ("state_dict_ema", "model_ema") if k in ckpt][:1]


def ema_decays(ckpt: dict) -> list[float | None]:
    meta = ckpt.get("ema")
    if isinstance(meta, dict) and meta.get("decays"):
        return [float(d) for d in meta["decays"]]
    return [None] * len(ema_keys(ckpt))


def ema_index_for_decay(ckpt: dict, decay: float, path) -> int:
    """The shadow whose decay is `decay`, as given exactly or as printed (6 significant digits)."""
    decays = ema_decays(ckpt)
    for i, d in enumerate(decays):
        if d is not None and (abs(d - decay) <= 1e-12 * max(1.0, d) or f"{d:g}" == f"{decay:g}"):
            return i
    known = ", ".join(f"{d:g}" for d in decays if d is not None) or "unknown"
    raise UserError(f"{path} has no EMA with decay {decay:g} (it has: {known})")


def select_weights(ckpt: dict, path: str | Path, use_ema: bool = False,
                   ema_index: int | None = None, ema_decay: float | None = None) -> dict:
    """The state dict to evaluate: raw, the first EMA, or the EMA picked by index or decay."""
    if not use_ema and ema_index is None and ema_decay is None:
        if "state_dict" in ckpt:
            return _strip_prefixes(ckpt["state_dict"])
        if "model" in ckpt and isinstance(ckpt["model"], dict):
            return _strip_prefixes(ckpt["model"])
        if _is_state_dict(ckpt):
            return _strip_prefixes(ckpt)
        raise UserError(f"{path} holds no model weights (no 'state_dict' key)")
    keys = ema_keys(ckpt)
    if not keys:
        raise UserError(f"{path} holds no EMA weights; run without --use-ema to evaluate the raw weights")
    if ema_decay is not None:
        ema_index = ema_index_for_decay(ckpt, ema_decay, path)
    index = ema_index or 0
    if not 0 <= index < len(keys):
        raise UserError(f"{path} has {len(keys)} EMA shadow(s); --ema-index {index} is out of range")
    return _strip_prefixes(ckpt[keys[index]])


def _strip_prefixes(state: dict) -> dict:
    """Drop DDP's 'module.' and torch.compile's '_orig_mod.' prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_weights_into(model, state: dict, path: str | Path, arch: str | None = None,
                      model_name: str | None = None) -> None:
    """Strict load with a one-line explanation when the weights do not fit the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {k}: checkpoint "
                         f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        if arch and model_name and arch != model_name:
            parts.insert(0, f"it holds a '{arch}', the model is '{model_name}'")
        raise UserError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)


def args_dict(ckpt: dict) -> dict:
    """The training args of a checkpoint as a plain dict (ours, or timm's Namespace)."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}
