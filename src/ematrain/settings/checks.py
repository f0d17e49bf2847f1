"""What every spec's checks share: a spec built from the parsed flags, and the one-line
refusals of a value out of range, each naming the value's flag."""
from __future__ import annotations

import argparse
from dataclasses import fields

import torch

from ..ema.schedules import OutOfRange, sigma_rel_to_gamma
from ..util.errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
# Values that go into float32 weights must fit them.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def from_args(cls, ns: argparse.Namespace, **renamed: str):
    """Build spec `cls` from the namespace: each field from the dest of its name (or the one
    `renamed` gives); a field the namespace lacks keeps its default."""
    values = {}
    for f in fields(cls):
        dest = renamed.get(f.name, f.name)
        if f.init and hasattr(ns, dest):
            values[f.name] = getattr(ns, dest)
    return cls(**values)


def flag_of(spec, field_name: str) -> str:
    """The command-line flag of a spec's field (specs may name a field unlike its flag)."""
    return getattr(spec, "FLAGS", {}).get(field_name) or "--" + field_name.replace("_", "-")


def at_least(spec, minimum: int, *dests: str) -> None:
    for dest in dests:
        value = getattr(spec, dest)
        if value is not None and value < minimum:
            raise UserError(f"{flag_of(spec, dest)} must be >= {minimum}, got {value}")


def within(spec, low: float, high: float, *dests: str, closed: bool = True) -> None:
    for dest in dests:
        value = getattr(spec, dest)
        if value is None:
            continue
        if not (low <= value <= high if closed else low <= value < high):
            raise UserError(f"{flag_of(spec, dest)} must be in [{low:g}, {high:g}"
                            f"{']' if closed else ')'}, got {value}")


def positive(spec, *dests: str) -> None:
    for dest in dests:
        value = getattr(spec, dest)
        if value is not None and not value > 0:
            raise UserError(f"{flag_of(spec, dest)} must be > 0, got {value:g}")


def at_most(flag: str, values, most: int, what: str) -> None:
    if values is not None and len(values) > most:
        raise UserError(f"{flag} takes at most {most} values ({what}), got {len(values)}")


def check_sigma_rels(flag: str, values, most: int, named: bool = False) -> None:
    """Each sigma_rel one the power profile can have (`sigma_rel_to_gamma`); at most `most`."""
    at_most(flag, values, most, "each is one more EMA of the weights")
    for value in values or []:
        try:
            sigma_rel_to_gamma(value)
        except OutOfRange as exc:
            raise UserError(f"{flag}{': sigma_rel' if named else ''} must be in {exc.interval}, "
                            f"got {value:g}") from None


def dtype_named(name: str | None) -> torch.dtype | None:
    return DTYPES[name] if name else None
