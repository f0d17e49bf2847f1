"""Knowledge distillation (--kd-model-name): timm's distillation tasks driving our train step.

timm's `timm.task` classes own the arithmetic: `LogitDistillationTask` (KL divergence of the
temperature-softened logits, times T^2), `FeatureDistillationTask` (MSE of the pooled
pre-logits features, through a trained projection when the widths differ) and
`TokenDistillationTask` (the distillation head of DeiT-style students, soft or hard). Each
returns ``task_weight * task_loss + distill_weight * kd_loss``.

What this module adds is the contract with the loop:

- The **student is the model**: what every EMA averages, what validation scores and what a
  checkpoint's ``state_dict`` holds (`student`, the plain module). What the optimizer trains,
  DDP wraps and --clip-grad clips is `trainable`: the student, and with feature distillation
  the projection beside it (`trained` unwrapped).
- The **teacher is frozen**: its parameters need no gradient, it stays in eval mode (its
  BatchNorm statistics never move), no EMA sees it, no checkpoint holds it (a resume rebuilds
  it from the same name and weights).
- The teacher sees the input as it expects it: the batch is normalized with the run's
  ``--mean/--std`` (not the student's pretrained config, which timm's tasks assume) and
  re-normalized for the teacher's own.
- What a resume needs beyond the student is `state_dict` (timm's ``task_state``: the
  projection, never averaged: the EMAs hold students only); the optimizer holds its moments
  like any parameter's.
"""
from __future__ import annotations

from typing import Callable

import timm
import torch
from timm.models import get_pretrained_cfg
from timm.task import (
    FeatureDistillationTask,
    LogitDistillationTask,
    TokenDistillationTask,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..checkpoint.weights import load_weights_into
from ..util.errors import UserError
from ..util.modules import unwrap_model
from . import start_weights
from .model import check_model_name

TASKS = {"logit": LogitDistillationTask, "feature": FeatureDistillationTask,
         "token": TokenDistillationTask}
KINDS = tuple(TASKS)
WEIGHTS_FLAG = "--kd-pretrained-path"


def build_teacher(name: str, num_classes: int, kind: str, weights: str | None = None,
                  in_chans: int = 3, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> tuple[nn.Module, str]:
    """The frozen teacher and the line that says where its weights come from.

    `weights` is a local file (ours, timm's, a state dict, .safetensors; its EMA weights where
    it has them), loaded strictly; without it timm's pretrained weights for `name` (from timm's
    cache: nothing can be downloaded here). Logit and token distillation compare class scores,
    so the teacher's classifier must have the student's classes; feature distillation uses the
    pooled features only and keeps the teacher's own head.
    """
    check_model_name(name)
    if weights:
        ckpt, chosen = start_weights.read(weights, prefer_ema=True)
        heads = start_weights.classifier_names(get_pretrained_cfg(name) or {})
        classes = start_weights.head_classes(chosen.state, heads) or num_classes
        what = "raw weights" if chosen.name == "raw" else f"{chosen.name} weights"
        source = f"{WEIGHTS_FLAG} {weights} ({what})"
    else:
        cfg = get_pretrained_cfg(name)
        classes = getattr(cfg, "num_classes", None) or num_classes
        source = "timm's pretrained weights"
    if kind != "feature" and classes != num_classes:
        raise UserError(f"--kd-model-name {name}: the teacher's classifier has {classes} classes "
                        f"({source}), the student {num_classes}: {kind} distillation compares "
                        f"class scores; give a teacher trained on these classes "
                        f"({WEIGHTS_FLAG} FILE) or --kd-distill-type feature")
    try:
        teacher = timm.create_model(name, pretrained=not weights, num_classes=classes,
                                    in_chans=in_chans)
    except (RuntimeError, OSError, ValueError) as exc:
        raise UserError(f"--kd-model-name {name}: cannot load timm's pretrained weights (no "
                        f"network here): give the teacher's weights with {WEIGHTS_FLAG} FILE "
                        f"({str(exc).strip()[:100]})") from None
    if weights:
        load_weights_into(teacher, chosen.state, weights, arch=ckpt.get("arch"),
                                  model_name=name)
    freeze(teacher)
    return teacher.to(device=device, dtype=dtype), source


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode for good: `train()` on it changes nothing."""
    module.requires_grad_(False)
    module.eval()
    module.train = lambda mode=True: module  # a stray .train() must not move its statistics
    return module


class Distillation:
    """One of timm's distillation tasks, bound to the module the loop trains.

    Call it as the train step's loss: ``distill(images, targets)`` runs the student (through
    `trainable`, DDP/compile wrappers included once `bind` has been given them), the teacher
    without gradients, and returns the weighted loss; `last` holds the two terms of the
    latest call (detached) for the log.
    """

    def __init__(self, task: nn.Module, kind: str, teacher_name: str, source: str):
        self.task, self.kind, self.teacher_name, self.source = task, kind, teacher_name, source
        self.last: dict[str, torch.Tensor] = {}

    @classmethod
    def create(cls, student: nn.Module, teacher: nn.Module, kind: str, criterion: Callable, *,
               teacher_name: str = "", source: str = "", mean=None, std=None,
               distill_weight: float | None = None, task_weight: float | None = None,
               temperature: float = 4.0, loss_type: str = "kl", token_type: str = "soft",
               student_dim: int | None = None, teacher_dim: int | None = None,
               device: torch.device | None = None,
               dtype: torch.dtype | None = None) -> "Distillation":
        """timm's task of `kind` for `student` and the frozen `teacher`, with timm's loss
        weighting (`distill_weight`/`task_weight` as --distill-loss-weight/--task-loss-weight)."""
        if kind not in TASKS:
            raise UserError(f"--kd-distill-type must be one of {', '.join(KINDS)}, got {kind!r}")
        common = dict(student_model=student, teacher_model=teacher, criterion=criterion,
                      distill_loss_weight=distill_weight, task_loss_weight=task_weight,
                      device=device, dtype=dtype, verbose=False)
        extra = {"logit": dict(loss_type=loss_type, temperature=temperature),
                 "feature": dict(student_feature_dim=student_dim, teacher_feature_dim=teacher_dim),
                 "token": dict(distill_type=token_type, temperature=temperature)}[kind]
        try:
            task = TASKS[kind](**common, **extra)
        except (ValueError, AttributeError, TypeError) as exc:
            raise UserError(f"--kd-distill-type {kind} with student "
                            f"{type(unwrap_model(student)).__name__}: {str(exc)[:160]}") from None
        task.teacher.requires_grad_(False)
        if mean is not None and std is not None:
            # The batch is normalized with the run's data config, which --mean/--std may set.
            shape = (1, -1, 1, 1)
            task.student_mean = torch.tensor(mean, device=task.device, dtype=task.dtype).view(shape)
            task.student_std = torch.tensor(std, device=task.device, dtype=task.dtype).view(shape)
        return cls(task, kind, teacher_name or type(unwrap_model(teacher)).__name__, source)

    # --------------------------------------------------------------------------- the modules
    @property
    def trainable(self) -> nn.Module:
        """What the optimizer trains and DDP wraps: the student, or (feature distillation)
        the student with its projection."""
        return self.task.trainable_module

    @property
    def trained(self) -> nn.Module:
        """`trainable` without its DDP/compile wrappers: what the optimizer is built over."""
        return unwrap_model(self.task.trainable_module)

    @property
    def student(self) -> nn.Module:
        """The plain student: what every EMA averages, validation scores and checkpoints keep."""
        module = unwrap_model(self.task.trainable_module)
        return getattr(module, "student", module)

    @property
    def teacher(self) -> nn.Module:
        return self.task.teacher.model

    def bind(self, wrapped: nn.Module) -> None:
        """Run the student through `wrapped` (DDP, torch.compile of `trainable`) from now on."""
        if unwrap_model(wrapped) is not unwrap_model(self.task.trainable_module):
            raise ValueError("bind() takes a wrapper of the trainable module")
        self.task.trainable_module = wrapped

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        result = self.task(images, targets)
        kd = result.get("kd_loss", result.get("distill_loss"))
        self.last = {"task_loss": result["task_loss"].detach(), "kd_loss": kd.detach()}
        return result["loss"]

    def clip_parameters(self, exclude_head: bool = False) -> list[torch.Tensor]:
        """What --clip-grad clips: every trained parameter, the projection's included (AGC
        leaves the student's classifier alone, as timm's tasks do)."""
        return list(self.task.get_clip_parameters(exclude_head=exclude_head))

    @property
    def weights(self) -> tuple[float, float]:
        """(task weight, distillation weight) as timm resolved them."""
        return float(self.task.task_loss_weight), float(self.task.distill_loss_weight)

    # --------------------------------------------------------------------------- state
    @property
    def holds_state(self) -> bool:
        """Whether a checkpoint must carry `state_dict` (feature distillation's projection,
        trained when the student's and the teacher's feature widths differ)."""
        return getattr(self.trained, "projection", None) is not None

    def state_dict(self) -> dict:
        """timm's ``task_state``: the feature projection, if there is one (else empty)."""
        return self.task.get_task_state()

    def load_state_dict(self, state: dict | None) -> None:
        if self.holds_state and not (state and "projection" in state):
            raise UserError("the checkpoint holds no feature-distillation projection "
                                "(task_state): it was not trained with this --kd-distill-type "
                                "and these feature widths")
        self.task.load_task_state(state or None, strict=True)

    # --------------------------------------------------------------------------- the cost
    def cost_line(self, input_size) -> str:
        """What the teacher adds to each training step, said at start: its size, and its
        forward against the student's forward and backward (about 3 forwards), per image."""
        shape = (1, *tuple(input_size)[-3:])
        teacher_flops = _forward_flops(self.teacher, shape, self.task.device, self.task.dtype,
                                       f"--kd-model-name {self.teacher_name}")
        student_flops = _forward_flops(self.student, shape, self.task.device, self.task.dtype,
                                       "the student")
        params = sum(p.numel() for p in self.teacher.parameters())
        share = teacher_flops / max(3 * student_flops, 1)
        task_w, kd_w = self.weights
        return (f"distillation ({self.kind}): teacher {self.teacher_name} from {self.source}, "
                f"{params / 1e6:.3g}M parameters, frozen and not averaged; "
                f"{teacher_flops / 1e9:.3g} GFLOPs per image, about {100 * share:.0f}% on top of "
                f"the student's training step; loss = {task_w:g} x task + {kd_w:g} x distillation")


def _forward_flops(module: nn.Module, shape, device, dtype, who: str) -> int:
    """FLOPs of one forward of a single image (timm's FLOP counter of torch); the input a
    model cannot take is said in one line."""
    was_training = module.training
    nn.Module.train(module, False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(torch.zeros(shape, device=device, dtype=dtype))
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise UserError(f"{who} cannot take the training input {tuple(shape[1:])}: "
                        f"{str(exc).strip()[:120]}") from None
    finally:
        nn.Module.train(module, was_training)
    return counter.get_total_flops()
