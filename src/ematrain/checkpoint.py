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

from . import __version__, distributed
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
    Key("metric", "keeper", "timm", "the primary weight set's --eval-metric this epoch, as timm's: "
        "the first EMA's with an EMA on (the raw weights' with --primary-weights raw; None "
        "mid-epoch)"),
    Key("version", "schema", "timm", "this format's version"),
    Key("ematrain_version", "schema", "ematrain", "the ematrain release that wrote it"),
    Key("scheduler", "scheduler", "ematrain", "the LR scheduler's state_dict() (when one runs)"),
    Key("ema", "ema", "ematrain", "decays (sigma_rels under the power schedule), `names` (how "
        "the run names each shadow: `0.99`, `hl2ep`, `sr0.1`), `schedule` (its name and "
        "settings), `keys` (where each shadow is), update counters, settings, and `eval_dtype` "
        "(the dtype validation scored the shadows in)"),
    Key("posthoc_ema", "posthoc_ema", "ematrain", "with --model-ema-posthoc: the power-function "
        "EMAs' state (`ema`: sigma_rels, schedule, counters, shadows), the snapshot interval "
        "and dtype, the last snapshot taken (its step and that of the EMAs' last average) and the "
        "fork folder its series goes on in, if any"),
    Key("posthoc", "posthoc", "ematrain", "in model_posthoc_best.pth.tar only (validate.py "
        "--posthoc): the reconstructed EMA's length, fit error and the series it came from"),
    Key("counters", "counters", "ematrain", "epoch and step to resume at, optimizer updates, the "
        "epoch's running loss, skipped steps, world size"),
    Key("keeper", "keeper", "ematrain", "best epoch and metric of each weight set, and the "
        "checkpoint-<epoch> history"),
    Key("summary", "summary", "ematrain", "the summary.csv rows so far"),
    Key("rank_buffers", "distributed", "ematrain", "under torchrun only: every process's "
        "BatchNorm statistics of the model and of each shadow, by rank (they differ between "
        "reductions); a resumed process with the same process count takes its own back"),
    Key("data_config", "data", "ematrain", "the evaluation transform (validate.py rebuilds it)"),
    Key("num_classes", "data", "ematrain", "classifier outputs"),
    Key("class_names", "data", "ematrain", "class folder names, in label order"),
    Key("run_id", "run", "ematrain", "the run's identity: drawn at a fresh start, kept by every "
        "resume, carried by each post-hoc snapshot too (no series mixes two runs)"),
)


def schema_markdown() -> str:
    """The key table as the README shows it."""
    lines = ["| key | owner | from | what |", "|---|---|---|---|"]
    lines += [f"| `{k.name}` | {k.owner} | {k.origin} | {k.what} |" for k in SCHEMA]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- saving
def save(run, metric: float | None = None, rank_buffers: list | None = None) -> dict:
    """The checkpoint of `run` now: every part's state under its schema key (`rank_buffers`:
    `distributed.local_buffers` of every rank, under torchrun)."""
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
        "run_id": run.run_id,
    }
    ema = parts.pop("ema", None)
    if ema is not None:
        ckpt.update(ema_entries(ema.full_state_dict(), ema.scored_dtype(run.model),
                                run.ema_names()))
    for name, part in parts.items():
        ckpt[name] = part.state_dict()
    if rank_buffers is not None and run.dist.enabled:
        ckpt["rank_buffers"] = rank_buffers
    return ckpt


def ema_entries(state: dict, scored: torch.dtype, names: list[str] | None = None) -> dict:
    """The EMA's state in timm's layout: the first shadow where timm puts it, the others beside
    it, and everything else under `ema` (with `names`: how the run names each shadow)."""
    meta = dict(state)
    shadows = meta.pop("shadows")
    keys = ["state_dict_ema"] + [f"state_dict_ema_{i}" for i in range(1, len(shadows))]
    meta["keys"] = keys
    if names:
        meta["names"] = list(names)
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
            if name == "ema":
                part.load_full_state_dict(ema_state(ckpt))
            else:
                part.load_state_dict(ckpt[key])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            raise UserError(f"cannot resume from {path}: its '{key}' does not fit this run's "
                            f"{name} ({_short_reason(exc)})") from None
    _restore_rank_buffers(run, ckpt.get("rank_buffers"), path)
    return fresh


def _restore_rank_buffers(run, saved: list | None, path) -> None:
    """This process's own BatchNorm statistics, when the checkpoint holds every rank's and the
    process count is the same (otherwise every process starts from rank 0's, in the parts)."""
    if saved is None or len(saved) != run.dist.world_size:
        return
    if not distributed.load_local_buffers(run.replica_modules(), saved[run.dist.rank]):
        raise UserError(f"cannot resume from {path}: its 'rank_buffers' do not fit this run's "
                        f"model and shadows")


def ema_state(ckpt: dict) -> dict:
    """The EMA's full_state_dict() put back together from the schema's keys."""
    meta = dict(ckpt["ema"])
    meta["shadows"] = [ckpt[key] for key in meta.pop("keys")]
    meta.pop("eval_dtype", None)
    meta.pop("names", None)
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


def peek(path: str | Path) -> dict | None:
    """A checkpoint's `epoch`, `counters`, `keeper`, `summary`, run identity, `arch`, `args` (a
    plain dict) and `metric` without reading its tensors (memory-mapped), or None when it cannot
    be read."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not the one wanted
        return None
    if not isinstance(data, dict):
        return None
    data = upgrade(data)
    peeked = {k: data.get(k) for k in ("epoch", "counters", "keeper", "summary", "run_id",
                                       "arch", "metric")}
    peeked["args"] = args_dict(data)
    tracker = data.get("posthoc_ema")
    if isinstance(tracker, dict):  # where its post-hoc series lies, and how far it reaches
        peeked["posthoc"] = {k: tracker.get(k) for k in ("fork", "last_snapshot")}
    return peeked


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


def ema_names(ckpt: dict) -> list[str | None]:
    """How the run named each shadow (``0.99``, ``hl2ep``, ``sr0.1``); older checkpoints by
    their decay, timm's not at all (None)."""
    meta = ckpt.get("ema")
    names = meta.get("names") if isinstance(meta, dict) else None
    if names:
        return [str(n) for n in names]
    return [None if d is None else f"{d:g}" for d in ema_decays(ckpt)]


def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 < value < 1.0 else None


def _decay_matches(decay: float, value: float, text: str) -> bool:
    """`decay` as given: exactly, as printed (6 significant digits), or to the digits typed
    (``0.984`` is the half-life shadow of decay 0.98437)."""
    if abs(decay - value) <= 1e-12 * max(1.0, decay) or f"{decay:g}" == f"{value:g}":
        return True
    digits = text.split(".", 1)[1] if "." in text and "e" not in text.lower() else ""
    return bool(digits) and round(decay, len(digits)) == value


def ema_index_for_decay(ckpt: dict, decay: float | str, path) -> int:
    """The shadow `decay` names: by the name the run gave it (``hl2ep`` or ``2ep``, ``sr0.1``,
    ``0.99``, with or without ``ema``), else by its decay (see `_decay_matches`)."""
    text = str(decay).strip().removeprefix("ema").strip()
    names, decays = ema_names(ckpt), ema_decays(ckpt)
    hits = [i for i, n in enumerate(names) if n is not None and text in (n, n.removeprefix("hl"))]
    value = _as_number(text)
    if not hits and value is not None:
        hits = [i for i, d in enumerate(decays) if d is not None and _decay_matches(d, value, text)]
    shown = [f"{n} (decay {d:.6g})" if n is not None and n != f"{d:g}" else f"{d:g}"
             for n, d in zip(names, decays) if d is not None]
    if len(hits) > 1:
        raise UserError(f"{path}: --ema-decay {text} matches {len(hits)} EMAs ("
                        f"{', '.join(shown[i] for i in hits)}); give more digits or --ema-index")
    if not hits:
        raise UserError(f"{path} has no EMA {text} (it has: {', '.join(shown) or 'unknown'})")
    return hits[0]


@dataclass(frozen=True)
class Weights:
    """One weight set of a checkpoint, as validate.py and --initial-checkpoint take it."""
    state: dict
    name: str                 # "raw", "ema", "ema 0.99"
    eval_dtype: str | None    # for EMA weights: the dtype training scored them in


def select_weights(ckpt: dict, path, use_ema: bool = False, ema_index: int | None = None,
                   ema_decay: float | str | None = None) -> Weights:
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
    name = ema_names(ckpt)[index]
    meta = ckpt.get("ema") if isinstance(ckpt.get("ema"), dict) else {}
    return Weights(strip_prefixes(state), "ema" if name is None else f"ema {name}",
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
