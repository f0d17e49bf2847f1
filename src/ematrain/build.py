"""Building a run's parts from its settings: `build_run(settings) -> Run`.

Each builder takes the specs it needs (never the argparse Namespace) and returns one part; `Run`
holds them and names the stateful ones (`parts`), which the checkpoint schema saves and restores.
"""
from __future__ import annotations

import inspect
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.data import Mixup
from timm.layers import convert_sync_batchnorm
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.scheduler import create_scheduler_v2
from torch import nn

from . import data, distributed
from .ema import ModelEma
from .ema_horizons import RunLength
from .ema_policies import ShadowPolicy
from .ema_schedules import make_schedule
from .engine import Counters
from .errors import UserError
from .keeper import CheckpointKeeper
from .logs import log, quiet
from .start_weights import load_initial_checkpoint
from .models import create_model, init_head, probe_input, set_batchnorm, unwrap_model
from .outputs import Summary
from .seeding import seed_everything
from .settings import (
    DataSpec,
    EmaSpec,
    LabelSpec,
    LoaderSpec,
    ModelSpec,
    OptimSpec,
    PosthocSpec,
    Precision,
    ScheduleSpec,
    TrainSettings,
    dtype_named,
)
from .posthoc_tracker import PosthocTracker
from .weightsets import WeightSet, regular_emas, tracked_sets, weight_sets


@dataclass
class TrainData:
    """The two splits, their samplers, and the loaders of each epoch."""
    train_set: data.SeededSamples
    val_set: object
    sampler: data.EpochSampler
    val_sampler: data.EpochSampler
    data_config: dict
    batch_size: int
    val_batch_size: int
    workers: int
    pin_memory: bool
    drop_last: bool
    steps_per_epoch: int  # optimizer steps
    normalize: data.Normalize | None = None  # the loaders give uint8 images
    erase: object | None = None              # random erasing of the normalized batch
    warnings: list = field(default_factory=list)  # said when training starts
    _loaders: tuple | None = field(default=None, repr=False)

    @property
    def class_names(self) -> list[str]:
        return self.train_set.dataset.classes

    def loaders(self, epoch: int, start_batch: int, seed: int):
        """This epoch's loaders; training starts at batch `start_batch` (resume). They are made
        once and keep their worker processes from epoch to epoch."""
        # The epoch's order and augmentation depend only on (seed, epoch): that makes resume exact.
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start=start_batch * self.batch_size)
        if self._loaders is None:
            train = data.make_loader(self.train_set, self.batch_size, self.workers, seed=seed,
                                     drop_last=self.drop_last, pin_memory=self.pin_memory,
                                     sampler=data.EpochTagged(self.sampler), persistent=True)
            val = data.make_loader(self.val_set, self.val_batch_size, self.workers, seed=0,
                                   pin_memory=self.pin_memory, sampler=self.val_sampler,
                                   persistent=True)
            self._loaders = (train, val)
        return self._loaders

    def close(self) -> None:
        """End the loaders' worker processes."""
        for loader in self._loaders or ():
            data.end_workers(loader)
        self._loaders = None


@dataclass
class Run:
    """One training run's parts, built once from its settings."""
    settings: TrainSettings
    dist: distributed.DistInfo
    device: torch.device
    precision: Precision
    data: TrainData
    num_classes: int
    model: nn.Module          # what trains: possibly wrapped in DDP and torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    num_epochs: int
    lr: float
    scaler: torch.amp.GradScaler | None
    ema: ModelEma | None
    posthoc: PosthocTracker | None
    loss_fn: nn.Module
    mixup_fn: Mixup | None
    weight_sets: tuple[WeightSet, ...]
    keeper: CheckpointKeeper
    shadow_policy: ShadowPolicy = field(default_factory=ShadowPolicy)
    counters: Counters = field(default_factory=Counters)
    summary: Summary = None
    # Who the run is: drawn at a fresh start, kept by every resume, in every checkpoint and
    # post-hoc snapshot (None: resumed from a checkpoint written before run ids).
    run_id: str | None = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self):
        if self.summary is None:
            self.summary = Summary(self.weight_sets)
        self.counters.world_size = self.dist.world_size

    @property
    def module(self) -> nn.Module:
        """The plain model inside any DDP / torch.compile wrapper."""
        return unwrap_model(self.model)

    @property
    def decays(self) -> list[float]:
        return self.ema.decays if self.ema is not None else []

    def validated_emas(self) -> list[ModelEma]:
        """The EMAs validation scores after the raw weights, in `weight_sets` order: the regular
        shadows, then the power EMAs tracked for post-hoc EMA."""
        emas = [self.ema, self.posthoc.ema if self.posthoc is not None else None]
        return [e for e in emas if e is not None]

    def parts(self) -> dict:
        """The stateful parts, by the name the checkpoint schema files them under."""
        parts = {"model": self.module, "optimizer": self.optimizer, "scheduler": self.scheduler,
                 "amp_scaler": self.scaler, "ema": self.ema, "posthoc_ema": self.posthoc,
                 "counters": self.counters,
                 "keeper": self.keeper, "summary": self.summary}
        return {name: part for name, part in parts.items() if part is not None}

    def replica_modules(self) -> list[nn.Module]:
        """The model and every shadow (EMA, then power EMA): what each torchrun process holds
        its own copy of."""
        modules = [self.module]
        for ema in (self.ema, self.posthoc.ema if self.posthoc is not None else None):
            if ema is not None:
                ema.wait()
                modules += ema.shadows
        return modules

    def record(self) -> dict:
        """The run's settings as a plain dict (args.yaml, a checkpoint's `args`)."""
        record = dict(vars(self.settings.args))
        # Absolute, so `-c args.yaml` and `--resume PATH` work from any directory.
        for key in ("data_dir", "initial_checkpoint", "pretrained_path"):
            if record.get(key):
                record[key] = str(Path(record[key]).resolve())
        return record

    def images_per_step(self) -> int:
        return self.settings.global_batch(self.dist.world_size)

    def length(self) -> RunLength:
        """The run's length, in the units EMA horizons are stated in."""
        steps = self.data.steps_per_epoch
        return RunLength(steps, steps * self.num_epochs, self.images_per_step())

    def ema_labels(self) -> list[str]:
        return ema_labels(self.settings.ema, self.decays)

    def ema_names(self) -> list[str]:
        """Each EMA's name as logs and summary.csv give it (``0.99``, ``hl2ep``, ``sr0.1``)."""
        return [s.name.removeprefix("ema ") for s in regular_emas(self.weight_sets)]

    def take_snapshot(self) -> None:
        """The post-hoc snapshot of this optimizer step, when it is one of the series'."""
        if self.posthoc is not None:
            self.posthoc.take(self.counters.num_updates, self.posthoc_meta, self.keeper)

    def posthoc_meta(self) -> dict:
        """What a post-hoc snapshot records of the run (`snapshots.META_KEYS`)."""
        scored = self.posthoc.ema.scored_dtype(self.model)
        return {"arch": self.settings.model.model, "args": self.record(),
                "num_classes": self.num_classes, "class_names": list(self.data.class_names),
                "data_config": dict(self.data.data_config),
                "eval_dtype": str(scored).removeprefix("torch."),
                "steps_per_epoch": self.data.steps_per_epoch,
                "images_per_step": self.images_per_step(), "every": self.posthoc.ema.every,
                "run_id": self.run_id}


# ----------------------------------------------------------------------------- builders
def build_data(spec: DataSpec, loader: LoaderSpec, num_classes: int | None, seed: int,
               dist: distributed.DistInfo, accum_steps: int, pin_memory: bool):
    """The training and validation ImageFolders with their samplers (transforms come later)."""
    train_dir = data.resolve_split_dir(spec.data_dir, spec.train_split)
    val_dir = data.resolve_split_dir(spec.data_dir, spec.val_split)
    train_set = data.load_image_folder(train_dir)
    val_set = data.load_image_folder(val_dir)
    data.check_same_classes(train_set, val_set, val_dir)
    found = len(train_set.classes)
    if num_classes is not None and num_classes != found:
        raise UserError(f"--num-classes {num_classes} disagrees with the data: "
                        f"{found} class folders in {spec.train_split}")
    world, rank = dist.world_size, dist.rank
    val_batch = spec.validation_batch_size or loader.batch_size
    sampler = data.EpochSampler(len(train_set), seed, rank=rank, num_replicas=world, pad=True,
                                repeats=max(1, int(spec.aug_repeats)))
    val_sampler = data.EpochSampler(len(val_set), 0, shuffle=False, rank=rank,
                                    num_replicas=world, block=val_batch)
    per_rank = len(sampler)
    drop_last = per_rank >= loader.batch_size
    batches = per_rank // loader.batch_size if drop_last else math.ceil(per_rank / loader.batch_size)
    warnings = [loader.too_many_workers(dist.local_processes)]
    if not drop_last:
        warnings.append(f"warning: -b {loader.batch_size} is larger than the training set "
                        f"({per_rank} images{' per process' if world > 1 else ''}): every epoch "
                        f"is one step of {per_rank} images")
    return TrainData(data.SeededSamples(train_set, seed), val_set, sampler, val_sampler, {},
                     loader.batch_size, val_batch, loader.workers_per_process(dist.local_processes),
                     pin_memory, drop_last, math.ceil(batches / accum_steps),
                     warnings=[w for w in warnings if w])


def build_model(spec: ModelSpec, num_classes: int, device: torch.device,
                precision: Precision, sync_bn: bool, start_weights: bool = True) -> nn.Module:
    """The timm model, its initial weights (unless `start_weights` is False: a resumed run
    takes its weights from the checkpoint), on its device in its dtype."""
    model = create_model(spec.model, num_classes, pretrained=spec.pretrained and start_weights,
                         pretrained_path=spec.pretrained_path if start_weights else None,
                         **spec.create_kwargs())
    set_batchnorm(model, spec.bn_momentum, spec.bn_eps)
    if spec.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if spec.initial_checkpoint and start_weights:
        log.info(load_initial_checkpoint(model, spec.initial_checkpoint, spec.model))
    init_head(model, spec.head_init_scale, spec.head_init_bias)
    if sync_bn:
        # timm's converter keeps the activation of its fused BatchNormAct2d layers.
        model = convert_sync_batchnorm(model)
    model.to(device, dtype=precision.model_dtype)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


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
                                        **kwargs)
    except (AssertionError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        # RuntimeError: torch's own refusals (fused=True foreach=True).
        raise UserError(f"cannot create optimizer '{spec.opt}': {str(exc)[:160]}") from None
    _check_kwarg_types(spec.opt, type(optimizer), spec.opt_kwargs)
    _keep_implementation(optimizer)
    return optimizer


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


def check_first_batch(s: TrainSettings, model: nn.Module, train: TrainData,
                      dist: distributed.DistInfo) -> None:
    """What the first training step would fail on, said before the run starts: an input the
    model cannot take (`probe_input`), a BatchNorm layer left one value per channel by the
    smallest batch, an odd batch under mixup/cutmix."""
    per_image = probe_input(model, s.model.model, train.data_config["input_size"],
                            s.precision.channels_last)
    smallest = min(train.batch_size, len(train.sampler))
    short = ("" if smallest == train.batch_size else
             f" (the training split gives {smallest} image(s){' per process' if dist.enabled else ''}"
             f", fewer than -b {train.batch_size})")
    if per_image is not None and smallest * per_image < 2:
        raise UserError(f"a training batch of {smallest}{short}: {s.model.model}'s BatchNorm "
                        f"layers would see one value per channel (their last inputs are 1x1 "
                        f"per image at this size); give -b 2 or more")
    if s.labels.mixing and smallest % 2:
        raise UserError(f"mixup/cutmix need an even training batch, got {smallest}{short}")


def build_mixup(spec: LabelSpec, num_classes: int) -> Mixup | None:
    if not spec.mixing:
        return None
    return Mixup(mixup_alpha=spec.mixup, cutmix_alpha=spec.cutmix, cutmix_minmax=spec.cutmix_minmax,
                 prob=spec.mixup_prob, switch_prob=spec.mixup_switch_prob, mode=spec.mixup_mode,
                 label_smoothing=spec.smoothing, num_classes=num_classes)


def build_train_loss(spec: LabelSpec) -> nn.Module:
    """timm's choice: soft-target losses under mixup/cutmix (which smooth the labels already)."""
    if spec.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0 if spec.mixing else spec.smoothing,
                                  target_threshold=spec.bce_target_thresh)
    if spec.mixing:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=spec.smoothing)


def build_ema(spec: EmaSpec, model: nn.Module, device: torch.device,
              decays: list[float]) -> ModelEma | None:
    """The shadows. Every rank keeps its own shadow of the unwrapped module; DDP keeps the
    parameters in step, so the shadows agree (checked every epoch)."""
    if not spec.enabled:
        return None
    dtype = dtype_named(spec.dtype)
    if dtype is not None and dtype != torch.float64:
        eps = torch.finfo(dtype).eps
        for d in decays:
            if 1.0 - d < eps:
                log.warning(f"warning: with --model-ema-dtype {spec.dtype} an update of "
                            f"(1 - {d:g}) = {1 - d:.2g} is below the dtype's precision "
                            f"({eps:.2g}): the shadow will barely move")
    schedule = make_schedule(spec.schedule, decays, warmup_power=spec.warmup_power)
    return ModelEma(model, device=torch.device("cpu") if spec.force_cpu else device,
                    dtype=dtype, every=spec.every, schedule=schedule,
                    skip_nonfinite=spec.precheck)


def build_posthoc(spec: PosthocSpec, ema: EmaSpec, model: nn.Module, device: torch.device,
                  steps_per_epoch: int, images_per_step: int,
                  total_steps: int, fresh: bool = True) -> PosthocTracker | None:
    """The power-function EMAs of --model-ema-posthoc and their snapshot plan. They live where
    the regular shadows would (--model-ema-force-cpu, --model-ema-dtype) and average every
    --model-ema-every steps. A `fresh` run whose --model-ema-snapshot-every leaves one snapshot
    only is refused (the sweep needs two); a resumed one already has its series."""
    if not spec.enabled:
        return None
    every = spec.steps_between(steps_per_epoch, images_per_step, total_steps)
    if fresh and spec.interval is not None and 1 < total_steps <= every:
        raise UserError(f"--model-ema-snapshot-every {spec.snapshot_every} is no shorter than "
                        f"the run ({total_steps} optimizer steps): its series would hold one "
                        f"snapshot, and validate.py --posthoc needs two")
    power = ModelEma.power(model, spec.tracked, dtype=dtype_named(ema.dtype),
                           device=torch.device("cpu") if ema.force_cpu else device,
                           every=ema.every, skip_nonfinite=ema.precheck)
    return PosthocTracker(power, every, total_steps, spec.dtype)


def wrap_model(model: nn.Module, dist: distributed.DistInfo, device: torch.device,
               compile_backend: str | None) -> nn.Module:
    """DDP under torchrun, then torch.compile; the EMA and optimizer work on the plain module."""
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if compile_backend:
        model = torch.compile(model, backend=compile_backend)
        log.info(f"model compiled with torch.compile backend '{compile_backend}'")
    return model


def build_run(settings: TrainSettings, resuming: bool = False) -> Run:
    """Every part of a run, in the order their dependencies need (`resuming`: the weights will
    come from a checkpoint, so the start weights are not loaded)."""
    s = settings
    dist, device = distributed.init_distributed(s.dist.device, s.dist.dist_backend)
    if not dist.is_primary:
        quiet()  # only rank 0 says what the run does
    seed_everything(s.loop.seed)
    precision = s.precision.on(device)
    if s.dist.sync_bn and dist.enabled and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only); on the "
                        "CPU leave it out: --dist-bn reduce averages the statistics before "
                        "each evaluation")
    train = build_data(s.data, s.loader, s.model.num_classes, s.loop.seed, dist,
                       s.optim.grad_accum_steps, pin_memory=device.type == "cuda")
    num_classes = len(train.class_names)
    model = build_model(s.model, num_classes, device, precision, s.dist.sync_bn and dist.enabled,
                        start_weights=not resuming)
    train.data_config = data.data_config_for(s.image.overrides(), model)
    check_first_batch(s, model, train, dist)
    train.train_set.dataset.transform = data.train_transform(train.data_config, s.aug)
    train.val_set.transform = data.eval_transform(train.data_config)
    train.normalize = data.Normalize(train.data_config["mean"], train.data_config["std"], device)
    train.erase = data.batch_eraser(s.aug, device)
    lr = s.lr(dist.world_size)
    optimizer = build_optimizer(s.optim, model, lr)
    scheduler, num_epochs = build_scheduler(s.schedule, optimizer, train.steps_per_epoch,
                                            s.loop.seed, s.loop.eval_metric)
    mixup = build_mixup(s.labels, num_classes)
    decays = (s.ema.decays_per_step(s.global_batch(dist.world_size), train.steps_per_epoch)
              if s.ema.enabled else [])
    ema = build_ema(s.ema, model, device, decays)
    policy = ShadowPolicy.for_run(s.ema.bn, s.ema.bn_batches, s.ema.switch,
                                  train.train_set.dataset, train.val_set.transform,
                                  train.batch_size, train.workers, s.loop.seed)
    posthoc = build_posthoc(s.posthoc, s.ema, model, device, train.steps_per_epoch,
                            s.global_batch(dist.world_size), train.steps_per_epoch * num_epochs,
                            fresh=not resuming)
    sets = weight_sets(decays, ema_labels(s.ema, decays),
                       tag="sr" if s.ema.enabled and s.ema.schedule == "power" else "",
                       names=ema_names(s.ema, decays), primary=s.loop.primary_weights)
    if posthoc is not None:
        sets += tracked_sets(posthoc.sigma_rels)
    return Run(settings=s, dist=dist, device=device, precision=precision, data=train,
               num_classes=num_classes, model=wrap_model(model, dist, device, s.model.torchcompile),
               optimizer=optimizer, scheduler=scheduler, num_epochs=num_epochs, lr=lr,
               scaler=torch.amp.GradScaler("cuda") if precision.grad_scaler else None, ema=ema,
               shadow_policy=policy,
               posthoc=posthoc,
               loss_fn=build_train_loss(s.labels), mixup_fn=mixup, weight_sets=sets,
               keeper=CheckpointKeeper(sets, s.loop.eval_metric, s.loop.checkpoint_hist,
                                       primary=dist.is_primary))


def ema_labels(spec: EmaSpec, decays: list[float]) -> list[str]:
    """How plots name each EMA: as the user gave it (a half-life), or by its decay."""
    if spec.schedule == "power":
        return [f"EMA sigma_rel {d:.3g}" for d in decays]
    if spec.half_lives:
        return [f"EMA half-life {h}" for h in spec.half_lives]
    return [f"EMA {d:g}" for d in decays]


def ema_names(spec: EmaSpec, decays: list[float]) -> list[str]:
    """How logs, summary.csv and validate.py name each EMA: as the user asked for it (a
    half-life ``hl2ep``, a sigma_rel ``sr0.1``), or by its decay (``0.99``)."""
    if spec.schedule == "power":
        return [f"sr{d:g}" for d in decays]
    if spec.half_lives:
        return [f"hl{''.join(str(h).split())}" for h in spec.half_lives]
    return [f"{d:g}" for d in decays]


def posthoc_plan_line(tracker: PosthocTracker, steps_per_epoch: int, folder) -> str:
    """The start-up line of post-hoc EMA: what is tracked, how many snapshots, their size."""
    count, size = tracker.plan()
    every = tracker.every_steps
    return (f"post-hoc EMA: power EMAs sigma_rel {' '.join(f'{s:g}' for s in tracker.sigma_rels)}"
            f", a snapshot every {every} optimizer steps ({every / steps_per_epoch:.3g} epochs) "
            f"and at the end: {count} snapshots of {size / 1e6:.3g} MB "
            f"({str(tracker.dtype).removeprefix('torch.')}) = {count * size / 1e6:.4g} MB in "
            f"{folder}")
