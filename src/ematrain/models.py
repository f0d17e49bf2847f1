"""Model creation through timm, with one-line errors for names timm does not know."""
from __future__ import annotations

import difflib

import timm

from .errors import UserError


def check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise UserError(f"unknown model '{name}'{hint}")


def create_model(name: str, num_classes: int, pretrained: bool = False, **kwargs):
    check_model_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        if pretrained:
            raise UserError(f"cannot load pretrained weights for '{name}' (no network here; "
                            f"use --initial-checkpoint with a local file): {str(exc)[:120]}") from None
        raise UserError(f"cannot create model '{name}': {str(exc)[:160]}") from None
