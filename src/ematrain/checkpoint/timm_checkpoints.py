"""timm's checkpoints in ours' terms: where timm keeps its EMA, described as ours describes it,
and the step counts timm does not save, as timm's train.py counts them."""
from __future__ import annotations

from .files import is_state_dict
from .schema import args_dict, is_ours
from .weights import strip_prefixes

_EMA_KEYS = ("state_dict_ema", "model_ema")  # the second: timm's checkpoints before 0.4


def ema_key(ckpt: dict) -> str | None:
    """Where a checkpoint that is not ours keeps timm's EMA weights, if it has them."""
    if is_ours(ckpt):
        return None
    return next((k for k in _EMA_KEYS if is_state_dict(ckpt.get(k))), None)


def upgrade(ckpt: dict) -> dict:
    """A timm checkpoint with an EMA, its EMA described as ours describes it (``ema``: the decay
    timm recorded, where the weights are), so the resume rules treat both alike."""
    key = ema_key(ckpt)
    if key is None or "ema" in ckpt:
        return ckpt
    args = args_dict(ckpt)
    decay = args.get("model_ema_decay")
    meta = {"keys": [key], "timm": True,
            "decays": [float(decay)] if isinstance(decay, (int, float)) else [],
            "schedule": {"name": "timm" if args.get("model_ema_warmup") else "constant"}}
    return dict(ckpt, ema=meta, **{key: strip_prefixes(ckpt[key])})


def is_timm_ema(ckpt: dict) -> bool:
    return bool((ckpt.get("ema") or {}).get("timm"))


def continued(ckpt: dict, steps: int, every: int = 1) -> dict:
    """A copy of timm's (upgraded) checkpoint at optimizer step `steps`: timm saves no step
    count, so the optimizer updates, and its EMA's steps and averages (one every `every`
    steps), are the ones given."""
    ckpt = dict(ckpt, counters=dict(ckpt["counters"], num_updates=steps))
    if is_timm_ema(ckpt):
        ckpt["ema"] = dict(ckpt["ema"], steps=steps, num_updates=steps // every,
                           skipped_nonfinite=0)
    return ckpt
