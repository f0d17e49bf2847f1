"""train.py: train a timm model on an ImageFolder data set, validating raw and EMA weights."""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.data import Mixup
from timm.layers import convert_sync_batchnorm
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from . import checkpoint as ckpt_io
from . import data, distributed, outputs
from .cli import log, run_main, seed_everything
from .config import parse_train_args
from .ema import ModelEma, half_life_from_decay, parse_half_life, unwrap_model
from .engine import (Interrupted, NonFiniteLoss, StepConfig, TrainState, train_one_epoch,
                     validate)
from .errors import RunFailure, UserError
from .models import architecture_kwargs, create_model, init_head, set_batchnorm
from .signals import StopRequest

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


@dataclass
class Best:
    """Best epoch so far of one weight set by the eval metric."""
    metric: float | None = None
    epoch: int | None = None

    def improves(self, value: float, lower_is_better: bool) -> bool:
        if self.metric is None:
            return True
        return value < self.metric if lower_is_better else value > self.metric


@dataclass
class History:
    """Best epochs kept as checkpoint-<epoch>.pth.tar (timm's --checkpoint-hist)."""
    entries: list = field(default_factory=list)  # [metric, epoch] pairs, best first


# ----------------------------------------------------------------------------- set-up pieces
def build_datasets(args):
    train_dir = data.resolve_split_dir(args.data_dir, args.train_split)
    val_dir = data.resolve_split_dir(args.data_dir, args.val_split)
    train_set = data.load_image_folder(train_dir)
    val_set = data.load_image_folder(val_dir)
    data.check_same_classes(train_set, val_set, val_dir)
    return train_set, val_set


def resolve_num_classes(args, train_set) -> int:
    found = len(train_set.classes)
    if args.num_classes is not None and args.num_classes != found:
        raise UserError(f"--num-classes {args.num_classes} disagrees with the data: "
                        f"{found} class folders in {args.train_split}")
    return found


def resolve_lr(args, world_size: int = 1) -> float:
    """--lr (the global rate), or --lr-base scaled by the global batch as timm does.

    The global batch is world size x batch size x accumulation; adaptive optimizers scale with its
    square root, the others linearly.
    """
    if args.lr is not None:
        return args.lr
    ratio = args.batch_size * world_size * args.grad_accum_steps / args.lr_base_size
    scale = args.lr_base_scale
    if not scale:  # timm's default: square-root scaling for adaptive optimizers
        scale = "sqrt" if any(name in args.opt.lower() for name in ("ada", "lamb")) else "linear"
    if scale == "sqrt":
        ratio = math.sqrt(ratio)
    return args.lr_base * ratio


def build_optimizer(args, model, lr):
    kwargs = dict(args.opt_kwargs)
    if args.opt_eps is not None:
        kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        kwargs["betas"] = tuple(args.opt_betas)
    try:
        return create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                   momentum=args.momentum, layer_decay=args.layer_decay, **kwargs)
    except (AssertionError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot create optimizer '{args.opt}': {str(exc)[:160]}") from None


def build_scheduler(args, optimizer, updates_per_epoch):
    try:
        return create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
            warmup_epochs=args.warmup_epochs, cooldown_epochs=args.cooldown_epochs,
            decay_milestones=args.decay_milestones, patience_epochs=args.patience_epochs,
            warmup_prefix=args.warmup_prefix, noise=_noise_epochs(args.lr_noise),
            noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
            cycle_mul=args.lr_cycle_mul, cycle_decay=args.lr_cycle_decay,
            cycle_limit=args.lr_cycle_limit, k_decay=args.lr_k_decay,
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch,
            plateau_mode="min" if args.eval_metric == "loss" else "max")
    except (AssertionError, ValueError, KeyError) as exc:
        raise UserError(f"cannot create scheduler '{args.sched}': {str(exc)[:160]}") from None


def _noise_epochs(noise):
    """--lr-noise as timm's factory takes it: one value, or an [on, off] pair."""
    if noise is None:
        return None
    return noise[0] if len(noise) == 1 else list(noise)


def resolve_ema_decays(args, steps_per_epoch: int, world_size: int = 1) -> list[float]:
    """Per-optimizer-step decays from --model-ema-decay or --model-ema-half-life.

    A half-life in images or epochs is converted with the real images per optimizer step
    (batch x world size x accumulation), so it survives a change of batch size or GPU count.
    """
    if args.model_ema_half_life:
        images_per_step = args.batch_size * args.grad_accum_steps * world_size
        decays = []
        for text in args.model_ema_half_life:
            steps = parse_half_life(text).in_updates(images_per_step, steps_per_epoch)
            decays.append(0.5 ** (1.0 / steps))
        return decays
    return list(args.model_ema_decay or [0.9998])


def log_ema_horizons(decays, every, steps_per_epoch, total_steps, images_per_step) -> None:
    for d in decays:
        steps = half_life_from_decay(d)
        log.info(f"EMA decay {d:.6g}: half-life {steps:.4g} optimizer steps = "
                 f"{steps / steps_per_epoch:.3g} epochs = {steps * images_per_step:.4g} images"
                 + (f" (updated every {every} steps with decay^{every})" if every > 1 else ""))
        if steps > total_steps:
            log.warning(f"warning: EMA {d:.6g} has a half-life ({steps:.4g} steps) longer than the "
                        f"whole run ({total_steps} steps): it will still mostly hold the early weights")
        elif steps < 0.1 * steps_per_epoch:
            log.warning(f"warning: EMA {d:.6g} has a half-life ({steps:.4g} steps) under a tenth "
                        f"of an epoch: it averages almost nothing")


def _low_precision(flag: str, name: str, device) -> torch.dtype:
    """The dtype a --amp-dtype/--model-dtype name stands for; float16 kernels need CUDA."""
    dtype = _DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise UserError(f"{flag} float16 needs CUDA; on the CPU use {flag} bfloat16")
    return dtype


def build_amp(args, device):
    """Autocast dtype (None when off) and a grad scaler for float16 on CUDA."""
    if not args.amp:
        return None, None
    dtype = _low_precision("--amp-dtype", args.amp_dtype, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return dtype, scaler


def build_model_dtype(args, device) -> torch.dtype | None:
    """--model-dtype: the dtype the model's weights are kept in (None: as created, float32)."""
    if args.model_dtype in (None, "float32"):
        return None
    return _low_precision("--model-dtype", args.model_dtype, device)


def build_mixup(args, num_classes):
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    if args.batch_size % 2:
        raise UserError(f"mixup/cutmix need an even --batch-size, got {args.batch_size}")
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


def build_train_loss(args, mixing: bool) -> nn.Module:
    """timm's choice: soft-target losses under mixup/cutmix (which smooth the labels already)."""
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0 if mixing else args.smoothing,
                                  target_threshold=args.bce_target_thresh)
    if mixing:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=args.smoothing)


def build_ema(args, model, device, decays) -> ModelEma | None:
    if not args.model_ema:
        return None
    ema_device = torch.device("cpu") if args.model_ema_force_cpu else device
    dtype = _DTYPES[args.model_ema_dtype] if args.model_ema_dtype else None
    if dtype is not None and dtype != torch.float64:
        eps = torch.finfo(dtype).eps
        for d in decays:
            if 1.0 - d < eps:
                log.warning(f"warning: with --model-ema-dtype {args.model_ema_dtype} an update of "
                            f"(1 - {d:g}) = {1 - d:.2g} is below the dtype's precision "
                            f"({eps:.2g}): the shadow will barely move")
    return ModelEma(model, decays, device=ema_device, dtype=dtype, every=args.model_ema_every,
                    warmup=args.model_ema_warmup, warmup_power=args.model_ema_warmup_power)


# ----------------------------------------------------------------------------- the run
class Trainer:
    """Holds the pieces of one run; each method does one step of the epoch loop."""

    def __init__(self, args):
        self.args = args
        self.dist, self.device = distributed.init_distributed(args.device, args.dist_backend)
        if not self.dist.is_primary:
            log.setLevel(logging.WARNING)
        seed_everything(args.seed)
        train_set, val_set = build_datasets(args)
        self.class_names = train_set.classes
        self.num_classes = resolve_num_classes(args, train_set)
        regularisation = {"drop_rate": args.drop, "drop_path_rate": args.drop_path,
                          "drop_block_rate": args.drop_block}
        self.model = create_model(args.model, self.num_classes, pretrained=args.pretrained,
                                  pretrained_path=args.pretrained_path,
                                  **{**regularisation, **architecture_kwargs(vars(args))})
        set_batchnorm(self.model, args.bn_momentum, args.bn_eps)
        if args.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if args.initial_checkpoint:
            state = ckpt_io.load_file(args.initial_checkpoint)
            weights = ckpt_io.select_weights(state, args.initial_checkpoint)
            ckpt_io.load_weights_into(self.model, weights, args.initial_checkpoint,
                                      arch=state.get("arch"), model_name=args.model)
        init_head(self.model, args.head_init_scale, args.head_init_bias)
        if args.sync_bn and self.dist.enabled:
            # timm's converter keeps the activation of its fused BatchNormAct2d layers.
            self.model = convert_sync_batchnorm(self.model)
        self.model_dtype = build_model_dtype(args, self.device)
        self.model.to(self.device, dtype=self.model_dtype)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.amp_dtype, self.scaler = build_amp(args, self.device)
        self.data_config = data.data_config_for(args, self.model)
        try:
            train_set.transform = data.train_transform(self.data_config, args)
        except (AssertionError, KeyError, ValueError) as exc:
            raise UserError(f"cannot build the training augmentation (--aa {args.aa}, --scale, "
                            f"--ratio, --color-jitter): {type(exc).__name__} {exc}".rstrip()) from None
        val_set.transform = data.eval_transform(self.data_config)
        self.train_set = data.SeededSamples(train_set, args.seed)
        self.val_set = val_set
        world, rank = self.dist.world_size, self.dist.rank
        self.sampler = data.EpochSampler(len(train_set), args.seed, rank=rank, num_replicas=world,
                                         pad=True, repeats=max(1, int(args.aug_repeats)))
        self.val_sampler = data.EpochSampler(
            len(val_set), 0, shuffle=False, rank=rank, num_replicas=world,
            block=args.validation_batch_size or args.batch_size)
        per_rank = len(self.sampler)
        self.drop_last = per_rank >= args.batch_size
        batches = (per_rank // args.batch_size if self.drop_last
                   else math.ceil(per_rank / args.batch_size))
        self.steps_per_epoch = math.ceil(batches / args.grad_accum_steps)  # optimizer steps
        self.lr = resolve_lr(args, world)
        self.optimizer = build_optimizer(args, self.model, self.lr)
        self.scheduler, self.num_epochs = build_scheduler(args, self.optimizer, self.steps_per_epoch)
        self.mixup_fn = build_mixup(args, self.num_classes)
        self.loss_fn = build_train_loss(args, mixing=self.mixup_fn is not None)
        decays = resolve_ema_decays(args, self.steps_per_epoch, world)
        labels = [f"{d:g}" for d in decays]
        if args.model_ema and len(set(labels)) < len(labels):
            raise UserError(f"EMA decays must differ in their first 6 digits: {', '.join(labels)}")
        # Every rank keeps its own shadow of the unwrapped module; DDP keeps the parameters in
        # step, so the shadows agree (checked every epoch).
        self.ema = build_ema(args, self.model, self.device, decays)
        self.decays = self.ema.decays if self.ema is not None else []
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if args.torchcompile:
            # Compiled after the EMA and optimizer are built: both work on the plain module.
            self.model = torch.compile(self.model, backend=args.torchcompile)
            log.info(f"model compiled with torch.compile backend '{args.torchcompile}'")
        self.state = TrainState()
        self.best = [Best() for _ in range(1 + len(self.decays))]
        self.history = History()
        self.rows: list[dict] = []
        self.run_dir: Path | None = None

    # --------------------------------------------------------------- resume
    def resume(self, path: str) -> None:
        """Restore everything a checkpoint holds; a mid-epoch checkpoint resumes at its step."""
        ckpt = ckpt_io.load_file(path)
        if "state_dict" not in ckpt or "epoch" not in ckpt:
            raise UserError(f"cannot resume from {path}: not a training checkpoint")
        if ckpt.get("arch") not in (None, self.args.model):
            raise UserError(f"cannot resume from {path}: it is a '{ckpt['arch']}' checkpoint, "
                            f"this run trains '{self.args.model}'")
        ckpt_io.load_weights_into(unwrap_model(self.model), ckpt_io.select_weights(ckpt, path), path)
        if self.ema is not None:
            if "ema" not in ckpt:
                raise UserError(f"cannot resume from {path}: it holds no EMA state but --model-ema is on")
            saved = [float(d) for d in ckpt["ema"].get("decays", [])]
            if len(saved) != len(self.decays) or any(abs(a - b) > 1e-12 for a, b in zip(saved, self.decays)):
                raise UserError(f"cannot resume the EMA from {path}: it averages decays "
                                f"{', '.join(f'{d:g}' for d in saved)}, this run asks for "
                                f"{', '.join(f'{d:g}' for d in self.decays)}")
            shadows = [ckpt[k] for k in ckpt["ema"]["keys"]]
            try:
                self.ema.load_state_dict({**ckpt["ema"], "shadows": shadows})
            except (ValueError, RuntimeError, KeyError) as exc:
                raise UserError(f"cannot resume the EMA from {path}: {str(exc)[:160]}") from None
        if not self.args.no_resume_opt:
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as exc:
                raise UserError(f"cannot resume the optimizer from {path}: {str(exc)[:160]} "
                                f"(--no-resume-opt starts a fresh one)") from None
            if "scheduler" in ckpt and self.scheduler is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
        extra = ckpt.get("resume_state", {})
        if self.scaler is not None and "amp_scaler" in extra:
            self.scaler.load_state_dict(extra["amp_scaler"])
        self.state.num_updates = int(ckpt.get("num_updates", 0))
        if extra.get("epoch_step"):
            self.state.epoch = int(extra["epoch"])
            self.state.epoch_step = int(extra["epoch_step"])
            self.state.loss_sum = float(extra["loss_sum"])
            self.state.loss_count = int(extra["loss_count"])
        else:
            self.state.epoch = int(ckpt["epoch"]) + 1
        self.state.skipped_nonfinite = int(extra.get("skipped_nonfinite", 0))
        if extra.get("best"):
            self.best = [Best(b.get("metric"), b.get("epoch")) for b in extra["best"]]
        self.history.entries = [list(e) for e in extra.get("history", [])]
        self.rows = [dict(r) for r in extra.get("rows", [])]
        # As timm does: put the schedule where the run left it (this matters with
        # --no-resume-opt, whose fresh scheduler would otherwise start at the warmup LR).
        if self.scheduler is not None:
            self.scheduler.step(self.state.epoch)
            if self.args.sched_on_updates:
                self.scheduler.step_update(self.state.num_updates)
        where = f"epoch {self.state.epoch}" + (f", step {self.state.epoch_step}"
                                               if self.state.epoch_step else "")
        log.info(f"resumed from {path} at {where}")

    # --------------------------------------------------------------- epoch pieces
    def make_loaders(self, epoch: int):
        # Seeding per epoch from (seed, epoch) makes each epoch's order and augmentation
        # independent of what ran before, which is what makes resume exact.
        seed_everything(self.args.seed + epoch)
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start=self.state.epoch_step * self.args.batch_size)
        pin = self.device.type == "cuda"
        train = data.make_loader(self.train_set, self.args.batch_size, self.args.workers,
                                 shuffle=False, seed=self.args.seed * 1000 + epoch,
                                 drop_last=self.drop_last, pin_memory=pin, sampler=self.sampler)
        val = data.make_loader(self.val_set, self.args.validation_batch_size or self.args.batch_size,
                               self.args.workers, shuffle=False, seed=0, pin_memory=pin,
                               sampler=self.val_sampler)
        return train, val

    def metric_of(self, result: dict) -> float:
        return result[self.args.eval_metric]

    def checkpoint(self, metric: float | None, complete: bool) -> dict:
        """The run's state; `complete` False marks a checkpoint taken in the middle of an epoch."""
        epoch = self.state.epoch if complete else self.state.epoch - 1
        # The summary rows travel with the checkpoint: a kill between writing the checkpoint and
        # summary.csv then loses no row.
        resume_state = {"best": [vars(b) for b in self.best], "history": self.history.entries,
                        "skipped_nonfinite": self.state.skipped_nonfinite,
                        "rows": [dict(r) for r in self.rows]}
        if not complete:
            resume_state.update(epoch=self.state.epoch, epoch_step=self.state.epoch_step,
                                loss_sum=self.state.loss_sum, loss_count=self.state.loss_count)
        if self.scaler is not None:
            resume_state["amp_scaler"] = self.scaler.state_dict()
        return ckpt_io.build_checkpoint(
            epoch=epoch, arch=self.args.model, model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, ema=self.ema, args=dict(vars(self.args)), metric=metric,
            num_updates=self.state.num_updates, data_config=self.data_config,
            num_classes=self.num_classes, class_names=self.class_names,
            extra={"resume_state": resume_state})

    def save(self, name: str, ckpt: dict) -> Path:
        path = self.run_dir / name
        if not self.dist.is_primary:
            return path
        try:
            ckpt_io.save_checkpoint(path, ckpt)
        except OSError as exc:
            raise RunFailure(f"cannot write {path}: {exc.strerror or exc}; the previous "
                             f"checkpoint is intact") from None
        return path

    def save_epoch(self, epoch: int, results: list[dict]) -> list[str]:
        """last.pth.tar, then copies for the best files that improved; returns their names."""
        lower = self.args.eval_metric == "loss"
        improved = [self.best[i].improves(self.metric_of(r), lower) for i, r in enumerate(results)]
        for i, r in enumerate(results):
            if improved[i]:
                self.best[i] = Best(self.metric_of(r), epoch)
        self._update_history(epoch, self.metric_of(results[0]), lower)
        if not self.dist.is_primary:
            return []
        last = self.save("last.pth.tar", self.checkpoint(self.metric_of(results[0]), complete=True))
        written = ["last.pth.tar"]
        copies = []
        if improved[0]:
            copies.append("model_best.pth.tar")
        if len(results) > 1 and improved[1]:
            copies.append("model_best_ema.pth.tar")
        if any(e == epoch for _, e in self.history.entries):
            copies.append(f"checkpoint-{epoch}.pth.tar")
        for name in copies:
            try:
                ckpt_io.atomic_copy(last, self.run_dir / name)
            except OSError as exc:
                raise RunFailure(f"cannot write {self.run_dir / name}: {exc.strerror or exc}") from None
        self._prune_history()
        # An epoch-end checkpoint supersedes any mid-epoch recovery file.
        (self.run_dir / "recovery.pth.tar").unlink(missing_ok=True)
        return written + copies

    def _update_history(self, epoch: int, metric: float, lower: bool) -> None:
        entries = [e for e in self.history.entries if e[1] != epoch] + [[metric, epoch]]
        entries.sort(key=lambda e: e[0], reverse=not lower)
        self.history.entries = entries[: self.args.checkpoint_hist]

    def _prune_history(self) -> None:
        keep = {f"checkpoint-{e}.pth.tar" for _, e in self.history.entries}
        for path in self.run_dir.glob("checkpoint-*.pth.tar"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def epoch_line(self, epoch: int, train: dict, results: list[dict]) -> str:
        names = ["raw"] + [f"ema {d:g}" for d in self.decays]
        parts = [f"epoch {epoch}/{self.num_epochs - 1} lr {train['lr']:.3g} "
                 f"train_loss {train['loss']:.4f}"]
        for name, r in zip(names, results):
            parts.append(f"{name}: top1 {r['top1']:.2f} top5 {r['top5']:.2f} loss {r['loss']:.4f}")
        lower = self.args.eval_metric == "loss"
        best = min if lower else max
        winner = best(range(len(results)), key=lambda i: self.metric_of(results[i]))
        parts.append(f"best this epoch: {names[winner]}")
        if self.ema is not None and self.ema.skipped_nonfinite:
            parts.append(f"EMA updates skipped (NaN/Inf weights): {self.ema.skipped_nonfinite}")
        return " | ".join(parts)

    def save_recovery(self) -> None:
        """Every --recovery-interval optimizer steps: a mid-epoch checkpoint to resume from."""
        if self.dist.is_primary:
            self.save("recovery.pth.tar", self.checkpoint(None, complete=False))

    def resume_path(self) -> Path | None:
        """--resume PATH, or with 'auto' the newer of the run's last and recovery checkpoints."""
        if not self.args.resume:
            return None
        if self.args.resume != "auto":
            return Path(self.args.resume)
        if not self.args.experiment:
            raise UserError("--resume auto needs --experiment to find the run directory")
        run_dir = Path(self.args.output or "output") / "train" / self.args.experiment
        found = [p for p in (run_dir / "last.pth.tar", run_dir / "recovery.pth.tar") if p.is_file()]
        if not found:
            log.info(f"--resume auto: no checkpoint in {run_dir}, starting fresh")
            return None
        return max(found, key=lambda p: p.stat().st_mtime_ns)

    # --------------------------------------------------------------- main loop
    def fit(self) -> int:
        args = self.args
        resume_from = self.resume_path()
        if resume_from is not None:
            self.resume(str(resume_from))
        run_dir = None
        if self.dist.is_primary:
            own = resume_from.parent if resume_from is not None else None
            if own is not None and not args.experiment and (own / "args.yaml").is_file():
                # A resumed run continues in the folder of the checkpoint it resumes.
                run_dir = outputs.make_run_dir("", "", args.model, resuming=True, path=own)
            else:
                run_dir = outputs.make_run_dir(args.output, args.experiment, args.model,
                                               resuming=resume_from is not None
                                               or args.resume == "auto")
        self.run_dir = Path(distributed.broadcast_object(str(run_dir), self.dist))
        if resume_from is not None and not self.rows:
            self.rows = [r for r in outputs.read_summary(self.run_dir)
                         if int(r["epoch"]) < self.state.epoch]
        self.columns = outputs.summary_columns(self.decays)
        if self.dist.is_primary:
            outputs.write_args(self.run_dir, vars(args))
            if resume_from is not None and self.rows:
                # The checkpoint's rows are the record: a kill after the last epoch's checkpoint
                # but before its summary.csv line has no later epoch to repair the file.
                outputs.write_summary(self.run_dir, self.rows, self.columns)
                outputs.plot_curves(self.run_dir, self.rows, self.decays)
        where = (f"{self.dist.world_size} processes ({self.device.type}, "
                 f"{torch.distributed.get_backend()})" if self.dist.enabled else str(self.device))
        global_batch = args.batch_size * self.dist.world_size * args.grad_accum_steps
        log.info(f"training {args.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M "
                 f"params) on {where}: {len(self.train_set)} train / {len(self.val_set)} val "
                 f"images, {self.num_classes} classes, {self.num_epochs} epochs")
        log.info(f"lr {self.lr:.4g} for a global batch of {global_batch}"
                 + ("" if args.lr is not None else f" (--lr-base {args.lr_base:g} per "
                                                   f"{args.lr_base_size} images)"))
        log.info(f"output: {self.run_dir}")
        if self.ema is not None:
            log_ema_horizons(self.decays, self.ema.every, self.steps_per_epoch,
                             self.steps_per_epoch * self.num_epochs, global_batch)
        with StopRequest() as stop:
            for epoch in range(self.state.epoch, self.num_epochs):
                rc = self.run_epoch(epoch, stop)
                if rc is not None:
                    return rc
                if stop():
                    log.info(f"stopped after epoch {epoch}; resume with: --resume "
                             f"{self.run_dir / 'last.pth.tar'}")
                    return stop.exit_code
        self.report()
        return 0

    def run_epoch(self, epoch: int, stop: StopRequest) -> int | None:
        """Train and validate one epoch; returns an exit code when the run must end."""
        args = self.args
        if epoch != self.state.epoch or not self.state.epoch_step:
            self.state.epoch_step, self.state.loss_sum, self.state.loss_count = 0, 0.0, 0
        self.state.epoch = epoch
        train_loader, val_loader = self.make_loaders(epoch)
        if self.mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            self.mixup_fn.mixup_enabled = False
        cfg = StepConfig(loss_fn=self.loss_fn, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                         accum_steps=args.grad_accum_steps, amp_dtype=self.amp_dtype,
                         input_dtype=self.model_dtype,
                         scaler=self.scaler, channels_last=args.channels_last,
                         mixup_fn=self.mixup_fn, log_interval=args.log_interval,
                         skip_nonfinite=args.skip_nonfinite, seed=args.seed,
                         rank=self.dist.rank, recovery_interval=args.recovery_interval,
                         stop_every=args.log_interval if self.dist.enabled else 1)
        try:
            train = train_one_epoch(
                self.model, train_loader, self.optimizer, self.scheduler, self.state, self.device,
                cfg, ema=self.ema, epochs=self.num_epochs - 1, should_stop=stop,
                save_recovery=self.save_recovery, any_rank=self.any_rank,
                show=self.dist.is_primary, log=log.info)
        except Interrupted:
            path = self.run_dir / "last.pth.tar"
            if self.dist.is_primary:  # other ranks would build the whole checkpoint for nothing
                self.save("last.pth.tar", self.checkpoint(None, complete=False))
            distributed.barrier(self.dist)
            if self.dist.is_primary:
                print(f"train.py: stopped at epoch {epoch}, step {self.state.epoch_step}; saved "
                      f"{path}. Resume with: python train.py ... --resume {path}", file=sys.stderr)
            return stop.exit_code or 130
        except NonFiniteLoss as exc:
            if self.dist.is_primary:
                print(f"train.py: error: {exc}; stopped. The last good checkpoint is "
                      f"{self.run_dir / 'last.pth.tar'} (--skip-nonfinite N tolerates N bad "
                      f"steps)", file=sys.stderr)
            return 1
        self.sync_replicas()
        results = validate(self.model, val_loader, self.device, ema=self.ema, epoch=epoch,
                           amp_dtype=self.amp_dtype, channels_last=args.channels_last,
                           reduce=lambda t: distributed.all_reduce_sum(t, self.dist),
                           show=self.dist.is_primary)
        if self.scheduler is not None:
            self.scheduler.step(epoch + 1, self.metric_of(results[0]))
        self.rows.append(outputs.summary_row(epoch, train["lr"], train["loss"], results, self.decays))
        self.state.epoch_step = 0
        self.save_epoch(epoch, results)
        if self.dist.is_primary:
            outputs.write_summary(self.run_dir, self.rows, self.columns)
            outputs.plot_curves(self.run_dir, self.rows, self.decays)
            print(self.epoch_line(epoch, train, results), flush=True)
        distributed.barrier(self.dist)
        return None

    def any_rank(self, flag: bool) -> bool:
        return distributed.any_rank(flag, self.dist, self.device)

    def sync_replicas(self) -> None:
        """Under torchrun: make BatchNorm statistics agree, then check the EMA shadows agree."""
        if not self.dist.enabled:
            return
        shadows = self.ema.modules if self.ema is not None else []
        if not self.args.sync_bn:
            for module in [unwrap_model(self.model)] + shadows:
                distributed.distribute_bn(module, self.dist, self.args.dist_bn, self.device)
        if shadows:
            # Without any BatchNorm sync each rank's shadow keeps its own running statistics:
            # only the parameters can be compared then.
            buffers = bool(self.args.sync_bn or self.args.dist_bn)
            sums = distributed.check_replicas_agree(shadows, self.dist, self.device,
                                                    include_buffers=buffers)
            log.info("EMA checksums (equal on all ranks): " + ", ".join(f"{s:.10g}" for s in sums))

    def report(self) -> None:
        names = ["raw"] + [f"ema {d:g}" for d in self.decays]
        for name, best in zip(names, self.best):
            if best.epoch is not None:
                log.info(f"best {name}: {self.args.eval_metric} {best.metric:.4f} at epoch {best.epoch}")
        log.info(f"done: {self.run_dir}")


def _main(argv) -> int:
    args = parse_train_args(argv)
    try:
        return Trainer(args).fit()
    finally:
        distributed.shutdown()


def main(argv=None) -> int:
    return run_main("train.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
