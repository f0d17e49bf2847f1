"""Building a run's parts from its settings: `build_run(settings) -> Run`.

Each builder takes the specs it needs (never the argparse Namespace) and returns one part; `Run`
holds them and names the stateful ones (`parts`), which the checkpoint schema saves and restores.
"""
from __future__ import annotations

import copy
import math

import torch
from timm.data import Mixup
from timm.layers import convert_sync_batchnorm
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from ..data import augmix, loaders
from ..data.folders import check_same_classes, load_image_folder, resolve_split_dir
from ..data.readers.spec import DatasetSpec
from ..data.samplers import EpochSampler, EpochTagged, SeededSamples
from ..data.sized_batches import SizedBatches, sized_samples
from ..data.transforms import (
    Normalize,
    batch_eraser,
    data_config_for,
    eval_transform,
    train_transform,
)
from ..ema.collection import EmaCollection
from ..ema.model_ema import ModelEma
from ..ema.policies import ShadowPolicy
from ..ema.schedules import make_schedule
from ..posthoc.schedule import SnapshotSchedule
from ..settings.checks import dtype_named
from ..settings.data_specs import AugSpec, DataSpec, LabelSpec, LoaderSpec
from ..settings.ema_specs import EmaSpec, PosthocSpec
from ..settings.model_specs import DistillSpec, ModelSpec, Precision
from ..settings.train_specs import TrainSettings
from ..util.distributed import DistInfo, init_distributed
from ..util.errors import UserError
from ..util.logs import log, quiet
from ..util.runtime import fast_norm
from ..util.seeding import seed_everything
from .datasets import build_stream_data, mapped_splits, reads_folders
from .distill import Distillation, build_teacher
from .keeper import CheckpointKeeper
from .model import create_model, init_head, probe_input, set_batchnorm
from .naflex_parts import use_naflex_batches
from .optimizer import build_optimizer, build_scheduler
from .parts import Run, TrainData, base_samples, images_per_step
from .start_weights import load_initial_checkpoint
from .tracking import build_trackers
from .weight_sets import ema_labels, ema_names, tracked_sets, weight_sets


# ----------------------------------------------------------------------------- builders
def build_data(spec: DataSpec, dataset: DatasetSpec, loader: LoaderSpec,
               num_classes: int | None, seed: int, dist: DistInfo, accum_steps: int,
               pin_memory: bool):
    """The training and validation splits with their samplers, or a stream's (transforms come
    later): ImageFolders as always, anything else through timm's readers (`datasets`)."""
    val_batch = spec.validation_batch_size or loader.batch_size
    workers = loader.workers_per_process(dist.local_processes)
    if dataset.streaming:
        return build_stream_data(dataset, num_classes, dist, workers, loader.batch_size,
                                 val_batch, seed, accum_steps, pin_memory,
                                 [loader.too_many_workers(dist.local_processes)])
    if reads_folders(dataset):
        train_dir = resolve_split_dir(spec.data_dir, spec.train_split)
        val_dir = resolve_split_dir(spec.data_dir, spec.val_split)
        train_set = load_image_folder(train_dir)
        val_set = load_image_folder(val_dir)
        check_same_classes(train_set, val_set, val_dir)
    else:
        train_set, val_set = mapped_splits(dataset, num_classes)
    found = len(train_set.classes)
    if num_classes is not None and num_classes != found:
        raise UserError(f"--num-classes {num_classes} disagrees with the data: "
                        f"{found} classes in {spec.train_split}")
    world, rank = dist.world_size, dist.rank
    sampler = EpochSampler(len(train_set), seed, rank=rank, num_replicas=world, pad=True,
                           repeats=max(1, int(spec.aug_repeats)))
    val_sampler = EpochSampler(len(val_set), 0, shuffle=False, rank=rank,
                               num_replicas=world, block=val_batch)
    per_rank = len(sampler)
    drop_last = per_rank >= loader.batch_size
    batches = per_rank // loader.batch_size if drop_last else math.ceil(per_rank / loader.batch_size)
    warnings = [loader.too_many_workers(dist.local_processes)]
    if not drop_last:
        warnings.append(f"warning: -b {loader.batch_size} is larger than the training set "
                        f"({per_rank} images{' per process' if world > 1 else ''}): every epoch "
                        f"is one step of {per_rank} images")
    return TrainData(SeededSamples(train_set, seed), val_set, sampler, val_sampler, {},
                     loader.batch_size, val_batch, workers, pin_memory, drop_last,
                     math.ceil(batches / accum_steps), warnings=[w for w in warnings if w])


def build_model(spec: ModelSpec, num_classes: int, device: torch.device,
                precision: Precision, sync_bn: bool, start_weights: bool = True,
                split_bn: int = 0) -> nn.Module:
    """The timm model, its initial weights (unless `start_weights` is False: a resumed run
    takes its weights from the checkpoint), on its device in its dtype (`split_bn`: that many
    BatchNorm splits, --split-bn)."""
    with fast_norm(spec.fast_norm):
        model = create_model(spec.model, num_classes, pretrained=spec.pretrained and start_weights,
                             pretrained_path=spec.pretrained_path if start_weights else None,
                             **spec.create_kwargs())
    set_batchnorm(model, spec.bn_momentum, spec.bn_eps)
    if spec.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if spec.initial_checkpoint and start_weights:
        log.info(load_initial_checkpoint(model, spec.initial_checkpoint, spec.model))
    init_head(model, spec.head_init_scale, spec.head_init_bias)
    if split_bn:
        model = augmix.split_batchnorm(model, split_bn)
    if sync_bn:
        # timm's converter keeps the activation of its fused BatchNormAct2d layers.
        model = convert_sync_batchnorm(model)
    model.to(device, dtype=precision.model_dtype)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def check_first_batch(s: TrainSettings, model: nn.Module, train: TrainData,
                      dist: DistInfo) -> None:
    """What the first training step would fail on, said before the run starts: an input the
    model cannot take (`probe_input`), a BatchNorm layer left one value per channel by the
    smallest batch, an odd batch under mixup/cutmix."""
    per_image = probe_input(model, s.model.model, train.data_config["input_size"],
                            s.precision.channels_last)
    smallest = min(train.batch_size, train.per_rank_samples)
    short = ("" if smallest == train.batch_size else
             f" (the training split gives {smallest} image(s){' per process' if dist.enabled else ''}"
             f", fewer than -b {train.batch_size})")
    if per_image is not None and smallest * per_image < 2:
        raise UserError(f"a training batch of {smallest}{short}: {s.model.model}'s BatchNorm "
                        f"layers would see one value per channel (their last inputs are 1x1 "
                        f"per image at this size); give -b 2 or more")
    if s.labels.mixing and smallest % 2 and not s.naflex.enabled:  # NaFlex pairs any batch
        raise UserError(f"mixup/cutmix need an even training batch, got {smallest}{short}")


def set_transforms(train: TrainData, aug: AugSpec, seed: int, device: torch.device) -> None:
    """The training and evaluation transforms, the batch normalization and random erasing; with
    --aug-splits, timm's AugMixDataset views (clean first) collated split-major."""
    transform = train_transform(train.data_config, aug, separate=bool(aug.aug_splits))
    if aug.aug_splits:  # map-style data only (a stream is refused with it)
        samples = augmix.split_samples(train.train_set.dataset, aug.aug_splits)
        train.train_set = SeededSamples(samples, seed)
        train.collate = augmix.collate_splits
    train.set_transforms(transform, eval_transform(train.data_config))
    train.normalize = Normalize(train.data_config["mean"], train.data_config["std"], device)
    if aug.resplit and aug.reprob and not aug.no_aug:
        train.erase = augmix.split_eraser(aug.reprob, aug.remode, aug.recount,
                                          max(aug.aug_splits, 2), device)
    else:
        train.erase = batch_eraser(aug, device)


def use_sized_batches(train: TrainData, s: TrainSettings, dist: DistInfo) -> float:
    """--train-img-sizes: timm's scheduled batches over this rank's epoch sampler, each sample
    (seeded as always) through its batch's size of the training transform. Returns the LR at
    timm's reference batch, the policy-average batch size."""
    seed = s.loop.seed
    choices = s.sizes.choices(s.loader.batch_size)
    transforms = [train_transform(dict(train.data_config, input_size=(3, size, size)), s.aug)
                  for size in choices.img_sizes]
    seeded = train.train_set
    seeded.dataset.transform = None
    train.train_set = sized_samples(seeded, transforms)
    train.batch_sampler = SizedBatches(train.sampler, choices, seed, s.schedule.epochs,
                                       EpochTagged(train.sampler))
    train.steps_per_epoch = math.ceil(train.batch_sampler.batches / s.optim.grad_accum_steps)
    return s.optim.lr_for(round(dist.world_size * train.batch_sampler.average_batch_size
                                * s.optim.grad_accum_steps))


def build_objective(s: TrainSettings, model: nn.Module, num_classes: int, train: TrainData,
                    device: torch.device, precision: Precision):
    """The training loss (timm's JSD loss with --jsd-loss), distillation around it
    (--kd-model-name), and the plain module the optimizer trains: the model, or distillation's
    `trained` (feature distillation's projection beside the student)."""
    loss_fn = (augmix.jsd_loss(s.aug.aug_splits, s.labels.smoothing) if s.aug.jsd_loss
               else build_train_loss(s.labels))
    distill = build_distill(s.distill, model, loss_fn, num_classes, train.data_config, device,
                            precision)
    return loss_fn, distill, (distill.trained if distill is not None else model)


def wrap_trained(s: TrainSettings, trained: nn.Module, distill: Distillation | None,
                 dist: DistInfo, device: torch.device) -> nn.Module:
    """The trained module as it runs (DDP, torch.compile); distillation runs it from now on."""
    wrapped = wrap_model(trained, dist, device, s.model.torchcompile, s.model.torchcompile_mode,
                         not s.dist.no_ddp_bb)
    if distill is not None:
        distill.bind(wrapped)
    return wrapped


def build_mixup(spec: LabelSpec, num_classes: int) -> Mixup | None:
    if not spec.mixing:
        return None
    return Mixup(mixup_alpha=spec.mixup, cutmix_alpha=spec.cutmix, cutmix_minmax=spec.cutmix_minmax,
                 prob=spec.mixup_prob, switch_prob=spec.mixup_switch_prob, mode=spec.mixup_mode,
                 label_smoothing=spec.smoothing, num_classes=num_classes)


def build_train_loss(spec: LabelSpec) -> nn.Module:
    """timm's choice: soft-target losses under mixup/cutmix (which smooth the labels already)."""
    if spec.bce_loss:
        pos_weight = None if spec.bce_pos_weight is None else torch.tensor(spec.bce_pos_weight)
        return BinaryCrossEntropy(smoothing=0.0 if spec.mixing else spec.smoothing,
                                  target_threshold=spec.bce_target_thresh,
                                  sum_classes=spec.bce_sum, pos_weight=pos_weight)
    if spec.mixing:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=spec.smoothing)


def build_ema(spec: EmaSpec, model: nn.Module, device: torch.device,
              decays: list[float]) -> ModelEma | None:
    """The regular shadows. Every rank keeps its own shadow of the unwrapped module; DDP keeps
    the parameters in step, so the shadows agree (checked every epoch)."""
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
                  steps_per_epoch: int, images_per_step: int, total_steps: int,
                  fresh: bool = True) -> tuple[ModelEma | None, SnapshotSchedule | None]:
    """The power-function EMAs of --model-ema-posthoc and their snapshot schedule. They live
    where the regular shadows would (--model-ema-force-cpu, --model-ema-dtype) and average every
    --model-ema-every steps. A `fresh` run whose --model-ema-snapshot-every leaves one snapshot
    only is refused (the sweep needs two); a resumed one already has its series."""
    if not spec.enabled:
        return None, None
    every = spec.steps_between(steps_per_epoch, images_per_step, total_steps)
    if fresh and spec.interval is not None and 1 < total_steps <= every:
        raise UserError(f"--model-ema-snapshot-every {spec.snapshot_every} is no shorter than "
                        f"the run ({total_steps} optimizer steps): its series would hold one "
                        f"snapshot, and validate.py --posthoc needs two")
    power = ModelEma.power(model, spec.tracked, dtype=dtype_named(ema.dtype),
                           device=torch.device("cpu") if ema.force_cpu else device,
                           every=ema.every, skip_nonfinite=ema.precheck)
    return power, SnapshotSchedule(power, every, total_steps, spec.dtype)


def build_shadow_policy(spec: EmaSpec, train: TrainData, seed: int) -> ShadowPolicy:
    """--model-ema-bn and --model-ema-switch. ``recalibrate`` draws training images under the
    evaluation transform, in an order fixed by (seed, epoch), from a loader of its own: the
    training data order is untouched, and every rank draws the same batches."""
    if spec.bn != "recalibrate":
        return ShadowPolicy(spec.bn, spec.bn_batches, spec.switch)
    calibration = copy.copy(base_samples(train.train_set))
    calibration.transform = train.val_set.transform

    def batches(epoch: int):
        sampler = EpochSampler(len(calibration), seed + 1)
        sampler.set_epoch(epoch)
        loader = loaders.make_loader(calibration, train.batch_size, train.workers, seed=seed,
                                     sampler=sampler)
        with loaders.batches(loader) as stream:
            for batch, (images, _) in enumerate(stream):
                if batch >= spec.bn_batches:
                    break
                yield images
    return ShadowPolicy(spec.bn, spec.bn_batches, spec.switch, batches)


def build_distill(spec: DistillSpec, student: nn.Module, criterion: nn.Module,
                  num_classes: int, data_config: dict, device: torch.device,
                  precision: Precision) -> Distillation | None:
    """--kd-model-name: timm's distillation task around the student, with the frozen teacher
    (timm's cached weights or --kd-pretrained-path); its cost is said at start."""
    if not spec.enabled:
        return None
    teacher, source = build_teacher(spec.kd_model_name, num_classes, spec.kd_distill_type,
                                    spec.kd_pretrained_path, device=device,
                                    dtype=precision.model_dtype)
    distill = Distillation.create(
        student, teacher, spec.kd_distill_type, criterion, teacher_name=spec.kd_model_name,
        source=source, mean=data_config["mean"], std=data_config["std"],
        distill_weight=spec.distill_loss_weight, task_weight=spec.task_loss_weight,
        temperature=spec.kd_temperature, loss_type=spec.kd_loss_type,
        token_type=spec.kd_token_distill_type, device=device,
        dtype=precision.model_dtype or torch.float32)
    log.info(distill.cost_line(data_config["input_size"]))
    return distill


def wrap_model(model: nn.Module, dist: DistInfo, device: torch.device,
               compile_backend: str | None, compile_mode: str | None = None,
               broadcast_buffers: bool = True) -> nn.Module:
    """DDP under torchrun (--no-ddp-bb: without broadcasting buffers), then torch.compile
    (--torchcompile-mode); the EMA and optimizer work on the plain module."""
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                    broadcast_buffers=broadcast_buffers)
    if compile_backend:
        model = torch.compile(model, backend=compile_backend, mode=compile_mode)
        log.info(f"model compiled with torch.compile backend '{compile_backend}'"
                 + (f", mode '{compile_mode}'" if compile_mode else ""))
    return model


def build_run(settings: TrainSettings, resuming: bool = False) -> Run:
    """Every part of a run, in the order their dependencies need (`resuming`: the weights will
    come from a checkpoint, so the start weights are not loaded)."""
    s = settings
    dist, device = init_distributed(s.dist.device, s.dist.dist_backend)
    if not dist.is_primary:
        quiet()  # only rank 0 says what the run does
    seed_everything(s.loop.seed)
    precision = s.precision.on(device)
    if s.dist.sync_bn and dist.enabled and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only); on the "
                        "CPU leave it out: --dist-bn reduce averages the statistics before "
                        "each evaluation")
    train = build_data(s.data, s.dataset, s.loader, s.model.num_classes, s.loop.seed, dist,
                       s.optim.grad_accum_steps, pin_memory=device.type == "cuda")
    num_classes = len(train.class_names)
    model = build_model(s.model, num_classes, device, precision, s.dist.sync_bn and dist.enabled,
                        start_weights=not resuming,
                        split_bn=max(s.aug.aug_splits, 2) if s.aug.split_bn else 0)
    train.data_config = data_config_for(s.image.overrides(), model)
    check_first_batch(s, model, train, dist)
    set_transforms(train, s.aug, s.loop.seed, device)
    lr = s.lr(dist.world_size)
    if s.sizes.enabled:
        lr = use_sized_batches(train, s, dist)
    if s.naflex.enabled:  # timm's reference batch (the LR's) stays -b
        use_naflex_batches(train, s, dist, model, num_classes, device)
    loss_fn, distill, trained = build_objective(s, model, num_classes, train, device, precision)
    optimizer = build_optimizer(s.optim, trained, lr)
    scheduler, num_epochs = build_scheduler(s.schedule, optimizer, train.steps_per_epoch,
                                            s.loop.seed, s.loop.eval_metric)
    mixup = None if s.naflex.enabled else build_mixup(s.labels, num_classes)  # NaFlex: its own
    per_step = images_per_step(train, s, dist.world_size)
    decays = (s.ema.decays_per_step(per_step, train.steps_per_epoch)
              if s.ema.enabled else [])
    ema = build_ema(s.ema, model, device, decays)
    power, snapshots = build_posthoc(s.posthoc, s.ema, model, device, train.steps_per_epoch,
                                     per_step,
                                     train.steps_per_epoch * num_epochs, fresh=not resuming)
    sets = weight_sets(decays, ema_labels(s.ema, decays),
                       tag="sr" if s.ema.enabled and s.ema.schedule == "power" else "",
                       names=ema_names(s.ema, decays), primary=s.loop.primary_weights)
    if power is not None:
        sets += tracked_sets(power.decays, first=len(decays))
    wrapped = wrap_trained(s, trained, distill, dist, device)
    return Run(settings=s, dist=dist, device=device, precision=precision, data=train,
               num_classes=num_classes, model=wrapped, distill=distill,
               optimizer=optimizer, scheduler=scheduler, num_epochs=num_epochs, lr=lr,
               scaler=torch.amp.GradScaler("cuda") if precision.grad_scaler else None,
               emas=EmaCollection(ema, power), snapshots=snapshots,
               shadow_policy=build_shadow_policy(s.ema, train, s.loop.seed),
               loss_fn=loss_fn, mixup_fn=mixup, weight_sets=sets,
               keeper=CheckpointKeeper(sets, s.loop.eval_metric, s.loop.checkpoint_hist,
                                       primary=dist.is_primary),
               trackers=build_trackers(s.trackers, dist.is_primary))
