"""timm settings that ematrain does not implement, each with the reason, and how a recipe may
carry them.

timm writes every setting into its args.yaml, so these keys are what lets such a file serve as a
recipe here: at the value that leaves them off they change nothing and are dropped; set to
anything else they are refused by name with the reason, never silently ignored. The README's
table of refused flags (``<!-- timm-flags-refused -->``) gives the same reasons.
"""
from __future__ import annotations

from ..util.errors import UserError

_TORCHSCRIPT = "TorchScript is deprecated in torch 2: use --torchcompile"

# Each unsupported setting: the value that leaves it off, and why it is refused when on.
TIMM_REFUSED: dict[str, tuple[object, str]] = {
    # train.py and validate.py
    "torchscript": (False, _TORCHSCRIPT),
    "fuser": ("", "it picks a TorchScript fuser; TorchScript is deprecated in torch 2: use "
                  "--torchcompile"),
    "aot_autograd": (False, "functorch's memory_efficient_fusion is superseded: use --torchcompile"),
    "tf_preprocessing": (False, "timm's TensorFlow preprocessing needs TensorFlow, which ematrain "
                                "does not depend on"),
    "tta": (0, "timm's train.py averages groups of outputs that its loader no longer makes"),
    "amp_impl": ("native", "timm 1.0 removed apex AMP; --amp is torch's native AMP"),
}
# Command-line spellings that are not the dest's (timm's second name of a setting).
_SPELLINGS: dict[str, str] = {}
TIMM_SETTINGS_NOT_SUPPORTED = {key: off for key, (off, _why) in TIMM_REFUSED.items()}
# Settings that only act when another one is on: whatever their value, they are idle while
# their gate is off (matched by prefix). None at present.
_TIMM_GATED: dict[str, str] = {}


def timm_gate(key: str) -> str | None:
    """The switch that a gated timm setting belongs to, or None."""
    return next((gate for prefix, gate in _TIMM_GATED.items()
                 if key.startswith(prefix) and key != gate), None)


def _key(flag: str) -> str:
    key = flag.lstrip("-").split("=")[0].replace("-", "_")
    return _SPELLINGS.get(key, key)


def is_timm_flag(flag: str) -> bool:
    """A command-line word (``--torchscript`` or ``--fuser=x``) naming such a setting."""
    key = _key(flag)
    return key in TIMM_REFUSED or timm_gate(key) is not None


def why_refused(flag: str) -> str:
    """The reason a timm flag (or setting) is refused here."""
    key = _key(flag)
    return TIMM_REFUSED[timm_gate(key) or key][1]


def _is_off(key: str, value) -> bool:
    return value in (None, "", False, 0, [], {}) or value == TIMM_SETTINGS_NOT_SUPPORTED.get(key)


def refuse_foreign_keys(source: str, extra: dict) -> None:
    """Keys of a recipe that are no flag of ours may only be timm settings left off (the caller
    drops them); a typo, or a timm feature switched on, is an error naming the keys."""
    unknown = sorted(k for k in extra if k not in TIMM_REFUSED and not timm_gate(k))
    if unknown:
        raise UserError(f"{source}: unknown key(s): {', '.join(unknown)}")
    # A gated setting is part of its gate's feature: only the gate, when on, is reported.
    active = [f"{k}={extra[k]!r} ({why_refused(k)})" for k in sorted(extra)
              if timm_gate(k) is None and not _is_off(k, extra[k])]
    if active:
        raise UserError(f"{source}: timm setting(s) ematrain does not support: {'; '.join(active)}")
