"""The checkpoint format: its keys, who owns each, and saving, restoring and loading checkpoints.

A checkpoint has timm's keys, so timm's tools read it, plus ours. Each stateful part of a run
(`Run.parts()`: model, optimizer, scheduler, amp_scaler, ema, posthoc_ema, counters, keeper,
summary) gives its
``state_dict()`` and takes it back with ``load_state_dict()``; the run's settings and data add
what describes the run (owners `settings` and `data`), and the schema its version. This module
alone knows under which keys they live. The key table `SCHEMA` is the reference: the README's
table is checked against it by a test, and `save` writes exactly its keys.

Loading never runs pickled code: ``torch.load(weights_only=True)``, with only
``argparse.Namespace`` allow-listed (timm's train.py stores its args that way).
"""
from __future__ import annotations

import argparse
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from . import __version__
from .atomic import atomic_write
from .errors import UserError

CHECKPOINT_VERSION = 3


@dataclass(frozen=True)
class Key:
    name: str
    owner: str   # the part whose state it is
    origin: str  # "timm": a key timm's train.py writes too; "ematrain": ours
    what: str


SCHEMA: tuple[Key, ...] = (
    Key("epoch", "counters", "timm", "the last complete epoch (-1 before the first one ends)"),
    Key("arch", "settings", "timm", "timm model name"),
    Key("state_dict", "model", "timm", "the raw weights (of the plain module, no wrapper prefixes)"),
    Key("state_dict_ema", "ema", "timm", "the first EMA shadow's weights"),
    Key("state_dict_ema_<i>", "ema", "ematrain", "the weights of further shadows, i = 1, 2, ..."),
    Key("optimizer", "optimizer", "timm", "the optimizer's state_dict()"),
    Key("amp_scaler", "amp_scaler", "timm", "the float16 AMP grad scaler's state (only with one)"),
    Key("args", "settings", "timm", "every setting of the run as a plain dict: what "
        "`--resume PATH` continues with"),
    Key("metric", "keeper", "timm", "the raw weights' --eval-metric this epoch (None mid-epoch)"),
    Key("version", "schema", "timm", "this format's version"),
    Key("ematrain_version", "schema", "ematrain", "the ematrain release that wrote it"),
    Key("scheduler", "scheduler", "ematrain", "the LR scheduler's state_dict() (when one runs)"),
    Key("ema", "ema", "ematrain", "decays (sigma_rels under the power schedule), `schedule` (its "
        "name and settings), `keys` (where each shadow is), update counters, "
        "settings, and `eval_dtype` (the dtype validation scored the shadows in)"),
    Key("posthoc_ema", "posthoc_ema", "ematrain", "with --model-ema-posthoc: the power-function "
        "EMAs' state (`ema`: sigma_rels, schedule, counters, shadows) and the snapshot interval "
        "and dtype"),
    Key("posthoc", "posthoc", "ematrain", "in model_posthoc_best.pth.tar only (validate.py "
        "--posthoc): the reconstructed EMA's length, fit error and the series it came from"),
    Key("counters", "counters", "ematrain", "epoch and step to resume at, optimizer updates, the "
        "epoch's running loss, skipped steps, world size"),
    Key("keeper", "keeper", "ematrain", "best epoch and metric of each weight set, and the "
        "checkpoint-<epoch> history"),
    Key("summary", "summary", "ematrain", "the summary.csv rows so far"),
    Key("data_config", "data", "ematrain", "the evaluation transform (validate.py rebuilds it)"),
    Key("num_classes", "data", "ematrain", "classifier outputs"),
    Key("class_names", "data", "ematrain", "class folder names, in label order"),
)


def schema_markdown() -> str:
    """The key table as the README shows it."""
    lines = ["| key | owner | from | what |", "|---|---|---|---|"]
    lines += [f"| `{k.name}` | {k.owner} | {k.origin} | {k.what} |" for k in SCHEMA]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- saving
def save(run, metric: float | None = None) -> dict:
    """The checkpoint of `run` now: every part's state under its schema key."""
    parts = run.parts()
    ckpt = {
        "epoch": run.counters.epoch - 1,
        "arch": run.settings.model.model,
        "state_dict": parts.pop("model").state_dict(),
        "args": run.record(),
        "metric": metric,
        "version": CHECKPOINT_VERSION,
        "ematrain_version": __version__,
        "data_config": dict(run.data.data_config),
        "num_classes": run.num_classes,
        "class_names": list(run.data.class_names),
    }
    ema = parts.pop("ema", None)
    if ema is not None:
        ckpt.update(ema_entries(ema.state_dict(), ema.scored_dtype(run.model)))
    for name, part in parts.items():
        ckpt[name] = part.state_dict()
    return ckpt


def ema_entries(state: dict, scored: torch.dtype) -> dict:
    """The EMA's state in timm's layout: the first shadow where timm puts it, the others beside
    it, and everything else under `ema`."""
    meta = dict(state)
    shadows = meta.pop("shadows")
    keys = ["state_dict_ema"] + [f"state_dict_ema_{i}" for i in range(1, len(shadows))]
    meta["keys"] = keys
    meta["eval_dtype"] = str(scored).removeprefix("torch.")
    return {"ema": meta, **dict(zip(keys, shadows))}


def write_file(path: str | Path, ckpt: dict) -> None:
    """Write a checkpoint atomically: a crash leaves the previous file whole."""
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp), by_path=True)


# ----------------------------------------------------------------------------- restoring
# Parts a checkpoint may lack (timm's have no scheduler, keeper or summary; a run that turns on
# float16 AMP has no scaler state yet): they start fresh.
OPTIONAL_PARTS = frozenset({"scheduler", "amp_scaler", "keeper", "summary"})


def restore(run, ckpt: dict, path, skip: frozenset = frozenset()) -> list[str]:
    """Load every part of `run` from `ckpt` except those named in `skip`; returns the optional
    parts the checkpoint lacks (they start fresh).

    A required key missing, or a key holding something its part cannot take, is one line
    naming the key.
    """
    ckpt = upgrade(ckpt)
    fresh = []
    for name, part in run.parts().items():
        key = "state_dict" if name == "model" else name
        if name in skip:
            continue
        if key not in ckpt and name in OPTIONAL_PARTS:
            fresh.append(name)
            continue
        if key not in ckpt:
            raise UserError(f"cannot resume from {path}: it has no '{key}' (it was saved "
                            f"without the {name} this run has)")
        if name == "model":
            load_weights_into(part, select_weights(ckpt, path).state, path,
                              arch=ckpt.get("arch"), model_name=run.settings.model.model)
            continue
        try:
            part.load_state_dict(ema_state(ckpt) if name == "ema" else ckpt[key])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            raise UserError(f"cannot resume from {path}: its '{key}' does not fit this run's "
                            f"{name} ({_short_reason(exc)})") from None
    return fresh


def ema_state(ckpt: dict) -> dict:
    """The EMA's state_dict() put back together from the schema's keys."""
    meta = dict(ckpt["ema"])
    meta["shadows"] = [ckpt[key] for key in meta.pop("keys")]
    meta.pop("eval_dtype", None)
    return meta


def upgrade(ckpt: dict) -> dict:
    """An older checkpoint in the current layout: version 2 kept counters, keeper and summary in
    one `resume_state` dict; timm's have none of them (the run goes on after `epoch`)."""
    if "counters" in ckpt or not isinstance(ckpt.get("epoch"), int):
        return ckpt
    ckpt = dict(ckpt)
    old = ckpt.pop("resume_state", None)
    old = old if isinstance(old, dict) else {}
    mid = bool(old.get("epoch_step"))
    ckpt["counters"] = {
        "epoch": int(old["epoch"]) if mid else ckpt["epoch"] + 1,
        "epoch_step": int(old.get("epoch_step", 0)), "loss_sum": float(old.get("loss_sum", 0.0)),
        "loss_count": int(old.get("loss_count", 0)), "num_updates": int(ckpt.get("num_updates", 0)),
        "skipped_nonfinite": int(old.get("skipped_nonfinite", 0))}
    if old:
        decays = (ckpt.get("ema") or {}).get("decays", [])
        names = ["raw"] + [f"ema {float(d):g}" for d in decays]
        ckpt["keeper"] = {"best": {n: dict(b) for n, b in zip(names, old.get("best", []))},
                          "history": [list(e) for e in old.get("history", [])]}
        ckpt["summary"] = {"rows": [dict(r) for r in old.get("rows", [])]}
        if "amp_scaler" in old:
            ckpt["amp_scaler"] = old["amp_scaler"]
    return ckpt


def is_ours(ckpt: dict) -> bool:
    """Written by ematrain (so `args` records every setting of the run)."""
    return "ematrain_version" in ckpt and isinstance(ckpt.get("args"), dict)


# ----------------------------------------------------------------------------- loading
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
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
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
                        f"({_short_reason(exc)})") from None
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
    return (isinstance(decays, list) and all(isinstance(d, (int, float)) for d in decays)
            and isinstance(keys, list) and all(isinstance(k, str) and k in ckpt for k in keys))


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


def peek(path: str | Path) -> dict | None:
    """A checkpoint's `epoch` and `counters` without reading its tensors (memory-mapped), or
    None when it cannot be read."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not the one wanted
        return None
    if not isinstance(data, dict):
        return None
    data = upgrade(data)
    return {"epoch": data.get("epoch"), "counters": data.get("counters")}


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
    return _short_reason(exc)


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0][:120]


def is_state_dict(data) -> bool:
    """A non-empty dict of tensors."""
    return _is_state_dict(data)


def _is_state_dict(data) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, torch.Tensor) for v in data.values())


# ----------------------------------------------------------------------------- weights
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


@dataclass(frozen=True)
class Weights:
    """One weight set of a checkpoint, as validate.py and --initial-checkpoint take it."""
    state: dict
    name: str                 # "raw", "ema", "ema 0.99"
    eval_dtype: str | None    # for EMA weights: the dtype training scored them in


def select_weights(ckpt: dict, path, use_ema: bool = False, ema_index: int | None = None,
                   ema_decay: float | None = None) -> Weights:
    """The raw weights, the first EMA, or the EMA picked by index or decay."""
    if not use_ema and ema_index is None and ema_decay is None:
        for state in (ckpt.get("state_dict"), ckpt.get("model"), ckpt):
            if _is_state_dict(state):
                return Weights(strip_prefixes(state), "raw", None)
        raise UserError(f"{path} holds no model weights (no 'state_dict' of tensors)")
    keys = ema_keys(ckpt)
    if not keys:
        raise UserError(f"{path} holds no EMA weights; run without --use-ema to evaluate the raw weights")
    index = ema_index_for_decay(ckpt, ema_decay, path) if ema_decay is not None else ema_index or 0
    if not 0 <= index < len(keys):
        raise UserError(f"{path} has {len(keys)} EMA shadow(s); --ema-index {index} is out of range")
    state = ckpt[keys[index]]
    if not _is_state_dict(state):
        raise UserError(f"{path}: '{keys[index]}' is not a state dict of tensors")
    decay = ema_decays(ckpt)[index]
    meta = ckpt.get("ema") if isinstance(ckpt.get("ema"), dict) else {}
    return Weights(strip_prefixes(state), "ema" if decay is None else f"ema {decay:g}",
                   meta.get("eval_dtype"))


def strip_prefixes(state: dict) -> dict:
    """Drop DDP's 'module.' and torch.compile's '_orig_mod.' prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_weights_into(model, state: dict, path: str | Path, arch: str | None = None,
                      model_name: str | None = None, allow_missing: list[str] = ()) -> None:
    """Strict load (but for the keys in `allow_missing`, which keep the model's values) with a
    one-line explanation when the weights do not fit the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in allow_missing]
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
    model.load_state_dict(state, strict=not allow_missing)


def args_dict(ckpt: dict) -> dict:
    """The training args of a checkpoint as a plain dict (ours, or timm's Namespace)."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}
