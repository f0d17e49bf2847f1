"""The weights a new run starts from (--initial-checkpoint, --pretrained-path), said in one line.

Both read the file with `checkpoint.files.load_file` (no pickled code runs) and differ as timm's do:
--initial-checkpoint takes the raw weights (timm's ``load_checkpoint`` default), --pretrained-path
the EMA weights where the file has them (timm's pretrained loading). A classifier with another
class count is left at its initialisation and everything else loads, as timm's pretrained loading
does; any other mismatch is an error naming it.
"""
from __future__ import annotations

from pathlib import Path

from timm.models import get_pretrained_cfg
from torch import nn

from ..checkpoint.files import load_file
from ..checkpoint.weights import Weights, ema_keys, load_weights_into, select_weights

INITIAL, PRETRAINED = "--initial-checkpoint", "--pretrained-path"


def read(path: str | Path, prefer_ema: bool) -> tuple[dict, Weights]:
    """The file's contents and the weight set a start takes from it."""
    ckpt = load_file(path)
    use_ema = prefer_ema and bool(ema_keys(ckpt))
    return ckpt, select_weights(ckpt, path, use_ema=use_ema)


def classifier_names(model_or_cfg) -> list[str]:
    """The classifier layers' names from a timm model's (or pretrained config's) `classifier`."""
    cfg = getattr(model_or_cfg, "pretrained_cfg", model_or_cfg)
    names = cfg.get("classifier") if isinstance(cfg, dict) else getattr(cfg, "classifier", None)
    if not names:
        return []
    return [names] if isinstance(names, str) else list(names)


def head_classes(state: dict, names: list[str]) -> int | None:
    """Outputs of the first classifier layer in `state`, if it has one."""
    for name in names:
        weight = state.get(f"{name}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def without_other_head(model: nn.Module, state: dict) -> tuple[dict, list[str]]:
    """`state` less the classifier tensors whose shapes differ from the model's, and their keys."""
    own = model.state_dict()
    heads = tuple(f"{n}." for n in classifier_names(model))
    left_out = [k for k in state if k.startswith(heads) and k in own
                and tuple(state[k].shape) != tuple(own[k].shape)]
    return {k: v for k, v in state.items() if k not in left_out}, left_out


def load_initial_checkpoint(model: nn.Module, path: str, model_name: str) -> str:
    """Load --initial-checkpoint's raw weights into `model`; return the line that says so."""
    ckpt, weights = read(path, prefer_ema=False)
    state, left_out = without_other_head(model, weights.state)
    load_weights_into(model, state, path, arch=ckpt.get("arch"), model_name=model_name,
                              allow_missing=left_out)
    return describe(INITIAL, path, ckpt, weights, len(state), left_out, model)


def pretrained_overlay(model_name: str, path: str) -> tuple[dict, tuple[dict, Weights]]:
    """timm's ``pretrained_cfg_overlay`` that hands it --pretrained-path's weights as read here
    (so timm's own adaptation runs: checkpoint filters, input channels, the classifier rule),
    with the file's class count, so that a matching classifier is kept; and what was read."""
    ckpt, weights = read(path, prefer_ema=True)
    cfg = get_pretrained_cfg(model_name)
    theirs = head_classes(weights.state, classifier_names(cfg)) if cfg is not None else None
    overlay = {"state_dict": dict(weights.state)}
    if theirs is not None:
        overlay["num_classes"] = theirs
    return overlay, (ckpt, weights)


def describe_pretrained(path: str, source: tuple[dict, Weights], model: nn.Module) -> str:
    """The line for --pretrained-path, from what the model now holds."""
    ckpt, weights = source
    own = model.state_dict()
    names = classifier_names(model)
    theirs, ours = head_classes(weights.state, names), head_classes(own, names)
    left_out = ([f"{n}.{p}" for n in names for p in ("weight", "bias") if f"{n}.{p}" in own]
                if theirs is not None and theirs != ours else [])
    loaded = sum(1 for k in weights.state if k in own and k not in left_out)
    return describe(PRETRAINED, path, ckpt, weights, loaded, left_out, model)


def describe(flag: str, path, ckpt: dict, weights: Weights, loaded: int, left_out: list[str],
             model: nn.Module) -> str:
    """``--initial-checkpoint PATH: raw weights of 'resnet18' (epoch 7), 62 tensors loaded;
    classifier fc left out: 1000 classes in the file, 10 here``."""
    what = "raw weights" if weights.name == "raw" else f"EMA weights ({weights.name})"
    arch = ckpt.get("arch")
    line = f"{flag} {path}: {what}" + (f" of '{arch}'" if isinstance(arch, str) else "")
    if isinstance(ckpt.get("epoch"), int):
        line += f" (epoch {ckpt['epoch']})"
    line += f", {loaded} tensors loaded"
    if left_out:
        names = sorted({k.rsplit(".", 1)[0] for k in left_out})
        theirs = head_classes(weights.state, names)
        ours = head_classes(model.state_dict(), names)
        line += (f"; classifier {', '.join(names)} left at its initialisation: {theirs} classes "
                 f"in the file, {ours} here")
    return line
