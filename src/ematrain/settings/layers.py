"""Settings from layers: a checkpoint's recorded settings, a `-c` YAML recipe, the command line.

Each layer below the command line is turned into argument tokens and placed before the command
line's, and argparse parses them all at once, so its own rules (types, choices, list lengths) check
every value and "the later layer wins" is argparse's "the last occurrence wins". Two flags that
spell one setting (`DIR` and `--data-dir`; `--model-ema-decay` and `--model-ema-half-life`) are one
setting here: a layer that gives either replaces what a lower layer gave for both.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from ..util.errors import UserError
from .flags import LIST_END, FlagParser, ParseKwargs
from .timm_unsupported import refuse_foreign_keys

# Flags that spell the same setting.
SAME_SETTING = ({"data", "data_dir"}, {"model_ema_decay", "model_ema_half_life"})
# Never taken from a lower layer: they say how to start this process, not what the run is.
NOT_LAYERED = {"config", "resume", "no_resume_opt"}


@dataclass
class Layer:
    """Settings from one source, e.g. ``config file x.yaml`` or ``checkpoint last.pth.tar``."""
    source: str
    values: dict


class _DuplicateKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice (the second would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"key '{key}' is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_recipe(path: str) -> Layer:
    """A YAML recipe: a mapping of flag names (with `-` or `_`) to values."""
    file = Path(path)
    source = f"config file {path}"
    if not file.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_DuplicateKeyLoader) or {}
    except UnicodeDecodeError:
        raise UserError(f"{source} is not UTF-8 text") from None
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise UserError(f"{source} is not valid YAML{at}") from None
    except OSError as exc:
        raise UserError(f"cannot read {source}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a mapping of flag names to values")
    values, spelled = {}, {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in values:  # batch_size and batch-size: one setting, the later would win
            raise UserError(f"{source}: '{spelled[name]}' and '{key}' both set {name}")
        values[name], spelled[name] = value, key
    return Layer(source, values)


# ----------------------------------------------------------------------------- layers as tokens
def _primary_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    actions = {}
    for action in parser._actions:
        if action.dest not in ("help",) and action.dest not in actions:
            actions[action.dest] = action
    return actions


def _text(value) -> str:
    if isinstance(value, float):
        # argparse takes "-1e-05" for an option; the positional spelling of the same number
        # ("-0.00001", exact) reads as a negative number.
        return np.format_float_positional(value, trim="-") if value < 0 else repr(value)
    return str(value)


def _option(action: argparse.Action) -> str:
    return max(action.option_strings, key=len) if action.option_strings else "--data-dir"


def _value_tokens(action: argparse.Action, key: str, value, where: str) -> list[str]:
    """The command-line words that say `key: value`; what YAML can say but a flag cannot is
    refused here, everything else is left to argparse."""
    opt = _option(action)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: {key} must be true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x
            return [min(action.option_strings, key=len) if value else opt]
        return [opt] if value else []
    if value is None:
        if action.default is not None and action.nargs != "?":
            raise UserError(f"{where}: {key} cannot be empty")
        return []
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a mapping of names to values, got {value!r}")
        return [opt, *(f"{k}={v!r}" for k, v in value.items()), LIST_END] if value else []
    if action.nargs == "?" and isinstance(value, bool) and action.const is not None:
        # torchcompile: true is the bare flag, written with its value so that a positional
        # argument after it is not taken for one.
        return [f"{opt}={action.const}"] if value else []
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items and action.default in ([], ()):
            return []  # no flag says "none" (timm's `wandb_tags: []`): the default does
        return [opt, *map(_text, items), LIST_END]
    if isinstance(value, (list, tuple, dict)):
        raise UserError(f"{where}: {key} takes one value, got {value!r}")
    return [f"{opt}={_text(value)}"]


def _covered(given: set[str]) -> set[str]:
    """The settings that `given` dests decide, counting both spellings of one setting."""
    covered = set(given)
    for group in SAME_SETTING:
        if group & given:
            covered |= group
    return covered


def layer_tokens(parser: argparse.ArgumentParser, layer: Layer,
                 above: set[str]) -> tuple[list[str], set[str]]:
    """The tokens of `layer`, leaving out the settings that a layer above it gives, and the
    settings the layer gives (a key set to false or null gives its setting too)."""
    actions = _primary_actions(parser)
    values = {k: v for k, v in layer.values.items() if k not in NOT_LAYERED}
    refuse_foreign_keys(layer.source, {k: v for k, v in values.items() if k not in actions})
    data, data_dir = values.get("data"), values.get("data_dir")
    if data and data_dir and Path(data).resolve() != Path(data_dir).resolve():
        raise UserError(f"two data roots given ({layer.source}): {data} and data_dir {data_dir}")
    skip = _covered(above)
    tokens, ema_off, gives = [], False, set()
    for key, value in values.items():
        if key not in actions or key in skip:
            continue
        gives.add(key)
        if key == "model_ema" and value is False:
            ema_off = True  # placed last: the layer's own EMA settings must not switch it on
            continue
        tokens += _value_tokens(actions[key], key, value, layer.source)
    return tokens + (["--no-model-ema"] if ema_off else []), gives


def given(build: Callable[[], argparse.ArgumentParser], argv: list[str]) -> dict:
    """The settings that `argv` itself gives, with their values (no defaults)."""
    parser = build()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    namespace, _ = parser.parse_known_args(argv)
    return vars(namespace)


def _parse_layer_alone(parser: argparse.ArgumentParser, layer: Layer, tokens: list[str]) -> None:
    """Parse one layer's tokens by themselves, so a bad value is reported as that layer's."""
    try:
        parser.parse_args(tokens)
    except UserError as exc:
        message = str(exc)
        if message.startswith("argument "):
            flag, _, rest = message.removeprefix("argument ").partition(": ")
            key = flag.split("/")[-1].lstrip("-").replace("-", "_")
            message = f"{key}: {rest}"
        raise UserError(f"{layer.source}: {message}") from None


def parse_layers(build: Callable[[], argparse.ArgumentParser], argv: list[str],
                 layers: list[Layer]) -> argparse.Namespace:
    """Parse `layers` (lowest first) under the command line `argv`."""
    parser = build()
    above = set(given(build, argv))
    stacked: list[str] = []
    for layer in reversed(layers):  # highest first, so each knows what is above it
        tokens, gives = layer_tokens(parser, layer, above)
        _parse_layer_alone(parser, layer, tokens)
        stacked = tokens + stacked
        above |= gives
    namespace = parser.parse_args(stacked + argv)
    _settle_data_root(namespace)
    return namespace


def _settle_data_root(ns: argparse.Namespace) -> None:
    """timm's two spellings of the data root, positional DIR and --data-dir, end in data_dir."""
    if ns.data and ns.data_dir and Path(ns.data).resolve() != Path(ns.data_dir).resolve():
        raise UserError(f"two data roots given: {ns.data} and --data-dir {ns.data_dir}")
    ns.data_dir, ns.data = ns.data_dir or ns.data, None


def parse_command(build: Callable[[], FlagParser], argv: list[str],
                  below: list[Layer] = ()) -> argparse.Namespace:
    """The command line over its `-c` recipe (if any) over `below` (e.g. a checkpoint's)."""
    argv = [str(a) for a in argv]
    config = given(build, argv).get("config")
    layers = list(below) + ([read_recipe(config)] if config else [])
    return parse_layers(build, argv, layers)
