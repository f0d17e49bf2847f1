"""validate.py: evaluate a checkpoint's raw or EMA weights on an ImageFolder split."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from . import data, distributed, start_weights
from .atomic import atomic_write_text
from .cli import command_name, exit_process, run_main
from .engine import validate
from .errors import UserError
from .logs import log
from .models import architecture_kwargs, create_model, probe_input, set_batchnorm
from .settings import ImageSpec, ValidateSettings, validate_settings


def resolve_arch(model: str | None, ckpt: dict, path) -> str:
    arch = model or ckpt.get("arch") or ckpt_io.args_dict(ckpt).get("model")
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


def resolve_num_classes(num_classes: int | None, ckpt: dict, dataset, split: str) -> int:
    from_ckpt = ckpt.get("num_classes") or ckpt_io.args_dict(ckpt).get("num_classes")
    num = num_classes or from_ckpt or len(dataset.classes)
    if num != len(dataset.classes):
        raise UserError(f"the model has {num} classes but {split} has {len(dataset.classes)} "
                        f"class folders")
    return int(num)


def resolve_data_config(image: ImageSpec, ckpt: dict, model, channels_last: bool = False) -> dict:
    """Training's own evaluation transform when the checkpoint records it, else timm's; the
    model is shown one image of its input size first (`probe_input`)."""
    config = _data_config(image, ckpt, model)
    name = ckpt.get("arch") or ckpt_io.args_dict(ckpt).get("model") or type(model).__name__
    probe_input(model, name, config["input_size"], channels_last)
    return config


def _data_config(image: ImageSpec, ckpt: dict, model) -> dict:
    saved = ckpt.get("data_config")
    if saved and image.img_size is None and image.crop_pct is None:
        data.check_data_config(saved)
        return dict(saved)
    recorded = ckpt_io.args_dict(ckpt)
    overrides = dict(img_size=image.img_size or recorded.get("img_size"),
                     crop_pct=image.crop_pct or recorded.get("crop_pct"),
                     input_size=None if image.img_size else recorded.get("input_size"),
                     mean=recorded.get("mean"), std=recorded.get("std"),
                     interpolation=recorded.get("interpolation") or "")
    return data.data_config_for(overrides, model)


def results_record(arch: str, result: dict, model, data_config: dict) -> dict:
    """timm's validate.py results, its fields in its order (ours follow): top-1 and top-5 as
    measured (not rounded: they equal the training log's), their errors, parameters in
    millions and the evaluation transform."""
    return {"model": arch, "top1": result["top1"], "top1_err": 100.0 - result["top1"],
            "top5": result["top5"], "top5_err": 100.0 - result["top5"],
            "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "img_size": data_config["input_size"][-1], "crop_pct": data_config.get("crop_pct"),
            "interpolation": data_config.get("interpolation")}


def write_results(path: str, results: dict, kind: str) -> None:
    """`results` as one JSON object or a one-row CSV (`kind`), written atomically."""
    path = Path(path)
    if kind == "json":
        text = json.dumps(results, indent=2) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(results), lineterminator="\n")
        writer.writeheader()
        writer.writerow(results)
        text = buf.getvalue()
    atomic_write_text(path, text)


def read_weights(s: ValidateSettings) -> tuple[dict, ckpt_io.Weights | None]:
    """The file's contents and the weights to evaluate (none to read for timm's --pretrained)."""
    if s.pretrained:
        return {}, None
    if s.pretrained_path and not s.choice.wants_ema:
        return start_weights.read(s.pretrained_path, prefer_ema=True)
    ckpt = ckpt_io.load_file(s.source)
    c = s.choice
    return ckpt, ckpt_io.select_weights(ckpt, s.source, use_ema=c.use_ema, ema_index=c.ema_index,
                                        ema_decay=c.ema_decay)


def build_model(s: ValidateSettings, ckpt: dict, dataset, weights: ckpt_io.Weights | None,
                device, path=None):
    """The network training built (pooling, --model-kwargs and BatchNorm eps change what the
    weights compute, when evaluating the checkpoint's own architecture), holding `weights`
    (`path`: the file they come from, default the settings' source of weights)."""
    path = path or s.source
    arch = resolve_arch(s.model, ckpt, path)
    recorded = ckpt_io.args_dict(ckpt)
    same_arch = arch == (ckpt.get("arch") or recorded.get("model"))
    model = create_model(arch, resolve_num_classes(s.num_classes, ckpt, dataset, s.split),
                         pretrained=s.pretrained,
                         **(architecture_kwargs(recorded) if same_arch else {}))
    if same_arch:
        set_batchnorm(model, eps=recorded.get("bn_eps"))
    dtype = s.precision.on(device).model_dtype
    if weights is not None:
        ckpt_io.load_weights_into(model, weights.state, path, arch=ckpt.get("arch"),
                                  model_name=arch)
        if s.precision.model_dtype is None:  # as training scored them
            dtype = evaluation_dtype(weights.state, device, weights.eval_dtype)
    model.to(device, dtype=dtype)
    if s.precision.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, arch


def open_split(s: ValidateSettings):
    """The split's folder and ImageFolder."""
    split_dir = data.resolve_split_dir(s.data_dir, s.split)
    return split_dir, data.load_image_folder(split_dir)


def check_classes(ckpt: dict, dataset, split_dir) -> None:
    """The split's class folders are the ones `ckpt` was trained on."""
    saved_classes = ckpt.get("class_names")
    if saved_classes and list(saved_classes) != dataset.classes:
        raise UserError(f"class folders of {split_dir} differ from the ones the checkpoint was "
                        f"trained on")


def split_loader(s: ValidateSettings, info, dataset, ckpt: dict, data_config: dict, device):
    """The evaluation loader of this rank's share (each image counts exactly once under
    torchrun) and the normalization of its uint8 batches."""
    dataset.transform = data.eval_transform(data_config)
    recorded = ckpt_io.args_dict(ckpt)
    batch_size = (s.loader.batch_size or recorded.get("validation_batch_size")
                  or recorded.get("batch_size") or 256)
    sampler = data.EpochSampler(len(dataset), 0, shuffle=False, rank=info.rank,
                                num_replicas=info.world_size, block=batch_size)
    crowded = s.loader.too_many_workers(info.local_processes)
    if crowded and info.is_primary:
        log.warning(crowded)
    loader = data.make_loader(dataset, batch_size, s.loader.workers_per_process(info.local_processes),
                              seed=0, pin_memory=device.type == "cuda", sampler=sampler)
    return loader, data.Normalize(data_config["mean"], data_config["std"], device)


def _main(argv: list[str]) -> int:
    s = validate_settings(argv)
    info, device = distributed.init_distributed(s.device, None)
    try:
        return _evaluate(s, info, device)
    finally:
        distributed.shutdown()


def _evaluate(s: ValidateSettings, info, device) -> int:
    if s.posthoc:
        from .posthoc_sweep import evaluate_posthoc
        return evaluate_posthoc(s, info, device)
    split_dir, dataset = open_split(s)
    ckpt, weights = read_weights(s)
    check_classes(ckpt, dataset, split_dir)
    model, arch = build_model(s, ckpt, dataset, weights, device)
    name = weights.name if weights is not None else "pretrained"
    data_config = resolve_data_config(s.image, ckpt, model, s.precision.channels_last)
    loader, normalize = split_loader(s, info, dataset, ckpt, data_config, device)
    precision = s.precision.on(device)
    result = validate(model, loader, device, reduce=lambda t: distributed.all_reduce_sum(t, info),
                      show=info.is_primary, normalize=normalize, amp_dtype=precision.autocast,
                      channels_last=precision.channels_last)[0]
    if not info.is_primary:
        return 0
    results = results_record(arch, result, model, data_config)
    results.update(checkpoint=str(s.source), weights=name, loss=result["loss"],
                   count=result["count"])
    print(f"{arch} ({name}) on {split_dir}: top1 {result['top1']:.4f} top5 "
          f"{result['top5']:.4f} loss {result['loss']:.4f} images {result['count']}", flush=True)
    if s.results_file:
        write_results(s.results_file, results, s.results_kind)
        log.info(f"results written to {s.results_file}")
    return 0


def main(argv=None) -> int:
    return run_main(command_name("validate.py"), _main, argv)


def entry() -> None:
    """The command (`python validate.py`, `ematrain-validate`): main, then a quick exit."""
    exit_process(main())


if __name__ == "__main__":
    entry()
