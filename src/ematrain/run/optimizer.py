"""timm's optimizer (with torch's fused CPU kernel where it fits) and timm's LR scheduler, built
from their specs."""
from __future__ import annotations

import inspect
import math

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.scheduler import create_scheduler_v2
from torch import nn

from ..settings.model_specs import OptimSpec, ScheduleSpec
from ..util.errors import UserError

# torch's optimizers with a fused CPU kernel. On the CPU torch defaults to their per-tensor loop
# (its multi-tensor default is for accelerators only); the fused kernel makes the same update,
# to float32 rounding, 3-7x faster (resnet18: SGD 4-5 ms against 12-34 ms per step).
_FUSED_ON_CPU = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad)


def build_optimizer(spec: OptimSpec, model: nn.Module, lr: float):
    kwargs = spec.create_kwargs()
    fused = spec.opt_fused and _fused_fits(spec.opt, model, kwargs)
    if fused:
        kwargs["fused"] = True
    try:
        optimizer = create_optimizer_v2(model, opt=spec.opt, lr=lr, weight_decay=spec.weight_decay,
                                        momentum=spec.momentum, layer_decay=spec.layer_decay,
                                        **_layer_decay_bounds(spec), **kwargs)
    except (AssertionError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        # RuntimeError: torch's own refusals (fused=True foreach=True).
        raise UserError(f"cannot create optimizer '{spec.opt}': {str(exc)[:160]}") from None
    _check_kwarg_types(spec.opt, type(optimizer), spec.opt_kwargs)
    _keep_implementation(optimizer)
    return optimizer


def _layer_decay_bounds(spec: OptimSpec) -> dict:
    """--layer-decay-min-scale and --layer-decay-no-opt-scale, passed only when given."""
    bounds = {}
    if spec.layer_decay_min_scale:
        bounds["layer_decay_min_scale"] = spec.layer_decay_min_scale
    if spec.layer_decay_no_opt_scale is not None:
        bounds["layer_decay_no_opt_scale"] = spec.layer_decay_no_opt_scale
    return bounds


def _check_kwarg_types(opt: str, cls: type, given: dict) -> None:
    """--opt-kwargs values of the type of the optimizer class's own default: torch stores what
    it is given and fails only inside the first step (maximize=b'x': its kernel's signature
    dump)."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    for key, value in given.items():
        default = params[key].default if key in params else inspect.Parameter.empty
        if default is inspect.Parameter.empty:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, bool):
            fits, kind = isinstance(value, bool), "True or False"
        elif isinstance(default, (int, float)):
            fits, kind = number and math.isfinite(value), "a finite number"
        elif isinstance(default, (tuple, list)):
            fits = isinstance(value, (tuple, list)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in value)
            kind = "a tuple of numbers"
        elif default is None:
            fits = value is None or isinstance(value, bool) or (number and math.isfinite(value))
            kind = "None, True, False or a number"
        else:
            fits, kind = isinstance(value, type(default)), type(default).__name__
        if not fits:
            raise UserError(f"--opt-kwargs {key}={value!r}: {opt}'s {key} takes {kind}")


def _fused_fits(opt: str, model: nn.Module, kwargs: dict) -> bool:
    """Whether `opt` is one of torch's optimizers with a fused kernel for this model's CPU
    parameters, and the user chose no implementation of their own (--opt-kwargs)."""
    if {"fused", "foreach", "differentiable"} & kwargs.keys():
        return False
    try:
        cls = get_optimizer_class(opt, bind_defaults=False)
    except (AssertionError, ValueError, KeyError, ImportError):
        return False  # an unknown or unavailable one: create_optimizer_v2 says so in its words
    return (isinstance(cls, type) and issubclass(cls, _FUSED_ON_CPU)
            and all(p.device.type == "cpu" and p.is_floating_point() for p in model.parameters()))


def _keep_implementation(optimizer: torch.optim.Optimizer) -> None:
    """A loaded state_dict replaces the param groups, their implementation flags with them (a
    timm checkpoint says fused=None, ours fused=True): which kernel runs is this process's
    choice, not the file's."""
    chosen = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]

    def restore(opt: torch.optim.Optimizer) -> None:
        for group, flags in zip(opt.param_groups, chosen):
            group.update(flags)
    optimizer.register_load_state_dict_post_hook(restore)


def build_scheduler(spec: ScheduleSpec, optimizer, updates_per_epoch: int, seed: int,
                    eval_metric: str):
    """timm's scheduler and the number of epochs it runs (cooldown included)."""
    try:
        return create_scheduler_v2(
            optimizer, sched=spec.sched, num_epochs=spec.epochs, decay_epochs=spec.decay_epochs,
            decay_rate=spec.decay_rate, min_lr=spec.min_lr, warmup_lr=spec.warmup_lr,
            warmup_epochs=spec.warmup_epochs, cooldown_epochs=spec.cooldown_epochs,
            decay_milestones=spec.decay_milestones, patience_epochs=spec.patience_epochs,
            warmup_prefix=spec.warmup_prefix, noise=spec.noise, noise_pct=spec.lr_noise_pct,
            noise_std=spec.lr_noise_std, noise_seed=seed, cycle_mul=spec.lr_cycle_mul,
            cycle_decay=spec.lr_cycle_decay, cycle_limit=spec.lr_cycle_limit,
            k_decay=spec.lr_k_decay, step_on_epochs=not spec.sched_on_updates,
            updates_per_epoch=updates_per_epoch,
            plateau_mode="min" if eval_metric == "loss" else "max")
    except (AssertionError, ValueError, KeyError, ArithmeticError) as exc:
        # ArithmeticError: the cycle length of a large --lr-cycle-limit overflows.
        raise UserError(f"cannot create scheduler '{spec.sched}': {str(exc)[:160]}") from None
