"""Which weights of a checkpoint file to take: the raw weights, the first EMA, or an EMA by index,
decay or the name the run gave it (validate.py, --initial-checkpoint, --pretrained-path), and
loading them into a model with a one-line explanation of any mismatch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..util.errors import UserError
from .files import _is_state_dict


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
