"""Evaluation: one pass over a split that scores the raw weights and every EMA shadow
(`validate`), and what validate.py needs around it to score a checkpoint as training did: the
network it trained (`build_model`), its split and loader, its evaluation transform and dtype.

validate.py (`cli.validate`, and its --posthoc sweep) and training (`training.Training`) both
score through `validate`, so their numbers agree.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Subset
from tqdm import tqdm

from ..checkpoint.schema import args_dict
from ..checkpoint.weights import Weights, load_weights_into
from ..data.augmix import split_batchnorm
from ..data.folders import load_image_folder, resolve_split_dir
from ..data.loaders import batches, make_loader
from ..data.naflex import PatchNormalize, eval_collate, model_patch_size, to_dtype
from ..data.naflex import eval_transform as naflex_eval_transform
from ..data.readers import open_mapped, open_source, open_stream, stream_loader
from ..data.samplers import EpochSampler
from ..data.transforms import Normalize, check_data_config, eval_transform
from ..ema.devices import WeightSwapper
from ..ema.model_ema import ModelEma
from ..settings.data_specs import ImageSpec
from ..settings.validate_specs import TestTimeSpec, ValidateSettings
from ..util.errors import UserError
from ..util.logs import log, show_bars
from ..util.modules import unwrap_model
from ..util.runtime import fast_norm
from .datasets import reads_folders
from .eval_config import eval_data_config
from .eval_extras import EvalExtras, read_valid_labels
from .model import architecture_kwargs, create_model, probe_input, set_batchnorm


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, ema: ModelEma | None = None,
             epoch: int | None = None, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, reduce=lambda t: t, show: bool = True,
             normalize: Callable | None = None, emas: Sequence[ModelEma] = (),
             extras: EvalExtras | None = None) -> list[dict]:
    """Evaluate the raw weights and every EMA shadow (of `ema`, or of each of `emas`, which
    live in one place) in one pass over `loader`.

    Each batch is decoded and augmented once and fed to every weight set, so K EMAs cost K extra
    forward passes, not K extra passes over the data. `reduce` sums the per-set totals across
    ranks (each rank sees a disjoint share of the images). `normalize` turns the loader's uint8
    batches into the model's input (`data.transforms.Normalize`). Returns one dict per weight set
    (raw first, then the shadows in order) with 'loss', 'top1', 'top5' and 'count'.
    `extras` (validate.py's --valid-labels, --real-labels, --metrics-avg, --log-freq) sees the
    first set's outputs.
    """
    sets = _EvalSets(model, [ema] if ema is not None else list(emas), extras)
    sums = torch.zeros(len(sets.nets), 4, dtype=torch.float64, device=device)
    bar = tqdm(total=len(loader), desc="validate" if epoch is None else f"val {epoch}",
               leave=False, disable=not (show and show_bars()), unit="batch", dynamic_ncols=True)
    try:
        with batches(loader) as stream:
            for batch, (images, targets) in enumerate(stream):
                if extras is not None and show and bar.disable:
                    extras.progress(batch, len(loader))
                targets = targets.to(device, non_blocking=True)
                if isinstance(images, dict):  # a NaFlex batch: `normalize` moves it
                    images = normalize(images)
                else:
                    images = images.to(device, non_blocking=True)
                    images = normalize(images) if normalize is not None else images
                if channels_last and not isinstance(images, dict):
                    images = images.contiguous(memory_format=torch.channels_last)
                sets.score(images, targets, sums, amp_dtype)
                bar.update(1)
    finally:
        bar.close()
        sets.restore()
    return _results(reduce(sums))


class _EvalSets:
    """The weight sets of one validation pass, each computing in its own dtype (--model-dtype,
    --model-ema-dtype). A shadow on another device than the model (--model-ema-force-cpu) is
    swapped into the live model, and computes in its dtype."""

    def __init__(self, model: nn.Module, emas: list[ModelEma], extras=None):
        self.extras = extras
        for ema in emas:
            ema.wait()
        # DDP's forward would broadcast buffers (a collective) while ranks hold different numbers
        # of validation batches: evaluate the plain module under DDP.
        if isinstance(getattr(model, "_orig_mod", model), nn.parallel.DistributedDataParallel):
            model = unwrap_model(model)
        model.eval()
        shadows = [shadow for ema in emas for shadow in ema.shadows]
        first = next(unwrap_model(model).parameters())
        self.swapper = (WeightSwapper(model, shadows)
                        if shadows and emas[0].device != first.device else None)
        self.nets = [model] + ([model] * len(shadows) if self.swapper else list(shadows))
        self.dtypes = [first.dtype] + [first.dtype if self.swapper else next(s.parameters()).dtype
                                       for s in shadows]
        self.order = list(range(len(self.nets)))

    def score(self, images, targets, sums: torch.Tensor, amp_dtype) -> None:
        for index in self.order:
            if self.swapper is not None:
                self.swapper.load(index)
            x = images if amp_dtype is not None else to_dtype(images, self.dtypes[index])
            with torch.autocast(targets.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = self.nets[index](x)
            if self.extras is not None:
                output = self.extras.output(output, targets, first=index == 0)
            sums[index] += _batch_sums(output, targets)
        # Walking the sets back and forth saves one weight swap per batch.
        self.order.reverse()

    def restore(self) -> None:
        if self.swapper is not None:
            self.swapper.restore()


def _batch_sums(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, images] of one batch, in float64.

    Per-sample losses summed in float64 and integer hit counts: the numbers do not depend on how
    the images are split into batches or ranks, so validate.py and a distributed run reproduce
    the training log.
    """
    loss = nn.functional.cross_entropy(output.float(), targets, reduction="none").double().sum()
    top1, top5 = topk_correct(output, targets, (1, 5))
    count = torch.tensor(float(targets.size(0)), dtype=torch.float64, device=output.device)
    return torch.stack([loss, top1, top5, count])


def _results(sums: torch.Tensor) -> list[dict]:
    count = int(sums[0, 3])
    if count == 0:
        raise UserError("validation split produced no batches")
    return [{"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
             "count": count} for loss, top1, top5, _ in sums.tolist()]


def topk_correct(output: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """How many targets are among the top-k predictions, for each k (k capped at the classes)."""
    maxk = min(max(ks), output.size(1))
    top = output.topk(maxk, dim=1).indices
    hits = top.eq(targets.unsqueeze(1))
    return [hits[:, :min(k, maxk)].any(dim=1).sum().double() for k in ks]


def resolve_arch(model: str | None, ckpt: dict, path) -> str:
    arch = model or ckpt.get("arch") or args_dict(ckpt).get("model")
    if not arch:
        raise UserError(f"{path} does not name its model; pass --model")
    return arch


def evaluation_dtype(weights: dict, device, recorded: str | None = None) -> torch.dtype | None:
    """The dtype training validated these weights in (None: float32); float16 only on CUDA.

    ``recorded`` is the checkpoint's note for EMA weights (a shadow on another device is scored
    swapped into a 16-bit model); otherwise 16-bit weights (--model-dtype) were scored in their
    own dtype.
    """
    if recorded:
        dtype = getattr(torch, recorded, None)
    else:
        dtypes = {t.dtype for t in weights.values() if torch.is_tensor(t) and t.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype in (torch.bfloat16, torch.float64) or (dtype == torch.float16 and device.type == "cuda"):
        return dtype
    return None


def resolve_num_classes(num_classes: int | None, ckpt: dict, dataset, split: str,
                        scored: int | None = None) -> int:
    """The model's classes; `scored`: --valid-labels lists that many of them, one per class
    folder of the split."""
    from_ckpt = ckpt.get("num_classes") or args_dict(ckpt).get("num_classes")
    num = num_classes or from_ckpt or len(dataset.classes)
    if scored is not None:
        if scored != len(dataset.classes):
            raise UserError(f"--valid-labels lists {scored} classes but {split} has "
                            f"{len(dataset.classes)} class folders")
        return int(num)
    if num != len(dataset.classes):
        raise UserError(f"the model has {num} classes but {split} has {len(dataset.classes)} "
                        f"classes")
    return int(num)


def resolve_data_config(image: ImageSpec, ckpt: dict, model, channels_last: bool = False,
                        test: TestTimeSpec | None = None) -> dict:
    """Training's own evaluation transform when the checkpoint records it, else timm's
    validate.py default (`eval_config`); the flags replace the fields they give. The model is
    shown one image of its input size first (`probe_input`)."""
    test = test or TestTimeSpec()
    config = _data_config(image, ckpt, model, test)
    if test.crop_border_pixels:
        config["crop_border_pixels"] = test.crop_border_pixels
    name = ckpt.get("arch") or args_dict(ckpt).get("model") or type(model).__name__
    probe_input(model, name, config["input_size"], channels_last)
    return config


def _data_config(image: ImageSpec, ckpt: dict, model, test: TestTimeSpec) -> dict:
    given = dict(image.overrides(), crop_mode=test.crop_mode)
    saved, recorded = ckpt.get("data_config"), args_dict(ckpt)
    if saved:
        check_data_config(saved)
        config = eval_data_config(model, given, recorded=dict(saved))
    elif recorded:  # a training record without the transform (timm's, ours of old)
        sized = image.img_size is not None or image.input_size is not None
        config = eval_data_config(model, {
            "img_size": image.img_size or (None if sized else recorded.get("img_size")),
            "input_size": image.input_size or (None if sized else recorded.get("input_size")),
            "crop_pct": image.crop_pct or recorded.get("crop_pct"),
            "mean": image.mean or recorded.get("mean"), "std": image.std or recorded.get("std"),
            "interpolation": image.interpolation or recorded.get("interpolation") or "",
            "crop_mode": test.crop_mode}, use_train_size=True)
    else:  # a state dict, timm's released weights: timm's validate.py default
        config = eval_data_config(model, given, use_train_size=test.use_train_size)
    check_data_config(config)
    return config


def build_model(s: ValidateSettings, ckpt: dict, dataset, weights: Weights | None,
                device, path=None):
    """The network training built (pooling, --model-kwargs and BatchNorm eps change what the
    weights compute, when evaluating the checkpoint's own architecture), holding `weights`
    (`path`: the file they come from, default the settings' source of weights)."""
    path = path or s.source
    arch = resolve_arch(s.model, ckpt, path)
    recorded = args_dict(ckpt)
    same_arch = arch == (ckpt.get("arch") or recorded.get("model"))
    kwargs = {**(architecture_kwargs(recorded) if same_arch else {}),
              **s.test.model_kwargs_given()}
    labels = len(read_valid_labels(s.test.valid_labels, 1 << 30)) if s.test.valid_labels else None
    with fast_norm(s.test.fast_norm):
        model = create_model(arch, resolve_num_classes(s.num_classes, ckpt, dataset, s.split,
                                                       labels), pretrained=s.pretrained, **kwargs)
    if same_arch:
        set_batchnorm(model, eps=recorded.get("bn_eps"))
        if recorded.get("split_bn"):  # the weights hold per-split BatchNorm (--split-bn)
            model = split_batchnorm(model, max(int(recorded.get("aug_splits") or 0), 2))
    dtype = s.precision.on(device).model_dtype
    if weights is not None:
        load_weights_into(model, weights.state, path, arch=ckpt.get("arch"),
                                  model_name=arch)
        if s.precision.model_dtype is None:  # as training scored them
            dtype = evaluation_dtype(weights.state, device, weights.eval_dtype)
    model.to(device, dtype=dtype)
    if s.precision.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, arch


def open_split(s: ValidateSettings, num_classes: int | None = None, split: str | None = None):
    """Where the split is, and the split: an ImageFolder as always, else what timm's reader of
    --dataset gives (a map-style split, or a stream's source; `num_classes`: for labels stored
    as class indices, when the data names no classes; `split`: another than --split)."""
    spec, split = s.dataset, split or s.split
    if reads_folders(spec):
        split_dir = resolve_split_dir(s.data_dir, split)
        return split_dir, load_image_folder(split_dir)
    where = f"{spec.dataset or spec.root} {split}"
    if spec.streaming:
        return where, open_source(spec, split, num_classes, flag="--split")
    return where, open_mapped(spec, split, spec.img_mode(), num_classes, flag="--split")


def check_classes(ckpt: dict, dataset, split_dir) -> None:
    """The split's class folders are the ones `ckpt` was trained on."""
    saved_classes = ckpt.get("class_names")
    if saved_classes and list(saved_classes) != dataset.classes:
        raise UserError(f"class folders of {split_dir} differ from the ones the checkpoint was "
                        f"trained on")


def eval_batch_size(s: ValidateSettings, ckpt: dict) -> int:
    """-b, else training's validation batch size, else 256."""
    recorded = args_dict(ckpt)
    return (s.loader.batch_size or recorded.get("validation_batch_size")
            or recorded.get("batch_size") or 256)


def naflex_evaluation(s: ValidateSettings, ckpt: dict, model, arch: str) -> dict | None:
    """validate.py's NaFlex evaluation (--naflex-loader, or a checkpoint trained with it): the
    patch size, sequence length (--naflex-max-seq-len, else training's, else timm's 576) and
    patch layout of its batches; None for image batches."""
    recorded = args_dict(ckpt)
    given = s.naflex.naflex_loader
    if not (given or (given is None and recorded.get("naflex_loader"))):
        return None
    if s.dataset.streaming:
        raise UserError(f"--naflex-loader evaluates a map-style split; --dataset "
                        f"{s.dataset.dataset} is a stream")
    return {"patch_size": model_patch_size(unwrap_model(model), arch),
            "max_seq_len": int(s.naflex.naflex_max_seq_len or recorded.get("naflex_max_seq_len")
                               or 576),
            "channels_last": not recorded.get("naflex_patchify_channels_first")}


def split_loader(s: ValidateSettings, info, dataset, ckpt: dict, data_config: dict, device,
                 batch_size: int | None = None, indices: Sequence[int] | None = None,
                 naflex: dict | None = None):
    """The evaluation loader of this rank's share (each image counts exactly once under
    torchrun) and the normalization of its uint8 batches (`batch_size`: --retry's; `indices`:
    these images of a map-style split only, in this order; `naflex`: NaFlex batches, as
    `naflex_evaluation` gives them)."""
    batch_size = batch_size or eval_batch_size(s, ckpt)
    crowded = s.loader.too_many_workers(info.local_processes)
    if crowded and info.is_primary:
        log.warning(crowded)
    workers = s.loader.workers_per_process(info.local_processes)
    normalize = Normalize(data_config["mean"], data_config["std"], device)
    if s.dataset.streaming:  # each process and worker reads its own shards, each once
        stream = open_stream(s.dataset, dataset, s.split, train=False, world=info.world_size,
                             rank=info.rank, workers=workers, batch_size=batch_size, seed=0,
                             mode=s.dataset.img_mode())
        stream.transform = eval_transform(data_config)
        if info.is_primary:
            log.info(stream.plan.line("validation", s.split))
        loader = stream_loader(stream, 0, pin_memory=device.type == "cuda")
        loader.set_epoch(0)
        return loader, normalize
    collate = None
    if naflex is not None:
        dataset.transform = naflex_eval_transform(data_config, naflex["patch_size"],
                                                  naflex["max_seq_len"], naflex["channels_last"])
        collate = eval_collate(naflex["max_seq_len"])
        normalize = PatchNormalize(data_config["mean"], data_config["std"], device,
                                   channels_last=naflex["channels_last"])
    else:
        dataset.transform = eval_transform(data_config)
    if indices is not None:
        dataset = Subset(dataset, [int(i) for i in indices])
    sampler = EpochSampler(len(dataset), 0, shuffle=False, rank=info.rank,
                                num_replicas=info.world_size, block=batch_size)
    loader = make_loader(dataset, batch_size, workers, seed=0, pin_memory=device.type == "cuda",
                         sampler=sampler, collate_fn=collate)
    return loader, normalize


class WeightBank:
    """Modules holding weight sets to score beside the live model, as `validate` takes
    a `ModelEma` (its `shadows`, `device` and `wait`)."""

    def __init__(self, model: nn.Module, states: list[dict], dtype: torch.dtype | None):
        first = next(model.parameters())
        self.device = first.device
        self.shadows = []
        for state in states:
            module = copy.deepcopy(model)
            module.load_state_dict(state)
            self.shadows.append(module.to(self.device, dtype=dtype or torch.float32).eval())

    def wait(self) -> None:
        """Nothing runs in the background here."""

    def subset(self, indices: Sequence[int]) -> "WeightBank":
        """A bank of some of these modules (shared, not copied), in the order of `indices`."""
        bank = copy.copy(self)
        bank.shadows = [self.shadows[i] for i in indices]
        return bank
