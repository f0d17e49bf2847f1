"""Model creation through timm, with one-line errors for names timm does not know."""
from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn

from ..util.errors import UserError
from ..util.logs import log
from .start_weights import describe_pretrained, pretrained_overlay


def check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise UserError(f"unknown model '{name}'{hint}")


def create_model(name: str, num_classes: int, pretrained: bool = False,
                 pretrained_path: str | None = None, **kwargs):
    """timm.create_model; `pretrained_path` points --pretrained at a local weights file."""
    check_model_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    source = None
    if pretrained_path:
        if not Path(pretrained_path).is_file():
            raise UserError(f"--pretrained-path file not found: {pretrained_path}")
        pretrained = True
        kwargs["pretrained_cfg_overlay"], source = pretrained_overlay(
            name, pretrained_path)
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise UserError(f"cannot create model '{name}': {_describe(exc)}") from None
    except (RuntimeError, OSError, ValueError, AssertionError, LookupError, ArithmeticError,
            AttributeError) as exc:
        # --model-kwargs reach timm's builders as given: a value of the wrong shape fails
        # anywhere inside them (img_size={32}: an IndexError).
        if pretrained:
            raise UserError(f"cannot load pretrained weights for '{name}' (no network here; "
                            f"use --initial-checkpoint with a local file): {str(exc)[:120]}") from None
        raise UserError(f"cannot create model '{name}': {_describe(exc)}") from None
    if source is not None:
        log.info(describe_pretrained(pretrained_path, source, model))
    return model


def architecture_kwargs(args: dict) -> dict:
    """The training flags that shape the network, as create_model keyword arguments.

    validate.py rebuilds a checkpoint's model from these (ours and timm's save them under the
    same names), so a run with ``--gp catavgmax`` or ``--model-kwargs`` evaluates the network it
    trained. ``--model-kwargs`` comes last and wins over the named flags.
    """
    return {"global_pool": args.get("gp"), "in_chans": args.get("in_chans"),
            **(args.get("model_kwargs") or {})}


def _describe(exc: Exception) -> str:
    # A bare assert in timm has no message: name the exception and where it came from instead.
    text = str(exc).strip()[:160]
    if text:
        return text
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = f" in {frame.tb_frame.f_code.co_name}()" if frame is not None else ""
    return f"{type(exc).__name__}{where} (check --gp and --model-kwargs)"


def set_batchnorm(model: nn.Module, momentum: float | None = None, eps: float | None = None) -> None:
    """Give every BatchNorm layer this momentum and/or eps (--bn-momentum, --bn-eps).

    timm hands these to the few model builders that take them (the EfficientNet family) and
    other models reject them; setting the layers works for every architecture. A model without
    BatchNorm is an error rather than a flag silently ignored.
    """
    if momentum is None and eps is None:
        return
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        flag = "--bn-momentum" if momentum is not None else "--bn-eps"
        raise UserError(f"{flag} given but the model has no BatchNorm layers")
    for layer in layers:
        if momentum is not None:
            layer.momentum = momentum
        if eps is not None:
            layer.eps = eps


@torch.no_grad()
def init_head(model: nn.Module, scale: float | None = None, bias: float | None = None) -> None:
    """--head-init-scale / --head-init-bias, applied as timm does: after any initial weights.

    A small head scale is the usual fine-tuning trick: the new classifier starts near zero and
    does not disturb the pretrained features in the first steps.
    """
    if scale is None and bias is None:
        return
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise UserError("--head-init-scale/--head-init-bias: the model has no classifier layer")
    if scale is not None:
        head.weight.mul_(scale)
        if head.bias is not None:
            head.bias.mul_(scale)
    if bias is not None:
        if head.bias is None:
            raise UserError("--head-init-bias: the model's classifier has no bias")
        head.bias.fill_(bias)


_BATCHNORM = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def probe_input(model: nn.Module, name: str, input_size, channels_last: bool = False) -> int | None:
    """One blank image through `model` in eval mode, before any work: a model that cannot take
    this input size (a fixed-size ViT at another --img-size, --model-kwargs that break it) is
    one line now, not a traceback at the first step. Returns the fewest values per channel a
    BatchNorm layer sees per image (None: no BatchNorm), which training multiplies by the batch.

    Eval mode changes no statistics, and the random state is left as it was.
    """
    first = next(model.parameters(), None)
    device, dtype = (first.device, first.dtype) if first is not None else ("cpu", torch.float32)
    per_image = []
    layers = [m for m in model.modules() if isinstance(m, _BATCHNORM)]
    hooks = [m.register_forward_pre_hook(
        lambda _, args: per_image.append(args[0].numel() // max(1, args[0].shape[1])))
        for m in layers]
    was_training = model.training
    image = torch.zeros((1, *input_size), device=device, dtype=dtype)
    if channels_last and image.dim() == 4:
        image = image.contiguous(memory_format=torch.channels_last)
    try:
        with torch.random.fork_rng(devices=[]):
            model.eval()(image)
    except (RuntimeError, AssertionError, ValueError, LookupError, TypeError,
            ArithmeticError) as exc:
        size = "x".join(str(v) for v in input_size)
        raise UserError(f"model '{name}' fails on a {size} input: {_describe(exc)} (check "
                        f"--img-size, --gp and --model-kwargs; a ViT of one size takes "
                        f"--model-kwargs img_size=N or dynamic_img_size=True)") from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return min(per_image) if per_image else None
