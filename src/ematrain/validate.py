"""validate.py: evaluate a checkpoint's raw or EMA weights on an ImageFolder split."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from . import data, distributed
from .cli import log, run_main
from .config import _Parser, resolve_data_root
from .engine import validate
from .errors import UserError
from .models import architecture_kwargs, create_model, set_batchnorm


def _parser():
    p = _Parser(prog="validate.py", description="Evaluate a checkpoint's raw or EMA weights. By "
                "default the evaluation transform is the one training validated with, so the "
                "numbers match the training log.")
    p.add_argument("data", nargs="?", default=None, metavar="DIR",
                   help="data root holding the split folder")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the data root as a flag, timm's spelling (same as DIR)")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="our checkpoint, timm's, a plain state dict or a .safetensors file")
    p.add_argument("--use-ema", action="store_true", default=False,
                   help="evaluate the (first) EMA weights")
    p.add_argument("--ema-decay", type=float, default=None, metavar="D",
                   help="evaluate the EMA shadow with this decay")
    p.add_argument("--ema-index", type=int, default=None, metavar="I",
                   help="evaluate the I-th EMA shadow (0 = the first)")
    p.add_argument("--model", default=None, help="timm model name (default: from the checkpoint)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier outputs (default: from the checkpoint, else the data)")
    p.add_argument("--split", default="val", help="split folder to evaluate (default: val)")
    p.add_argument("-b", "--batch-size", type=int, default=None, metavar="N",
                   help="batch size (default: training's validation batch size, else 256)")
    p.add_argument("-j", "--workers", type=int, default=4, metavar="N")
    p.add_argument("--img-size", type=int, default=None, metavar="N",
                   help="input size (default: the one training used)")
    p.add_argument("--crop-pct", type=float, default=None, help="center-crop fraction")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--results-file", default="", metavar="PATH",
                   help="also write the results to PATH (.json or .csv)")
    return p


def parse_args(argv=None):
    args = _parser().parse_args(None if argv is None else [str(a) for a in argv])
    resolve_data_root(args, cli=args, usage="validate.py DIR --checkpoint PATH")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f"--img-size must be >= 1, got {args.img_size}")
    if args.crop_pct is not None and not 0.0 < args.crop_pct <= 1.0:
        raise UserError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.results_file:
        path = Path(args.results_file)
        if path.suffix not in (".json", ".csv"):
            raise UserError(f"--results-file must end in .json or .csv: {path}")
        if not path.parent.is_dir():
            raise UserError(f"--results-file directory does not exist: {path.parent}")
    return args


def resolve_arch(args, ckpt: dict) -> str:
    arch = args.model or ckpt.get("arch") or ckpt_io.args_dict(ckpt).get("model")
    if not arch:
        raise UserError(f"{args.checkpoint} does not name its model; pass --model")
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


def resolve_num_classes(args, ckpt: dict, dataset) -> int:
    from_ckpt = ckpt.get("num_classes") or ckpt_io.args_dict(ckpt).get("num_classes")
    num = args.num_classes or from_ckpt or len(dataset.classes)
    if num != len(dataset.classes):
        raise UserError(f"the model has {num} classes but {args.split} has {len(dataset.classes)} "
                        f"class folders")
    return int(num)


def resolve_data_config(args, ckpt: dict, model) -> dict:
    """Training's own evaluation transform when the checkpoint records it, else timm's."""
    saved = ckpt.get("data_config")
    if saved and args.img_size is None and args.crop_pct is None:
        return dict(saved)
    train_args = ckpt_io.args_dict(ckpt)
    overrides = dict(img_size=args.img_size or train_args.get("img_size"),
                     crop_pct=args.crop_pct or train_args.get("crop_pct"),
                     input_size=None if args.img_size else train_args.get("input_size"),
                     mean=train_args.get("mean"), std=train_args.get("std"),
                     interpolation=train_args.get("interpolation") or "")
    return data.data_config_for(type("A", (), overrides)(), model)


def write_results(path: str, results: dict) -> None:
    path = Path(path)
    if path.suffix == ".json":
        text = json.dumps(results, indent=2) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(results), lineterminator="\n")
        writer.writeheader()
        writer.writerow(results)
        text = buf.getvalue()
    try:
        ckpt_io.atomic_write_text(path, text)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None


def _main(argv) -> int:
    args = parse_args(argv)
    info, device = distributed.init_distributed(args.device, None)
    try:
        return _evaluate(args, info, device)
    finally:
        distributed.shutdown()


def _evaluate(args, info, device) -> int:
    split_dir = data.resolve_split_dir(args.data_dir, args.split)
    dataset = data.load_image_folder(split_dir)
    ckpt = ckpt_io.load_file(args.checkpoint)
    saved_classes = ckpt.get("class_names")
    if saved_classes and list(saved_classes) != dataset.classes:
        raise UserError(f"class folders of {split_dir} differ from the ones the checkpoint was "
                        f"trained on")
    weights = ckpt_io.select_weights(ckpt, args.checkpoint, use_ema=args.use_ema,
                                     ema_index=args.ema_index, ema_decay=args.ema_decay)
    arch = resolve_arch(args, ckpt)
    train_args = ckpt_io.args_dict(ckpt)
    # Rebuild the network training built: pooling, --model-kwargs and BatchNorm eps change
    # what the weights compute (only when evaluating the checkpoint's own architecture).
    same_arch = arch == (ckpt.get("arch") or train_args.get("model"))
    model = create_model(arch, resolve_num_classes(args, ckpt, dataset),
                         **(architecture_kwargs(train_args) if same_arch else {}))
    if same_arch:
        set_batchnorm(model, eps=train_args.get("bn_eps"))
    ckpt_io.load_weights_into(model, weights, args.checkpoint, arch=ckpt.get("arch"),
                              model_name=arch)
    wants_ema = args.use_ema or args.ema_index is not None or args.ema_decay is not None
    recorded = (ckpt.get("ema") or {}).get("eval_dtype") if wants_ema else None
    model.to(device, dtype=evaluation_dtype(weights, device, recorded))
    data_config = resolve_data_config(args, ckpt, model)
    dataset.transform = data.eval_transform(data_config)
    batch_size = (args.batch_size or train_args.get("validation_batch_size")
                  or train_args.get("batch_size") or 256)
    # Under torchrun each rank takes a disjoint share; every image counts exactly once.
    sampler = data.EpochSampler(len(dataset), 0, shuffle=False, rank=info.rank,
                                num_replicas=info.world_size, block=batch_size)
    loader = data.make_loader(dataset, batch_size, args.workers, shuffle=False, seed=0,
                              pin_memory=device.type == "cuda", sampler=sampler)
    result = validate(model, loader, device, reduce=lambda t: distributed.all_reduce_sum(t, info),
                      show=info.is_primary)[0]
    if not info.is_primary:
        return 0
    which = "raw"
    if wants_ema:
        decays = ckpt_io.ema_decays(ckpt)
        index = args.ema_index or 0
        if args.ema_decay is not None:
            index = ckpt_io.ema_index_for_decay(ckpt, args.ema_decay, args.checkpoint)
        which = f"ema {decays[index]:g}" if decays[index] is not None else "ema"
    results = {"model": arch, "checkpoint": str(args.checkpoint), "weights": which,
               "top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
               "count": result["count"], "img_size": data_config["input_size"][-1],
               "crop_pct": data_config.get("crop_pct")}
    print(f"{arch} ({which}) on {split_dir}: top1 {result['top1']:.4f} top5 {result['top5']:.4f} "
          f"loss {result['loss']:.4f} images {result['count']}", flush=True)
    if args.results_file:
        write_results(args.results_file, results)
        log.info(f"results written to {args.results_file}")
    return 0


def main(argv=None) -> int:
    return run_main("validate.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
