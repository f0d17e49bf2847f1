"""Command-line flags for train.py (timm's names and meanings) and YAML recipes (`-c`)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import yaml

from .errors import UserError


class ParseKwargs(argparse.Action):
    """KEY=VALUE pairs; values are Python literals when they parse as one, else strings."""

    def __call__(self, parser, namespace, values, option_string=None):
        import ast
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UserError(f"{option_string}: expected KEY=VALUE, got '{item}'")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting."""

    def error(self, message):
        if message.startswith("unrecognized arguments: ") and self.prog == "train.py":
            words = message.removeprefix("unrecognized arguments: ").split()
            timm_only = [w for w in words if w.startswith("--") and _is_timm_key(w)]
            if timm_only:
                rest = [w for w in words if w.startswith("-") and w not in timm_only]
                message = f"{', '.join(timm_only)}: timm setting(s) ematrain does not support"
                if rest:
                    message += f"; unrecognized arguments: {' '.join(rest)}"
        raise UserError(message)


def _is_timm_key(flag: str) -> bool:
    key = flag[2:].split("=")[0].replace("-", "_")
    return key in TIMM_SETTINGS_NOT_SUPPORTED or _timm_gate(key) is not None


def _train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train.py", description="Train a timm model on an ImageFolder data set, "
                "with model-weight EMA validated every epoch.")
    p.add_argument("-c", "--config", default="", metavar="FILE",
                   help="YAML recipe: its keys become defaults, command-line flags win")

    g = p.add_argument_group("Dataset parameters")
    g.add_argument("data", nargs="?", default=None, metavar="DIR",
                   help="data root holding <train-split>/ and <val-split>/ ImageFolder trees")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the data root as a flag, timm's spelling (same as DIR)")
    g.add_argument("--train-split", default="train", help="training split folder (default: train)")
    g.add_argument("--val-split", default="val",
                   help="validation split folder (default: val; 'validation' if val is absent)")

    g = p.add_argument_group("Model parameters")
    g.add_argument("--model", default="resnet50", help="timm model name (default: resnet50)")
    g.add_argument("--pretrained", action="store_true", default=False,
                   help="start from timm's pretrained weights (needs them cached locally)")
    g.add_argument("--initial-checkpoint", default="", metavar="PATH",
                   help="start from these weights (ours, timm's, a state dict or .safetensors)")
    g.add_argument("--resume", default="", metavar="PATH",
                   help="resume a run from its checkpoint ('auto': the experiment's last.pth.tar)")
    g.add_argument("--no-resume-opt", action="store_true", default=False,
                   help="on resume, do not restore optimizer and scheduler state")
    g.add_argument("--pretrained-path", default=None, metavar="PATH",
                   help="local weights file for --pretrained (timm's pretrained_cfg_overlay file=)")
    g.add_argument("--gp", default=None, metavar="POOL",
                   help="global pool type (fast, avg, max, avgmax, avgmaxc); default: the model's")
    g.add_argument("--head-init-scale", type=float, default=None,
                   help="multiply the classifier's initial weights and bias by this")
    g.add_argument("--head-init-bias", type=float, default=None,
                   help="set the classifier's initial bias to this value")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                   help="extra keyword arguments for timm.create_model, e.g. stem_type=deep")
    g.add_argument("--in-chans", type=int, default=None, metavar="N",
                   help="input image channels (default: 3; images are loaded as RGB)")
    g.add_argument("--grad-checkpointing", action="store_true", default=False,
                   help="activation checkpointing: less memory, more compute")
    g.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="classifier outputs (default: the number of class folders)")
    g.add_argument("--img-size", type=int, default=None, metavar="N", help="input image size")
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N",
                   help="input dimensions C H W (overrides --img-size)")
    g.add_argument("--crop-pct", type=float, default=None, help="evaluation center-crop fraction")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN",
                   help="per-channel normalisation mean (default: the model's)")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="STD",
                   help="per-channel normalisation std (default: the model's)")
    g.add_argument("--interpolation", default="", help="resize interpolation (default: the model's)")
    g.add_argument("-b", "--batch-size", type=int, default=128, metavar="N",
                   help="training batch size (default: 128)")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None, metavar="N",
                   help="validation batch size (default: the training batch size)")
    g.add_argument("--grad-accum-steps", type=int, default=1, metavar="N",
                   help="batches per optimizer step (the EMA updates once per optimizer step)")
    g.add_argument("--channels-last", action="store_true", default=False,
                   help="use channels-last memory layout")
    g.add_argument("--torchcompile", nargs="?", type=str, default=None, const="inductor",
                   help="torch.compile the model with this backend (default when given: inductor)")
    g.add_argument("--amp", action="store_true", default=False,
                   help="mixed precision autocast (bfloat16 works on the CPU; float16 needs CUDA)")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"],
                   help="autocast dtype (default: float16; a grad scaler is used with float16)")
    g.add_argument("--model-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="keep the model's weights and inputs in this dtype (low precision without "
                        "AMP; the EMA shadows stay float32 unless --model-ema-dtype says otherwise)")
    g.add_argument("--no-prefetcher", action="store_true", default=False,
                   help="accepted for timm compatibility (ematrain has no separate prefetcher)")
    g.add_argument("--pin-mem", action="store_true", default=False,
                   help="accepted for timm compatibility (memory is pinned whenever on CUDA)")
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate (default: 0)")
    g.add_argument("--drop-path", type=float, default=None, help="drop-path rate")
    g.add_argument("--drop-block", type=float, default=None,
                   help="drop-block rate (models that support it, e.g. resnet)")
    g.add_argument("--bn-momentum", type=float, default=None,
                   help="momentum of every BatchNorm layer (default: the model's own)")
    g.add_argument("--bn-eps", type=float, default=None,
                   help="epsilon of every BatchNorm layer (default: the model's own)")

    g = p.add_argument_group("Optimizer parameters")
    g.add_argument("--opt", default="sgd", help="timm optimizer name (default: sgd)")
    g.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon")
    g.add_argument("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas")
    g.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                   help="extra optimizer keyword arguments")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=2e-5, help="weight decay (default: 2e-5)")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                   help="clip gradients at this value (default: off)")
    g.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise learning-rate decay (e.g. 0.65 for ViTs)")
    g.add_argument("--clip-mode", default="norm", choices=["norm", "value", "agc"],
                   help="gradient clipping mode (default: norm)")

    g = p.add_argument_group("Learning rate schedule parameters")
    g.add_argument("--sched", default="cosine", help="timm LR scheduler (default: cosine)")
    g.add_argument("--sched-on-updates", action="store_true", default=False,
                   help="step the schedule every optimizer update instead of every epoch")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: --lr-base scaled by the batch size)")
    g.add_argument("--lr-base", type=float, default=0.1,
                   help="base learning rate for --lr-base-size images per step (default: 0.1)")
    g.add_argument("--lr-base-size", type=int, default=256,
                   help="batch size that --lr-base refers to (default: 256)")
    g.add_argument("--lr-base-scale", default="", choices=["", "linear", "sqrt"],
                   help="how --lr-base scales with the global batch (default: sqrt for "
                        "Ada*/LAMB optimizers, linear otherwise)")
    g.add_argument("--warmup-lr", type=float, default=1e-5, help="warmup start LR (default: 1e-5)")
    g.add_argument("--min-lr", type=float, default=0.0, help="LR floor of the schedule (default: 0)")
    g.add_argument("--epochs", type=int, default=300, help="epochs to train (default: 300)")
    g.add_argument("--warmup-epochs", type=int, default=5, help="LR warmup epochs (default: 5)")
    g.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at min LR after the schedule")
    g.add_argument("--decay-epochs", type=float, default=90, help="step schedules: epochs per decay")
    g.add_argument("--decay-rate", type=float, default=0.1, help="step schedules: LR decay factor")
    g.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], metavar="EPOCH",
                   help="multistep schedule: epochs at which the LR decays (default: 90 180 270)")
    g.add_argument("--patience-epochs", type=int, default=10,
                   help="plateau schedule: epochs without improvement before decaying (default: 10)")
    g.add_argument("--warmup-prefix", action="store_true", default=False,
                   help="run the warmup before the schedule instead of inside it")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="PCT",
                   help="LR noise on/off epoch fractions (one or two values)")
    g.add_argument("--lr-noise-pct", type=float, default=0.67, help="LR noise limit (default: 0.67)")
    g.add_argument("--lr-noise-std", type=float, default=1.0, help="LR noise std (default: 1.0)")
    g.add_argument("--lr-cycle-mul", type=float, default=1.0,
                   help="cosine/tanh: cycle length multiplier (default: 1.0)")
    g.add_argument("--lr-cycle-decay", type=float, default=0.5,
                   help="cosine/tanh: LR decay per cycle (default: 0.5)")
    g.add_argument("--lr-cycle-limit", type=int, default=1,
                   help="cosine/tanh: number of cycles (default: 1)")
    g.add_argument("--lr-k-decay", type=float, default=1.0,
                   help="cosine/poly: k-decay rate (default: 1.0)")

    g = p.add_argument_group("Augmentation and regularization parameters")
    g.add_argument("--no-aug", action="store_true", default=False, help="disable training augmentation")
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], metavar="PCT",
                   help="random-resized-crop scale range (default: 0.08 1.0)")
    g.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], metavar="RATIO",
                   help="random-resized-crop aspect ratio range (default: 3/4 4/3)")
    g.add_argument("--train-interpolation", default="random",
                   help="training resize interpolation (default: random, as timm)")
    g.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability (default: 0)")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (default: 0.5)")
    g.add_argument("--color-jitter", type=float, default=0.4, help="color jitter factor (default: 0.4)")
    g.add_argument("--aug-repeats", type=float, default=0, metavar="N",
                   help="repeated augmentation: an epoch of the usual length made of about 1/N "
                        "of the images, each N times under its own augmentation, the copies "
                        "spread over the ranks (0: off; works in a single process too)")
    g.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5")
    g.add_argument("--reprob", type=float, default=0.0, help="random erase probability (default: 0)")
    g.add_argument("--remode", default="pixel", choices=["pixel", "rand", "const"],
                   help="random erase mode (default: pixel)")
    g.add_argument("--recount", type=int, default=1, help="random erase count (default: 1)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha, on when > 0 (default: 0)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha, on when > 0 (default: 0)")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, metavar="PCT",
                   help="cutmix min/max box ratio (overrides alpha)")
    g.add_argument("--mixup-prob", type=float, default=1.0,
                   help="probability of mixup or cutmix per batch (default: 1)")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5,
                   help="probability of cutmix instead of mixup when both are on (default: 0.5)")
    g.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"],
                   help="how mixup/cutmix params are drawn (default: batch)")
    g.add_argument("--mixup-off-epoch", type=int, default=0, metavar="N",
                   help="turn mixup/cutmix off from this epoch (default: 0 = never)")
    g.add_argument("--bce-loss", action="store_true", default=False,
                   help="binary cross-entropy loss instead of softmax cross-entropy")
    g.add_argument("--bce-target-thresh", type=float, default=None,
                   help="threshold that binarizes soft BCE targets")

    g = p.add_argument_group("Model exponential moving average parameters")
    g.add_argument("--model-ema", action="store_true", default=False,
                   help="keep exponential moving averages of the weights, validated every epoch")
    g.add_argument("--model-ema-decay", type=float, nargs="+", default=None, metavar="DECAY",
                   help="EMA decay per update; several values keep several shadows (default: 0.9998)")
    g.add_argument("--model-ema-half-life", nargs="+", default=None, metavar="H",
                   help="EMA horizon instead of a decay: e.g. 2ep, 500it, 300kimg (several allowed)")
    g.add_argument("--model-ema-force-cpu", action="store_true", default=False,
                   help="keep the EMA shadows in host memory (still validated every epoch)")
    g.add_argument("--model-ema-every", type=int, default=1, metavar="N",
                   help="average every N optimizer steps with decay**N (default: 1)")
    g.add_argument("--model-ema-warmup", action="store_true", default=False,
                   help="timm's EMA warmup: the decay rises towards its target")
    g.add_argument("--model-ema-warmup-power", type=float, default=2 / 3,
                   help="EMA warmup power (default: 2/3)")
    g.add_argument("--model-ema-dtype", default=None, choices=["float32", "float16", "bfloat16", "float64"],
                   help="EMA shadow dtype (default: float32 for 16-bit models, else the model's)")

    g = p.add_argument_group("Miscellaneous parameters")
    g.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    g.add_argument("--log-interval", type=int, default=50, metavar="N",
                   help="steps between progress read-outs (default: 50)")
    g.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip up to N steps whose loss is NaN/Inf instead of stopping (default: 0)")
    g.add_argument("--recovery-interval", type=int, default=0, metavar="N",
                   help="also save recovery.pth.tar every N optimizer steps (default: 0 = off)")
    g.add_argument("--checkpoint-hist", type=int, default=10, metavar="N",
                   help="best epoch checkpoints to keep (default: 10)")
    g.add_argument("-j", "--workers", type=int, default=4, metavar="N",
                   help="data loading worker processes (default: 4)")
    g.add_argument("--device", default=None,
                   help="device for a single-process run (default: cuda when available, else "
                        "cpu); under torchrun each rank takes cuda:LOCAL_RANK or the cpu")
    g.add_argument("--dist-backend", default=None,
                   help="torch.distributed backend (default: nccl on CUDA, gloo on the CPU)")
    g.add_argument("--sync-bn", action="store_true", default=False,
                   help="convert BatchNorm to SyncBatchNorm under torchrun")
    g.add_argument("--dist-bn", default="reduce", choices=["reduce", "broadcast", ""],
                   help="without --sync-bn: average ('reduce') or copy rank 0's ('broadcast') "
                        "BatchNorm statistics before each evaluation (default: reduce)")
    g.add_argument("--output", default="", metavar="DIR",
                   help="output root (default: ./output); runs go to <output>/train/<experiment>")
    g.add_argument("--experiment", default="", help="run name (default: <date>-<model>)")
    g.add_argument("--eval-metric", default="top1", choices=["top1", "top5", "loss"],
                   help="metric that picks the best checkpoints (default: top1)")
    return p


def parse_train_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; a `-c` YAML file supplies defaults, explicit flags win."""
    parser = _train_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    pre, _ = parser.parse_known_args(argv)
    recipe = load_yaml_defaults(pre.config, parser) if pre.config else {}
    parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    resolve_data_root(args, cli=pre, usage="train.py DIR (with DIR/train and DIR/val)")
    # The command line wins over a recipe here too: a half-life given there replaces the recipe's
    # decay (timm's args.yaml always records one), and a decay replaces its half-life.
    if pre.model_ema_half_life and not pre.model_ema_decay:
        args.model_ema_decay = None
    if pre.model_ema_decay and not pre.model_ema_half_life:
        args.model_ema_half_life = None
    # A user who names an EMA setting wants the EMA: turning it on beats silently ignoring it.
    # A recipe that says model_ema: false (timm's args.yaml records the EMA settings even then)
    # keeps it off unless the command line asks for it.
    if not args.model_ema and _ema_settings_given(pre if recipe.get("model_ema") is False else args):
        args.model_ema = True
    check_train_args(args)
    return args


def _ema_settings_given(ns: argparse.Namespace) -> bool:
    return bool(ns.model_ema or ns.model_ema_decay or ns.model_ema_half_life or ns.model_ema_force_cpu
                or ns.model_ema_dtype or ns.model_ema_warmup or ns.model_ema_every != 1)


def resolve_data_root(args: argparse.Namespace, cli: argparse.Namespace, usage: str) -> None:
    """Settle timm's two spellings of the data root, positional DIR and --data-dir, in data_dir.

    ``cli`` holds only what the command line gave (no -c recipe defaults): a root given there
    wins over a recipe's, so ``-c old-run/args.yaml NEWDIR`` trains on NEWDIR. Two different
    roots on the command line are an error rather than a silent pick.
    """
    _refuse_two_roots(cli, "")
    if not (cli.data or cli.data_dir):
        _refuse_two_roots(args, " (in the -c recipe)")
    root = cli.data_dir or cli.data or args.data_dir or args.data
    if not root:
        raise UserError(f"no data root given: {usage}")
    args.data_dir, args.data = root, None


def _refuse_two_roots(where: argparse.Namespace, source: str) -> None:
    if where.data and where.data_dir and Path(where.data).resolve() != Path(where.data_dir).resolve():
        raise UserError(f"two data roots given{source}: {where.data} and --data-dir {where.data_dir}")


def load_yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML recipe and check that every key is a flag of `parser`."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise UserError(f"config file {path} is not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    _refuse_foreign_keys(path, {k: v for k, v in data.items() if k not in actions})
    # timm recipes write one value for list flags (model_ema_decay: 0.9998): that becomes a list.
    return {key: _recipe_value(path, actions[key], key, value)
            for key, value in data.items() if key in actions}


# timm train.py settings that ematrain does not implement, with the value that leaves them off.
# timm writes every setting into its args.yaml, so these keys are what lets such a file serve as
# a recipe here: at these values they change nothing and are dropped; set to anything else they
# are refused, never silently ignored.
TIMM_SETTINGS_NOT_SUPPORTED = {
    "dataset": "", "dataset_download": False, "dataset_trust_remote_code": False,
    "class_map": "", "train_num_samples": None, "val_num_samples": None, "input_img_mode": None,
    "input_key": None, "target_key": None, "epoch_repeats": 0.0, "start_epoch": None,
    "aug_splits": 0, "jsd_loss": False, "resplit": False, "split_bn": False, "drop_connect": None,
    "fuser": "", "fast_norm": False, "torchscript": False, "torchcompile_mode": None,
    "amp_impl": "native", "no_ddp_bb": False, "synchronize_step": False, "device_modules": None,
    "tta": 0, "local_rank": 0, "use_multi_epochs_loader": False, "worker_seeding": "all",
    "save_images": False, "log_wandb": False, "train_crop_mode": None, "bce_sum": False,
    "bce_pos_weight": None, "color_jitter_prob": None, "grayscale_prob": 0.0,
    "gaussian_blur_prob": 0.0, "naflex_loader": False, "kd_model_name": None,
}
# Settings that only act when another one is on: whatever their value, they are idle while
# their gate is off.
# Matched by prefix, so timm's variants of these families (NaFlex, distillation, wandb) are known.
_TIMM_GATED = {"naflex_": "naflex_loader", "kd_": "kd_model_name",
               "distill_loss_weight": "kd_model_name", "task_loss_weight": "kd_model_name",
               "wandb_": "log_wandb"}


def _timm_gate(key: str) -> str | None:
    return next((gate for prefix, gate in _TIMM_GATED.items()
                 if key.startswith(prefix) and key != gate), None)


def _is_off(key: str, value) -> bool:
    return value in (None, "", False, 0, [], {}) or value == TIMM_SETTINGS_NOT_SUPPORTED.get(key)


def _refuse_foreign_keys(path: str, extra: dict) -> None:
    """Keys of a recipe that are no flag of ours may only be timm settings left off (the caller
    drops them); a typo, or a timm feature switched on, is an error naming the keys."""
    unknown = sorted(k for k in extra if k not in TIMM_SETTINGS_NOT_SUPPORTED and not _timm_gate(k))
    if unknown:
        raise UserError(f"config file {path}: unknown key(s): {', '.join(unknown)}")
    # A gated setting is part of its gate's feature: only the gate, when on, is reported.
    active = [f"{k}={extra[k]!r}" for k in sorted(extra)
              if _timm_gate(k) is None and not _is_off(k, extra[k])]
    if active:
        raise UserError(f"config file {path}: timm setting(s) ematrain does not support: "
                        f"{', '.join(active)}")


def _recipe_value(path: str, action: argparse.Action, key: str, value):
    """A recipe value checked and converted as argparse would treat it on the command line
    (set_defaults skips that): types, choices, true/false, list lengths, KEY=VALUE mappings."""
    where = f"config file {path}: {key}"
    if value is None:
        if action.default is not None and action.nargs != "?":
            raise UserError(f"{where} cannot be empty")
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping of names to values, got {value!r}")
        return value
    if action.nargs == "?" and isinstance(value, bool) and action.const is not None:
        return action.const if value else None  # torchcompile: true means the bare flag
    listed = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not listed:
        raise UserError(f"{where} takes one value, got {value!r}")
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise UserError(f"{where} needs {action.nargs} values, got {value!r}")
    if action.nargs == "+" and not items:
        raise UserError(f"{where} needs at least one value")
    converted = []
    for item in items:
        if action.type in (int, float) and isinstance(item, str):
            # YAML reads 1e-3 (no decimal point) as text; the command line would accept it.
            try:
                item = action.type(item)
            except ValueError:
                pass
        if action.type in (int, float) and (isinstance(item, bool) or not isinstance(item, (int, float))
                                            or (action.type is int and not isinstance(item, int))):
            kind = "whole number(s)" if action.type is int else "number(s)"
            raise UserError(f"{where} needs {kind}, got {value!r}")
        if action.type in (None, str) and not isinstance(item, str):
            item = str(item)  # text options: the command line would give the text
        if action.choices is not None and item not in action.choices:
            raise UserError(f"{where} must be one of {', '.join(map(str, action.choices))}, "
                            f"got {value!r}")
        converted.append(item)
    return converted if isinstance(value, list) or action.nargs in ("+", "*") else converted[0]


def check_train_args(args: argparse.Namespace) -> None:
    """Range and consistency checks that argparse cannot express."""
    positive = {"batch_size": "--batch-size", "epochs": "--epochs", "log_interval": "--log-interval",
                "model_ema_every": "--model-ema-every", "grad_accum_steps": "--grad-accum-steps"}
    for dest, flag in positive.items():
        if getattr(args, dest) < 1:
            raise UserError(f"{flag} must be >= 1, got {getattr(args, dest)}")
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f"--img-size must be >= 1, got {args.img_size}")
    if args.input_size is not None and min(args.input_size) < 1:
        raise UserError(f"--input-size values must be >= 1, got {args.input_size}")
    for name in ("smoothing", "drop"):
        value = getattr(args, name)
        if not 0.0 <= value < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {value}")
    for name in ("drop_path", "drop_block"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    owned = {"num_classes": "--num-classes", "pretrained": "--pretrained",
             "checkpoint_path": "--initial-checkpoint", "pretrained_cfg_overlay": "--pretrained-path"}
    for key in args.model_kwargs:
        if key in owned:
            raise UserError(f"--model-kwargs {key}: use {owned[key]} instead")
    modes = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
    if args.interpolation not in ("",) + modes:
        raise UserError(f"--interpolation must be one of {', '.join(modes)}, got {args.interpolation!r}")
    if args.train_interpolation not in ("", "random") + modes:
        raise UserError(f"--train-interpolation must be random or one of {', '.join(modes)}, "
                        f"got {args.train_interpolation!r}")
    for name in ("mean", "std"):
        value = getattr(args, name)
        if value is not None and len(value) not in (1, 3):
            raise UserError(f"--{name} takes 1 or 3 values (RGB), got {len(value)}")
    if args.opt_betas is not None and (len(args.opt_betas) not in (2, 3)
                                       or not all(0.0 <= b < 1.0 for b in args.opt_betas)):
        raise UserError(f"--opt-betas takes 2 (or 3, e.g. for adan) values in [0, 1), "
                        f"got {' '.join(f'{b:g}' for b in args.opt_betas)}")
    if args.torchcompile:
        import torch._dynamo
        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.torchcompile not in backends:
            raise UserError(f"--torchcompile: unknown backend {args.torchcompile!r} "
                            f"(e.g. {', '.join(torch._dynamo.list_backends())}, eager)")
    repeats = args.aug_repeats
    if not (math.isfinite(repeats) and repeats >= 0 and repeats == int(repeats)):
        raise UserError(f"--aug-repeats must be a whole number >= 0, got {args.aug_repeats:g}")
    if args.amp and args.model_dtype not in (None, "float32"):
        raise UserError(f"--amp is mixed precision for a float32 model; with --model-dtype "
                        f"{args.model_dtype} the model already computes in {args.model_dtype}: "
                        f"give one of them")
    for name in ("head_init_scale", "head_init_bias"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.bn_momentum is not None and not 0.0 <= args.bn_momentum <= 1.0:
        raise UserError(f"--bn-momentum must be in [0, 1], got {args.bn_momentum}")
    if args.bn_eps is not None and not 0.0 < args.bn_eps < math.inf:
        raise UserError(f"--bn-eps must be a positive number, got {args.bn_eps}")
    if args.crop_pct is not None and not 0.0 < args.crop_pct <= 1.0:
        raise UserError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.validation_batch_size is not None and args.validation_batch_size < 1:
        raise UserError(f"--validation-batch-size must be >= 1, got {args.validation_batch_size}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.warmup_epochs < 0:
        raise UserError(f"--warmup-epochs must be >= 0, got {args.warmup_epochs}")
    if args.lr is not None and args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.model_ema_decay is not None and args.model_ema_half_life is not None:
        raise UserError("give --model-ema-decay or --model-ema-half-life, not both")
    for d in args.model_ema_decay or []:
        if not 0.0 < d < 1.0:
            raise UserError(f"--model-ema-decay must be in (0, 1), got {d}")
    if args.model_ema_half_life:
        from .ema import parse_half_life
        for text in args.model_ema_half_life:
            try:
                parse_half_life(str(text))
            except ValueError as exc:
                raise UserError(f"--model-ema-half-life: {exc}") from None
    if args.recovery_interval < 0:
        raise UserError(f"--recovery-interval must be >= 0, got {args.recovery_interval}")
    if args.in_chans is not None and args.in_chans != 3:
        raise UserError(f"--in-chans {args.in_chans}: ImageFolder images are loaded as RGB, so "
                        f"only 3 channels are supported")
    if args.lr_noise is not None and len(args.lr_noise) not in (1, 2):
        raise UserError("--lr-noise takes one or two values")
    for name in ("mixup_prob", "mixup_switch_prob", "hflip", "vflip", "reprob"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    if args.mixup < 0 or args.cutmix < 0:
        raise UserError("--mixup and --cutmix must be >= 0")
    if args.skip_nonfinite < 0:
        raise UserError(f"--skip-nonfinite must be >= 0, got {args.skip_nonfinite}")
    if args.checkpoint_hist < 1:
        raise UserError(f"--checkpoint-hist must be >= 1, got {args.checkpoint_hist}")
