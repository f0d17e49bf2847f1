"""``python -m ematrain export SOURCE --weights WEIGHTS --output FILE``: hand out one set of a
run's weights as timm publishes weights (see `publish`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..export import HUB_CONFIG, average_best, choose, publish
from ..util.errors import UserError
from ..util.invocation import command_name
from ..util.logs import log
from .entry import exit_process, run_main

PROG = "python -m ematrain export"


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Export one set of a run's weights alone (safetensors, or a "
        ".pth of plain tensors), with timm's model config beside them, for "
        "timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=FILE)).")
    p.add_argument("source", metavar="CHECKPOINT_OR_RUN_DIR",
                   help="a checkpoint, or a run folder: then the file that keeps the chosen "
                        "weights at their best epoch (model_best.pth.tar for the primary set; "
                        "last.pth.tar for a set with no best file)")
    p.add_argument("--weights", default=None, metavar="WEIGHTS",
                   help="raw, ema (the first EMA), ema<decay or name> (ema0.99, emahl2ep, "
                        "emasr0.1) or posthoc-best (validate.py --posthoc's best "
                        "reconstruction); default: ema when there is one, else raw (as timm's "
                        "clean_checkpoint.py)")
    p.add_argument("--output", "-o", required=True, metavar="FILE",
                   help="FILE.safetensors or FILE.pth (the config goes to FILE.json), or a "
                        "folder: FOLDER/model.safetensors and FOLDER/config.json, the layout "
                        "timm.create_model('local-dir:FOLDER', pretrained=True) reads")
    p.add_argument("--average-best", type=int, default=None, metavar="K",
                   help="the uniform average of the run's K best history checkpoints "
                        "(checkpoint-<epoch>.pth.tar), as timm's avg_checkpoints.py")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def _main(argv: list[str]) -> int:
    args = parser(command_name(PROG)).parse_args(argv)
    source = Path(args.source)
    if not source.exists():
        raise UserError(f"not found: {source}")
    if args.average_best is not None:
        chosen = average_best(source, args.weights, args.average_best)
    else:
        chosen = choose(source, args.weights)
    weights, config_path, config = publish(chosen, args.output, args.overwrite)
    print(describe(chosen, config), flush=True)
    size = weights.stat().st_size / 1e6
    print(f"wrote {weights} ({len(chosen.state)} tensors, {size:.3g} MB, sha256 "
          f"{config['ematrain']['sha256'][:16]}...) and {config_path}", flush=True)
    if config_path.name == HUB_CONFIG:
        log.info(f"load it with timm: timm.create_model('local-dir:{weights.parent}', "
                 f"pretrained=True)")
    else:
        log.info(f"load it with timm: timm.create_model('{config['architecture']}', "
                 f"pretrained=True, pretrained_cfg_overlay=dict(file='{weights}', "
                 f"num_classes={config['num_classes']}))")
    if config["ematrain"].get("bn_eps") is not None:
        log.warning(f"warning: the run trained with --bn-eps {config['ematrain']['bn_eps']}: "
                    f"set that eps on the model's BatchNorm layers after timm.create_model")
    return 0


def describe(chosen, config: dict) -> str:
    """``exported ema 0.99 of test_resnet, epoch 2 (its best epoch ...), logged top1 ...``."""
    line = f"exported {chosen.weights} of {config['architecture']}"
    if chosen.epoch is not None:
        line += f", epoch {chosen.epoch}"
    notes = [n for n in chosen.notes if n]
    if notes:
        line += f" ({'; '.join(notes)})"
    if chosen.logged:
        line += ", logged " + " ".join(f"{k} {v:.4f}" for k, v in chosen.logged.items())
    return line


def main(argv=None) -> int:
    return run_main(command_name(PROG), _main, argv)


def entry() -> None:
    exit_process(main())
