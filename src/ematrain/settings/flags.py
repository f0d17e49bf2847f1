"""The flag tables of train.py and validate.py: timm's names, meanings and groups.

Only declarations live here (and the two value types they use). What a value must satisfy
beyond its type is checked where the value is used, in `settings`.
"""
from __future__ import annotations

import argparse
import ast
import math
from pathlib import Path

from .. import __version__
from ..util.errors import UserError
from ..util.invocation import command_name
from .timm_unsupported import is_timm_flag, why_refused

# Where runs go when --output is not given (timm's layout: <output>/<experiment>).
DEFAULT_OUTPUT = Path("output") / "train"

def finite_float(text: str) -> float:
    """A float flag's value: nan and inf are refused, as no setting means them."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def whole_number(text: str) -> int:
    """An int flag's value (argparse's type=int resolves to this in a FlagParser): within
    int64, where torch, numpy and the slicing of samplers all take it."""
    value = int(text)  # argparse words its ValueError: "invalid int value: 'x'"
    if not -2**63 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a whole number of at most 19 digits, got "
                                         f"{text!r}")
    return value


class ParseKwargs(argparse.Action):
    """KEY=VALUE pairs; values are Python literals when they parse as one, else strings."""

    def __call__(self, parser, namespace, values, option_string=None):
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


class EmaSetting(argparse._StoreAction):
    """Stores an EMA setting and switches the EMA on."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.model_ema = True


class EmaSwitch(argparse._StoreTrueAction):
    """An EMA on/off option that also switches the EMA on."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.model_ema = True


class _EndOfValues(argparse.Action):
    """A token that ends a list of values (`LIST_END`); it sets nothing."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        pass


# Placed after a list-valued option's values when settings are written as tokens, so that a
# positional argument that follows is not taken for one more value.
LIST_END = "--end-of-values"


class _HelpWithDefaults(argparse.HelpFormatter):
    """Every option that takes a value states its default: the help text's own wording where it
    has one, else the value argparse holds ('none' for an unset one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or "default" in text
                or action.default is argparse.SUPPRESS):
            return text
        shown = "none" if action.default in (None, "", {}, []) else "%(default)s"
        return f"{text} (default: {shown})"


class FlagParser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting.

    On the command line a timm flag that ematrain lacks is named as such (see `timm_unsupported`)
    rather than reported as a generic unrecognized argument (`names_timm_flags`, train.py).
    """

    names_timm_flags = False

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)
        self.register("type", int, whole_number)
        self.add_argument(LIST_END, action=_EndOfValues)
        self.add_argument("--version", action="version", version=f"%(prog)s (ematrain) {__version__}")

    def error(self, message):
        if message.startswith("unrecognized arguments: ") and self.names_timm_flags:
            words = message.removeprefix("unrecognized arguments: ").split()
            timm_only = [w for w in words if w.startswith("--") and is_timm_flag(w)]
            if timm_only:
                rest = [w for w in words if w.startswith("-") and w not in timm_only]
                message = "timm setting(s) ematrain does not support: " + "; ".join(
                    f"{w.split('=')[0]} ({why_refused(w)})" for w in timm_only)
                if rest:
                    message += f"; unrecognized arguments: {' '.join(rest)}"
        raise UserError(_shortened(message))


def _shortened(message: str, most: int = 8) -> str:
    """A list of unrecognized words cut to its first `most` (a shell glob can add thousands)."""
    head, sep, words = message.rpartition("unrecognized arguments: ")
    words = words.split(" ")
    if not sep or len(words) <= most:
        return message
    return f"{head}{sep}{' '.join(words[:most])} ... ({len(words) - most} more)"


def train_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of train.py: timm's names, meanings and groups."""
    prog = prog or command_name("train.py")
    p = FlagParser(prog=prog, description="Train a timm model on an ImageFolder data set, "
                "with model-weight EMA validated every epoch.")
    p.names_timm_flags = True
    p.add_argument("-c", "--config", default="", metavar="FILE",
                   help="YAML recipe: its keys become defaults, command-line flags win")
    _dataset_flags(p)
    _model_flags(p)
    _optimizer_flags(p)
    _schedule_flags(p)
    _augmentation_flags(p)
    _ema_flags(p)
    _misc_flags(p)
    _recipe_flags(p)
    _size_flags(p)
    _naflex_flags(p)
    _distill_flags(p)
    _tracker_flags(p)
    return p


def _tracker_flags(p) -> None:
    """Run trackers: timm's W&B flags, and TensorBoard."""
    g = p.add_argument_group("Run trackers (W&B, TensorBoard)")
    g.add_argument("--log-wandb", action="store_true", default=False,
                   help="log training and validation metrics to Weights & Biases (offline with "
                        "WANDB_MODE=offline)")
    g.add_argument("--wandb-project", default=None, metavar="NAME", help="W&B project name")
    g.add_argument("--wandb-tags", default=[], nargs="+", metavar="TAG", help="W&B tags")
    g.add_argument("--wandb-resume-id", default="", metavar="ID",
                   help="with --resume: the id of the W&B run to continue (default: the one "
                        "the checkpoint names)")
    g.add_argument("--log-tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="log the same metrics to TensorBoard event files in DIR (default "
                        "without DIR: <run>/tensorboard)")


def _dataset_flags(p) -> None:
    """train.py's dataset parameters (timm's group)."""
    g = p.add_argument_group("Dataset parameters")
    g.add_argument("data", nargs="?", default=None, metavar="DIR",
                   help="data root holding <train-split>/ and <val-split>/ ImageFolder trees")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the data root as a flag, timm's spelling (same as DIR)")
    _dataset_reader_flags(g, train=True)


def _dataset_reader_flags(g, train: bool) -> None:
    """timm's --dataset and the flags of its readers (train.py's, or validate.py's spellings:
    --split, --num-samples), and ours: --corrupt-samples."""
    g.add_argument("--dataset", default="", metavar="NAME",
                   help="dataset type + name, as timm's: '' an ImageFolder (or a .tar of images), "
                        "torch/<name>, hfds/<name or folder>, hfids/<name or folder>, "
                        "wds/<name> (shards in --data-dir); tfds/ is not supported")
    if train:
        g.add_argument("--train-split", default="train", metavar="NAME",
                       help="training split (default: train)")
        g.add_argument("--val-split", default="validation", metavar="NAME",
                       help="validation split (default: validation; a folder 'val' is found "
                            "for it too)")
        g.add_argument("--train-num-samples", type=int, default=None, metavar="N",
                       help="samples in a training epoch of a stream (wds/, hfids/; default: "
                            "the shard metadata's count)")
        g.add_argument("--val-num-samples", type=int, default=None, metavar="N",
                       help="samples in the validation split of a stream (default: the shard "
                            "metadata's count)")
    else:
        g.add_argument("--split", default="validation", metavar="NAME",
                       help="split to evaluate (default: validation; a folder 'val' is found "
                            "for it too)")
        g.add_argument("--num-samples", type=int, default=None, metavar="N",
                       help="samples in the split of a stream (default: the shard metadata's)")
    g.add_argument("--dataset-download", action="store_true", default=False,
                   help="allow downloading torch/ and Hugging Face datasets (default: nothing "
                        "is fetched)")
    g.add_argument("--class-map", default="", metavar="FILENAME",
                   help="class names in label order (.txt, one a line) or {name: index} (.pkl)")
    g.add_argument("--input-img-mode", default=None, metavar="MODE",
                   help="PIL image mode the images are converted to (default: RGB)")
    g.add_argument("--input-key", default=None, metavar="KEY",
                   help="the image's field in wds/, hfds/, hfids/ samples (default: the "
                        "reader's: jpg/png/..., image)")
    g.add_argument("--target-key", default=None, metavar="KEY",
                   help="the label's field in wds/, hfds/, hfids/ samples (default: cls, label)")
    g.add_argument("--dataset-trust-remote-code", action="store_true", default=False,
                   help="let a Hugging Face dataset run its own loading script (default: off)")
    g.add_argument("--corrupt-samples", default="stop", choices=["stop", "skip"],
                   help="an image that does not decode: 'stop' the run in one line, or 'skip' "
                        "it and count it in the log (default: stop)")
    if train:
        g.add_argument("--epoch-repeats", type=float, default=0.0, metavar="N",
                       help="a stream's training epoch is N passes over its samples (timm's; "
                            "default: 0, one pass)")


def _model_flags(p) -> None:
    """train.py's model parameters (timm's group)."""
    g = p.add_argument_group("Model parameters")
    g.add_argument("--model", default="resnet50", help="timm model name (default: resnet50)")
    g.add_argument("--pretrained", action="store_true", default=False,
                   help="start from timm's pretrained weights (needs them cached locally)")
    g.add_argument("--initial-checkpoint", default="", metavar="PATH",
                   help="start from these weights (ours, timm's, a state dict or .safetensors; "
                        "default: timm's initialisation)")
    g.add_argument("--resume", default="", metavar="PATH",
                   help="resume a run from its checkpoint ('auto': the experiment's last.pth.tar; "
                        "default: a new run)")
    g.add_argument("--no-resume-opt", action="store_true", default=False,
                   help="on resume, do not restore optimizer and scheduler state")
    g.add_argument("--pretrained-path", default=None, metavar="PATH",
                   help="local weights file for --pretrained (timm's pretrained_cfg_overlay file=; "
                        "default: timm's cache)")
    g.add_argument("--gp", default=None, metavar="POOL",
                   help="global pool type (fast, avg, max, avgmax, avgmaxc); default: the model's")
    g.add_argument("--head-init-scale", type=finite_float, default=None,
                   help="multiply the classifier's initial weights and bias by this (default: 1)")
    g.add_argument("--head-init-bias", type=finite_float, default=None,
                   help="set the classifier's initial bias to this value (default: the model's)")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                   help="extra keyword arguments for timm.create_model, e.g. stem_type=deep")
    g.add_argument("--in-chans", type=int, default=None, metavar="N",
                   help="input image channels (default: 3; images are loaded as RGB)")
    g.add_argument("--grad-checkpointing", action="store_true", default=False,
                   help="activation checkpointing: less memory, more compute")
    g.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="classifier outputs (default: the number of class folders)")
    _input_flags(g)


def _input_flags(g) -> None:
    """train.py's input, batch and precision flags (timm keeps them with the model's)."""
    g.add_argument("--img-size", type=int, default=None, metavar="N", help="input image size (default: the model's)")
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N",
                   help="input dimensions C H W (overrides --img-size; default: the model's)")
    g.add_argument("--crop-pct", type=finite_float, default=None, help="evaluation center-crop fraction (default: the model's)")
    g.add_argument("--mean", type=finite_float, nargs="+", default=None, metavar="MEAN",
                   help="per-channel normalisation mean (default: the model's)")
    g.add_argument("--std", type=finite_float, nargs="+", default=None, metavar="STD",
                   help="per-channel normalisation std (default: the model's)")
    g.add_argument("--interpolation", default="", help="resize interpolation (default: the model's)")
    g.add_argument("-b", "--batch-size", type=int, default=128, metavar="N",
                   help="training batch size (default: 128)")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None, metavar="N",
                   help="validation batch size (default: the training batch size)")
    g.add_argument("--grad-accum-steps", type=int, default=1, metavar="N",
                   help="batches per optimizer step (the EMA updates once per optimizer step)")
    g.add_argument("--torchcompile", nargs="?", type=str, default=None, const="inductor",
                   help="torch.compile the model with this backend (default when given: inductor)")
    _speed_flags(g, training=True)
    _precision_flags(g, training=True)
    g.add_argument("--no-prefetcher", action="store_true", default=False,
                   help="accepted for timm compatibility (ematrain has no separate prefetcher)")
    g.add_argument("--pin-mem", action="store_true", default=False,
                   help="accepted for timm compatibility (memory is pinned whenever on CUDA)")
    g.add_argument("--drop", type=finite_float, default=0.0, help="dropout rate (default: 0)")
    g.add_argument("--drop-path", type=finite_float, default=None, help="drop-path rate (default: the model's, usually 0)")
    g.add_argument("--drop-block", type=finite_float, default=None,
                   help="drop-block rate (models that support it, e.g. resnet; default: 0)")
    g.add_argument("--bn-momentum", type=finite_float, default=None,
                   help="momentum of every BatchNorm layer (default: the model's own)")
    g.add_argument("--bn-eps", type=finite_float, default=None,
                   help="epsilon of every BatchNorm layer (default: the model's own)")


def _optimizer_flags(p) -> None:
    """train.py's optimizer parameters (timm's group)."""
    g = p.add_argument_group("Optimizer parameters")
    g.add_argument("--opt", default="sgd", help="timm optimizer name (default: sgd)")
    g.add_argument("--opt-eps", type=finite_float, default=None, help="optimizer epsilon (default: the optimizer's)")
    g.add_argument("--opt-betas", type=finite_float, nargs="+", default=None, help="optimizer betas (default: the optimizer's)")
    g.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                   help="extra optimizer keyword arguments")
    g.add_argument("--momentum", type=finite_float, default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=finite_float, default=2e-5, help="weight decay (default: 2e-5)")
    g.add_argument("--clip-grad", type=finite_float, default=None, metavar="NORM",
                   help="clip gradients at this value (default: off)")
    g.add_argument("--layer-decay", type=finite_float, default=None,
                   help="layer-wise learning-rate decay, e.g. 0.65 for ViTs (default: off)")
    g.add_argument("--clip-mode", default="norm", choices=["norm", "value", "agc"],
                   help="gradient clipping mode (default: norm)")
    g.add_argument("--opt-fused", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU, run torch's SGD, Adam, AdamW and Adagrad as their fused "
                        "kernel: the same update in one pass instead of one per tensor "
                        "(--no-opt-fused: torch's default implementation; default: on)")


def _schedule_flags(p) -> None:
    """train.py's learning rate schedule parameters (timm's group)."""
    g = p.add_argument_group("Learning rate schedule parameters")
    g.add_argument("--sched", default="cosine", help="timm LR scheduler (default: cosine)")
    g.add_argument("--sched-on-updates", action="store_true", default=False,
                   help="step the schedule every optimizer update instead of every epoch")
    g.add_argument("--lr", type=finite_float, default=None,
                   help="learning rate (default: --lr-base scaled by the batch size)")
    g.add_argument("--lr-base", type=finite_float, default=0.1,
                   help="base learning rate for --lr-base-size images per step (default: 0.1)")
    g.add_argument("--lr-base-size", type=int, default=256,
                   help="batch size that --lr-base refers to (default: 256)")
    g.add_argument("--lr-base-scale", default="", choices=["", "linear", "sqrt"],
                   metavar="{linear,sqrt}",
                   help="how --lr-base scales with the global batch (default: sqrt for "
                        "Ada*/LAMB optimizers, linear otherwise)")
    g.add_argument("--warmup-lr", type=finite_float, default=1e-5, help="warmup start LR (default: 1e-5)")
    g.add_argument("--min-lr", type=finite_float, default=0.0, help="LR floor of the schedule (default: 0)")
    g.add_argument("--epochs", type=int, default=300, help="epochs to train (default: 300)")
    g.add_argument("--warmup-epochs", type=int, default=5, help="LR warmup epochs (default: 5)")
    g.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at min LR after the schedule (default: 0)")
    g.add_argument("--decay-epochs", type=finite_float, default=90, help="step schedules: epochs per decay (default: 90)")
    g.add_argument("--decay-rate", "--dr", type=finite_float, default=0.1, help="step schedules: LR decay factor (default: 0.1)")
    g.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], metavar="EPOCH",
                   help="multistep schedule: epochs at which the LR decays (default: 90 180 270)")
    g.add_argument("--patience-epochs", type=int, default=10,
                   help="plateau schedule: epochs without improvement before decaying (default: 10)")
    g.add_argument("--warmup-prefix", action="store_true", default=False,
                   help="run the warmup before the schedule instead of inside it")
    g.add_argument("--lr-noise", type=finite_float, nargs="+", default=None, metavar="PCT",
                   help="LR noise on/off epoch fractions, one or two values (default: off)")
    g.add_argument("--lr-noise-pct", type=finite_float, default=0.67, help="LR noise limit (default: 0.67)")
    g.add_argument("--lr-noise-std", type=finite_float, default=1.0, help="LR noise std (default: 1.0)")
    g.add_argument("--lr-cycle-mul", type=finite_float, default=1.0,
                   help="cosine/tanh: cycle length multiplier (default: 1.0)")
    g.add_argument("--lr-cycle-decay", type=finite_float, default=0.5,
                   help="cosine/tanh: LR decay per cycle (default: 0.5)")
    g.add_argument("--lr-cycle-limit", type=int, default=1,
                   help="cosine/tanh: number of cycles (default: 1)")
    g.add_argument("--lr-k-decay", type=finite_float, default=1.0,
                   help="cosine/poly: k-decay rate (default: 1.0)")


def _augmentation_flags(p) -> None:
    """train.py's augmentation and regularization parameters (timm's group)."""
    g = p.add_argument_group("Augmentation and regularization parameters")
    g.add_argument("--no-aug", action="store_true", default=False, help="disable training augmentation")
    g.add_argument("--scale", type=finite_float, nargs="+", default=[0.08, 1.0], metavar="PCT",
                   help="random-resized-crop scale range (default: 0.08 1.0)")
    g.add_argument("--ratio", type=finite_float, nargs="+", default=[3 / 4, 4 / 3], metavar="RATIO",
                   help="random-resized-crop aspect ratio range (default: 3/4 4/3)")
    g.add_argument("--train-interpolation", default="random",
                   help="training resize interpolation (default: random, as timm)")
    g.add_argument("--vflip", type=finite_float, default=0.0, help="vertical flip probability (default: 0)")
    g.add_argument("--hflip", type=finite_float, default=0.5, help="horizontal flip probability (default: 0.5)")
    g.add_argument("--color-jitter", type=finite_float, default=0.4, help="color jitter factor (default: 0.4)")
    g.add_argument("--aug-repeats", type=finite_float, default=0, metavar="N",
                   help="repeated augmentation: an epoch of the usual length made of about 1/N "
                        "of the images, each N times under its own augmentation, the copies "
                        "spread over the ranks (0: off; works in a single process too)")
    g.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5 (default: off)")
    g.add_argument("--reprob", type=finite_float, default=0.0, help="random erase probability (default: 0)")
    g.add_argument("--remode", default="pixel", choices=["pixel", "rand", "const"],
                   help="random erase mode (default: pixel)")
    g.add_argument("--recount", type=int, default=1, help="random erase count (default: 1)")
    g.add_argument("--smoothing", type=finite_float, default=0.1, help="label smoothing (default: 0.1)")
    g.add_argument("--mixup", type=finite_float, default=0.0, help="mixup alpha, on when > 0 (default: 0)")
    g.add_argument("--cutmix", type=finite_float, default=0.0, help="cutmix alpha, on when > 0 (default: 0)")
    g.add_argument("--cutmix-minmax", type=finite_float, nargs="+", default=None, metavar="PCT",
                   help="cutmix min/max box ratio, overrides alpha (default: off)")
    g.add_argument("--mixup-prob", type=finite_float, default=1.0,
                   help="probability of mixup or cutmix per batch (default: 1)")
    g.add_argument("--mixup-switch-prob", type=finite_float, default=0.5,
                   help="probability of cutmix instead of mixup when both are on (default: 0.5)")
    g.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"],
                   help="how mixup/cutmix params are drawn (default: batch)")
    g.add_argument("--mixup-off-epoch", type=int, default=0, metavar="N",
                   help="turn mixup/cutmix off from this epoch (default: 0 = never)")
    g.add_argument("--bce-loss", action="store_true", default=False,
                   help="binary cross-entropy loss instead of softmax cross-entropy")
    g.add_argument("--bce-target-thresh", type=finite_float, default=None,
                   help="threshold that binarizes soft BCE targets (default: off)")


def _ema_flags(p) -> None:
    """train.py's model exponential moving average parameters (timm's group)."""
    g = p.add_argument_group("Model exponential moving average parameters")
    g.add_argument("--model-ema", action="store_true", default=False,
                   help="keep exponential moving averages of the weights, validated every epoch")
    # A recipe that says model_ema: false ends with this token, so that its EMA settings (timm's
    # args.yaml records them even when the EMA is off) do not switch the EMA on.
    g.add_argument("--no-model-ema", dest="model_ema", action="store_false", help=argparse.SUPPRESS)
    # Naming any other EMA setting switches the EMA on: a user who sets one wants the EMA.
    g.add_argument("--model-ema-decay", type=finite_float, nargs="+", default=None,
                   metavar="DECAY", action=EmaSetting,
                   help="EMA decay per update; several values keep several shadows (default: 0.9998)")
    g.add_argument("--model-ema-half-life", nargs="+", default=None, metavar="H", action=EmaSetting,
                   help="EMA horizon instead of a decay: e.g. 2ep, 500it, 300kimg (several allowed)")
    g.add_argument("--model-ema-force-cpu", action=EmaSwitch, default=False,
                   help="keep the EMA shadows in host memory (still validated every epoch)")
    g.add_argument("--model-ema-every", type=int, default=1, metavar="N", action=EmaSetting,
                   help="average every N optimizer steps with decay**N (default: 1)")
    _ema_schedule_flags(g)
    g.add_argument("--model-ema-precheck", action=EmaSwitch, default=False,
                   help="check the weights for NaN/Inf before every EMA update and skip a bad one "
                        "(exact, at one more read of the model per update and, on CUDA, a host "
                        "sync); without it the shadows are checked before each validation and "
                        "save, and a non-finite run stops")
    g.add_argument("--model-ema-dtype", default=None, action=EmaSetting,
                   choices=["float32", "float16", "bfloat16", "float64"],
                   help="EMA shadow dtype (default: float32 for 16-bit models, else the model's)")
    # Post-hoc EMA: power-function EMAs beside (not instead of) the --model-ema-decay shadows,
    # so these do not switch the regular EMA on.
    g.add_argument("--model-ema-posthoc", type=finite_float, nargs="*", default=None,
                   metavar="SIGMA_REL",
                   help="track power-function EMAs of these relative widths (default when given "
                        "bare: 0.05 0.10) and snapshot them into <run>/posthoc/, so that "
                        "validate.py --posthoc reconstructs EMAs of any length after training")
    g.add_argument("--model-ema-snapshot-every", default=None, metavar="H",
                   help="post-hoc snapshot interval: Nep, Nit or Nimg (k/M allowed), as "
                        "--model-ema-half-life (default: 32 snapshots per run)")
    g.add_argument("--model-ema-snapshot-dtype", default=None,
                   choices=["float32", "bfloat16", "float16"],
                   help="dtype of the post-hoc snapshots' weights (default: float32)")


def _ema_schedule_flags(g) -> None:
    """How each EMA update's decay is chosen, and the shadows at an epoch's end."""
    g.add_argument("--model-ema-schedule", default=None, metavar="NAME", action=EmaSetting,
                   help="how each update's decay is chosen: constant (default), timm (timm's "
                        "warmup), debias (bias-corrected, as Adam's), power (EDM2's power-function "
                        "EMA: give --model-ema-sigma-rel)")
    g.add_argument("--model-ema-warmup", action=EmaSwitch, default=False,
                   help="timm's EMA warmup: the decay rises towards its target (= "
                        "--model-ema-schedule timm)")
    g.add_argument("--model-ema-warmup-power", type=finite_float, default=2 / 3, action=EmaSetting,
                   help="EMA warmup power of the timm schedule (default: 2/3)")
    g.add_argument("--model-ema-sigma-rel", type=finite_float, nargs="+", default=None,
                   metavar="S", action=EmaSetting,
                   help="power schedule: the profile's width relative to the training so far, "
                        "one shadow each (e.g. 0.05 0.1; default 0.1)")
    g.add_argument("--model-ema-power-gamma", type=finite_float, nargs="+", default=None,
                   metavar="G", action=EmaSetting,
                   help="power schedule: the exponent instead of --model-ema-sigma-rel")
    g.add_argument("--model-ema-bn", default="average", action=EmaSetting,
                   choices=["average", "copy", "recalibrate"],
                   help="BatchNorm statistics of the shadows: averaged like the weights (default), "
                        "copied from the live model, or recalibrated on --model-ema-bn-batches "
                        "training batches before each validation")
    g.add_argument("--model-ema-bn-batches", type=int, default=20, metavar="N", action=EmaSetting,
                   help="training batches --model-ema-bn recalibrate uses (default: 20)")
    g.add_argument("--model-ema-switch", action=EmaSwitch, default=False,
                   help="switch-EMA: at the end of each epoch the live model takes the first EMA's "
                        "weights (optimizer state kept)")


def _misc_flags(p) -> None:
    """train.py's miscellaneous parameters (timm's group)."""
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
    g.add_argument("-j", "--workers", type=int, default=None, metavar="N",
                   help="data loading worker processes per training process (default: 4, fewer "
                        "where there are fewer cores)")
    g.add_argument("--device", default=None,
                   help="device for a single-process run (default: cuda when available, else "
                        "cpu); under torchrun each rank takes cuda:LOCAL_RANK or the cpu")
    g.add_argument("--dist-backend", default=None,
                   help="torch.distributed backend (default: nccl on CUDA, gloo on the CPU)")
    g.add_argument("--sync-bn", action="store_true", default=False,
                   help="convert BatchNorm to SyncBatchNorm under torchrun")
    g.add_argument("--dist-bn", default="reduce", choices=["reduce", "broadcast", ""],
                   metavar="{reduce,broadcast}",
                   help="without --sync-bn: average ('reduce') or copy rank 0's ('broadcast') "
                        "BatchNorm statistics before each evaluation; '' leaves each rank's "
                        "(default: reduce)")
    g.add_argument("--output", default="", metavar="DIR",
                   help="runs go to <output>/<experiment>, as timm lays them out (default: "
                        "./output/train)")
    g.add_argument("--experiment", default="",
                   help="run name (default: <date>-<model>-<img size>, as timm's)")
    g.add_argument("--eval-metric", default="top1", choices=["top1", "top5", "loss"],
                   help="metric that picks the best checkpoints (default: top1)")
    g.add_argument("--primary-weights", default="ema", choices=["ema", "raw"],
                   help="the weights timm's names describe: summary.csv's eval_* columns, the "
                        "checkpoints' metric, model_best.pth.tar and the checkpoint history; "
                        "'ema' (timm's meaning) is the first EMA when one is on, 'raw' keeps the "
                        "raw weights there and the EMA in ema_eval_* and model_best_ema.pth.tar "
                        "(default: ema)")


def validate_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of validate.py."""
    prog = prog or command_name("validate.py")
    p = FlagParser(prog=prog, description="Evaluate a checkpoint's raw or EMA weights. By "
                   "default the evaluation transform is the one training validated with, so the "
                   "numbers match the training log.")
    p.names_timm_flags = True
    p.add_argument("data", nargs="?", default=None, metavar="DIR",
                   help="data root holding the split folder")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the data root as a flag, timm's spelling (same as DIR)")
    _dataset_reader_flags(p, train=False)
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="our checkpoint, timm's, a plain state dict or a .safetensors file")
    p.add_argument("--pretrained-path", default=None, metavar="FILE",
                   help="instead of --checkpoint: a weights file read as train.py's "
                        "--pretrained-path reads it (its EMA weights where it has them)")
    p.add_argument("--pretrained", action="store_true", default=False,
                   help="instead of --checkpoint: timm's released weights for --model (from "
                        "timm's cache)")
    _posthoc_flags(p)
    p.add_argument("--use-ema", action="store_true", default=False,
                   help="evaluate the (first) EMA weights")
    p.add_argument("--ema-decay", default=None, metavar="D",
                   help="evaluate the EMA shadow of this decay (to the digits given: 0.984 is "
                        "0.98437) or of this name in the training log (hl2ep or 2ep for "
                        "--model-ema-half-life 2ep, sr0.1 for a power EMA)")
    p.add_argument("--ema-index", type=int, default=None, metavar="I",
                   help="evaluate the I-th EMA shadow (0 = the first)")
    p.add_argument("--model", "-m", default=None,
                   help="timm model name (default: from the checkpoint)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier outputs (default: from the checkpoint, else the data)")
    p.add_argument("-b", "--batch-size", type=int, default=None, metavar="N",
                   help="batch size (default: training's validation batch size, else 256)")
    p.add_argument("-j", "--workers", type=int, default=None, metavar="N",
                   help="data loading worker processes per process (default: 4, fewer where "
                        "there are fewer cores)")
    p.add_argument("--img-size", type=int, default=None, metavar="N",
                   help="input size (default: the one training used)")
    p.add_argument("--crop-pct", type=finite_float, default=None, help="center-crop fraction")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--results-file", default="", metavar="PATH",
                   help="also write the results to PATH (.json or .csv)")
    p.add_argument("--results-format", default=None, choices=["csv", "json"],
                   help="format of --results-file (default: from its suffix)")
    _precision_flags(p, training=False)
    _test_time_flags(p)
    _naflex_flags(p, training=False)
    return p


def _posthoc_flags(p) -> None:
    """validate.py --posthoc and what it reconstructs."""
    p.add_argument("--posthoc", default=None, metavar="RUN_DIR",
                   help="instead of --checkpoint: reconstruct EMAs of many lengths from the "
                        "post-hoc snapshots of a run trained with --model-ema-posthoc, score them "
                        "all in one pass, and write posthoc.csv, posthoc.png and "
                        "model_posthoc_best.pth.tar into RUN_DIR")
    p.add_argument("--sigma-rel", type=finite_float, nargs="+", default=None, metavar="S",
                   help="--posthoc: power-function EMA lengths to reconstruct (default: ten "
                        "from a quarter of the shortest tracked one to 2.5 times the longest, "
                        "at most 0.25)")
    p.add_argument("--half-life", nargs="+", default=None, metavar="H",
                   help="--posthoc: classic EMAs to reconstruct, by half-life at the end of "
                        "training in the training flag's units (2ep, 500it, 300kimg); scored "
                        "beside the --sigma-rel ones")
    _posthoc_select_flags(p)


def _posthoc_select_flags(p) -> None:
    """validate.py --posthoc's selection protocol (issue 23's flags)."""
    p.add_argument("--select-split", default=None, metavar="SPLIT",
                   help="--posthoc: choose the best weight set on this split folder, then score "
                        "the pick, the raw weights and the tracked EMAs on --split and report "
                        "those (default: chosen and scored on the same images)")
    p.add_argument("--select-fraction", type=finite_float, default=None, metavar="F",
                   help="--posthoc: a fixed, stratified part F of --split (each class's share, "
                        "drawn with --select-seed) chooses, the rest reports")
    p.add_argument("--select-seed", type=int, default=0, metavar="N",
                   help="--posthoc: the seed of --select-fraction's draw (default: 0)")
    p.add_argument("--select-metric", default=None, choices=["top1", "top5", "loss"],
                   help="--posthoc: what the best is chosen by, ties broken by the lower loss "
                        "(default: the run's --eval-metric)")


def _precision_flags(group, training: bool) -> None:
    """--amp, --amp-dtype, --model-dtype, --channels-last: timm's, in both commands."""
    group.add_argument("--channels-last", action="store_true", default=False,
                       help="use channels-last memory layout")
    group.add_argument("--amp", action="store_true", default=False,
                       help="mixed precision autocast (bfloat16 works on the CPU; float16 needs "
                            "CUDA)")
    group.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"],
                       help="autocast dtype (default: float16"
                            + ("; a grad scaler is used with float16)" if training else ")"))
    group.add_argument("--model-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="keep the model's weights and inputs in this dtype (low precision "
                            "without AMP; the EMA shadows stay float32 unless --model-ema-dtype "
                            "says otherwise)" if training else
                            "evaluate with the weights in this dtype (default: the dtype "
                            "training scored them in)")


# ----------------------------------------------------------------------------- issue 25's flags
def _speed_flags(g, training: bool) -> None:
    """timm's compile, normalization-kernel and device flags (both commands share the first)."""
    g.add_argument("--torchcompile-mode", type=str, default=None,
                   help="torch.compile mode (default, reduce-overhead, max-autotune, "
                        "max-autotune-no-cudagraphs); needs --torchcompile")
    g.add_argument("--fast-norm", action="store_true", default=False,
                   help="timm's fast normalization layers for the models built")
    if not training:
        return
    g.add_argument("--no-ddp-bb", action="store_true", default=False,
                   help="under torchrun, do not broadcast buffers from rank 0 each step")
    g.add_argument("--synchronize-step", action="store_true", default=False,
                   help="wait for the device at the end of each optimizer step")
    g.add_argument("--local_rank", default=0, type=int,
                   help="torch.distributed.launch's argument: accepted; LOCAL_RANK decides")
    g.add_argument("--device-modules", default=None, type=str, nargs="+",
                   help="python modules to import before the device is chosen (e.g. torch_npu)")
    g.add_argument("--drop-connect", type=finite_float, default=None,
                   help="timm's old name of --drop-path (taken as --drop-path)")


def _recipe_flags(p) -> None:
    """train.py's flags of timm's newer recipes: schedule position, validation interval,
    augmentation probabilities, BCE options, layer-decay bounds, loader seeding."""
    g = p.add_argument_group("Newer timm recipe parameters")
    g.add_argument("--start-epoch", default=None, type=int, metavar="N",
                   help="start at this epoch (the LR schedule at its position; default: 0, or "
                        "the resumed one)")
    g.add_argument("--val-interval", type=int, default=1, metavar="N",
                   help="validate (and choose best files) every N epochs and at the last")
    g.add_argument("--train-crop-mode", type=str, default=None,
                   help="training crop: rrc (random-resized, default), rkrc, rkrr")
    g.add_argument("--color-jitter-prob", type=finite_float, default=None, metavar="P",
                   help="probability of applying --color-jitter (default: always)")
    g.add_argument("--grayscale-prob", type=finite_float, default=None, metavar="P",
                   help="probability of a grayscale image (default: 0)")
    g.add_argument("--gaussian-blur-prob", type=finite_float, default=None, metavar="P",
                   help="probability of a gaussian blur (default: 0)")
    g.add_argument("--bce-sum", action="store_true", default=False,
                   help="--bce-loss summed over the classes (mean over the batch)")
    g.add_argument("--bce-pos-weight", type=finite_float, default=None,
                   help="--bce-loss weight of the positive class")
    g.add_argument("--layer-decay-min-scale", type=finite_float, default=0,
                   help="--layer-decay: the smallest LR scale of a layer (default: 0)")
    g.add_argument("--layer-decay-no-opt-scale", type=finite_float, default=None,
                   help="--layer-decay: layers whose LR scale is below this are frozen")
    g.add_argument("--worker-seeding", type=str, default="all",
                   help="loader worker seeding: all (every sample here is seeded from the seed, "
                        "epoch and index)")
    g.add_argument("--use-multi-epochs-loader", action="store_true", default=False,
                   help="accepted: loader workers persist across epochs here anyway")
    g.add_argument("--save-images", action="store_true", default=False,
                   help="write the training input as train-batch-<i>.jpg at each log interval")
    _augmix_flags(g)


def _augmix_flags(g) -> None:
    """timm's AugMix splits: clean and augmented views of each image, JSD loss, split BN."""
    g.add_argument("--aug-splits", type=int, default=0, metavar="N",
                   help="views per image: a clean one and N-1 augmented (0: off; 3 for AugMix)")
    g.add_argument("--jsd-loss", action="store_true", default=False,
                   help="Jensen-Shannon divergence + cross-entropy over the splits")
    g.add_argument("--resplit", action="store_true", default=False,
                   help="random erasing leaves the clean split alone")
    g.add_argument("--split-bn", action="store_true", default=False,
                   help="BatchNorm statistics per augmentation split")


def _size_flags(p) -> None:
    """train.py's variable-size training (timm's ScheduledBatchSampler)."""
    g = p.add_argument_group("Variable-size training parameters")
    g.add_argument("--train-img-sizes", type=int, nargs="+", default=None, metavar="N",
                   help="image sizes to train at, one chosen per batch")
    g.add_argument("--train-batch-sizes", type=int, nargs="+", default=None, metavar="N",
                   help="the batch size of each --train-img-sizes entry (default: -b for all)")
    g.add_argument("--train-size-probs", type=finite_float, nargs="+", default=None,
                   metavar="P", help="weights of the sizes (default: equal)")
    g.add_argument("--train-size-schedule", type=str, default="constant",
                   choices=["constant", "progressive"],
                   help="constant mix, or from the first size to the last over the run")
    g.add_argument("--train-size-schedule-spread", type=finite_float, default=0.65,
                   help="progressive schedule: how wide each epoch's mix is")
    g.add_argument("--train-size-random-mix", type=finite_float, default=0.1,
                   help="progressive schedule: share of uniformly drawn sizes")
    g.add_argument("--train-batches-per-epoch", "--train-steps-per-epoch", type=int,
                   default=None, metavar="N",
                   help="fixed batches per epoch (default: the epoch's images)")
    g.add_argument("--variable-batch-loss-scale", type=str, default="none",
                   choices=["none", "sqrt", "linear"],
                   help="scale each batch's loss by its size over the average batch")


def _naflex_flags(p, training: bool = True) -> None:
    """timm's NaFlex loader: NaFlexVit models trained on token-budget batches of patch
    sequences (train.py) and evaluated at one sequence length (both)."""
    g = p.add_argument_group("NaFlex loader parameters")
    if not training:
        g.add_argument("--naflex-loader", action="store_true", default=None,
                       help="evaluate through timm's NaFlex pipeline (a NaFlex model; default: "
                            "as the checkpoint was trained)")
        g.add_argument("--naflex-max-seq-len", type=int, default=None, metavar="N",
                       help="patches per evaluated image (default: training's, else 576)")
        return
    g.add_argument("--naflex-loader", action="store_true", default=False,
                   help="train on timm's NaFlex batches of patch sequences (a NaFlex model, "
                        "e.g. naflexvit_base_patch16_gap)")
    g.add_argument("--naflex-train-seq-lens", type=int, nargs="+",
                   default=[128, 256, 576, 784, 1024], metavar="N",
                   help="the training sequence lengths (patches per image), one per batch")
    g.add_argument("--naflex-max-seq-len", type=int, default=576, metavar="N",
                   help="patches per image in validation")
    g.add_argument("--naflex-patch-sizes", type=int, nargs="+", default=None, metavar="N",
                   help="patch sizes to train at, one drawn per batch (default: the model's)")
    g.add_argument("--naflex-patch-size-probs", type=finite_float, nargs="+", default=None,
                   metavar="P", help="weights of --naflex-patch-sizes (default: equal)")
    g.add_argument("--naflex-loss-scale", type=str, default="linear",
                   choices=["none", "sqrt", "linear"],
                   help="scale each batch's loss by its size over -b")
    g.add_argument("--naflex-patchify-channels-first", action="store_true", default=False,
                   help="patches flattened channels-first (C-P-P) instead of P-P-C")


def _distill_flags(p) -> None:
    """train.py's knowledge distillation parameters (timm's group)."""
    g = p.add_argument_group("Knowledge distillation parameters")
    g.add_argument("--kd-model-name", default=None, type=str,
                   help="teacher model (timm name) for knowledge distillation")
    g.add_argument("--kd-pretrained-path", default=None, metavar="FILE",
                   help="the teacher's weights file (default: timm's cached pretrained weights)")
    g.add_argument("--kd-distill-type", default="logit", choices=["logit", "feature", "token"],
                   help="what the student learns from the teacher")
    g.add_argument("--kd-loss-type", default="kl", type=str,
                   help="distillation loss (kl for logits, mse for features)")
    g.add_argument("--distill-loss-weight", default=None, type=finite_float,
                   help="weight of the distillation loss (default: timm's rule)")
    g.add_argument("--task-loss-weight", default=None, type=finite_float,
                   help="weight of the task loss (default: timm's rule)")
    g.add_argument("--kd-temperature", default=4.0, type=finite_float,
                   help="logit distillation temperature")
    g.add_argument("--kd-student-feature-dim", default=None, type=int,
                   help="feature distillation: the student's feature width (default: inferred)")
    g.add_argument("--kd-teacher-feature-dim", default=None, type=int,
                   help="feature distillation: the teacher's feature width (default: inferred)")
    g.add_argument("--kd-token-distill-type", default="soft", choices=["soft", "hard"],
                   help="token distillation: soft (KL) or hard (the teacher's argmax)")


def _test_time_flags(p) -> None:
    """validate.py's flags of timm's: the evaluation transform, the model, the metrics."""
    g = p.add_argument_group("timm's validate.py options")
    g.add_argument("--in-chans", type=int, default=None, metavar="N",
                   help="input image channels (default: 3; images are loaded as RGB)")
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N",
                   help="input dimensions C H W (overrides --img-size)")
    g.add_argument("--use-train-size", action="store_true", default=False,
                   help="files without a recorded transform: the model's training size, not its "
                        "test size")
    g.add_argument("--crop-mode", default=None, type=str, help="center, squash or border")
    g.add_argument("--crop-border-pixels", type=int, default=None,
                   help="crop this many pixels off each border before resizing")
    g.add_argument("--mean", type=finite_float, nargs="+", default=None, metavar="MEAN",
                   help="per-channel normalisation mean")
    g.add_argument("--std", type=finite_float, nargs="+", default=None, metavar="STD",
                   help="per-channel normalisation std")
    g.add_argument("--interpolation", default="", type=str, help="resize interpolation")
    g.add_argument("--gp", default=None, type=str, metavar="POOL", help="global pool type")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   metavar="KEY=VALUE", help="extra keyword arguments for timm.create_model")
    g.add_argument("--test-pool", action="store_true", default=False,
                   help="timm's test-time pooling for inputs larger than the training size")
    g.add_argument("--reparam", action="store_true", default=False,
                   help="reparameterize the model (timm's reparameterize_model) before evaluating")
    g.add_argument("--torchcompile", nargs="?", type=str, default=None, const="inductor",
                   help="torch.compile the model with this backend (default when given: inductor)")
    _speed_flags(g, training=False)
    g.add_argument("--log-freq", default=10, type=int, metavar="N",
                   help="a progress line every N batches where there is no progress bar")
    g.add_argument("--num-gpu", type=int, default=1,
                   help="1 (for more devices: torchrun --nproc-per-node N validate.py)")
    g.add_argument("--no-prefetcher", action="store_true", default=False,
                   help="accepted for timm compatibility")
    g.add_argument("--pin-mem", action="store_true", default=False,
                   help="accepted for timm compatibility (memory is pinned whenever on CUDA)")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    _metric_flags(g)


def _metric_flags(g) -> None:
    """validate.py's label sets, metrics and retry."""
    g.add_argument("--real-labels", default="", type=str, metavar="FILENAME",
                   help="ImageNet ReaL labels (real.json): top-1/5 against them")
    g.add_argument("--valid-labels", default="", type=str, metavar="FILENAME",
                   help="score only these class indices (one per line)")
    g.add_argument("--retry", default=False, action="store_true",
                   help="on out of memory, retry with a smaller batch")
    g.add_argument("--metrics-avg", type=str, default=None, choices=["micro", "macro", "weighted"],
                   help="also precision, recall and F1 with this averaging (needs scikit-learn)")
