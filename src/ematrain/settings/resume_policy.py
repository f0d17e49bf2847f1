"""Resuming a run, while its settings resolve: which checkpoint, and what becomes of every setting
it recorded (the restore of its parts, once the run is built, is `run.restore`'s).

A checkpoint of ours records every setting of its run (`args`), and `train.py --resume PATH` alone
continues the run with them. Flags given beside it (or in a `-c` recipe) go through
`RESUME_POLICY`: for each setting whose value differs from the recorded one, the table says
whether the checkpoint's value is kept, the new one applies, or the resume is refused, and why.
Nothing is replaced or dropped without a line saying so.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import schema, timm_checkpoints
from ..checkpoint.files import load_file
from ..checkpoint.schema import is_ours, peek
from ..util.errors import UserError
from ..util.logs import log
from .flags import DEFAULT_OUTPUT

KEEP = "checkpoint wins"              # the recorded value is kept; a notice names the ignored one
NEW = "command line wins"             # the new value applies from here on, with a notice
REFUSE = "refused"                    # the resume stops with one line
MID_EPOCH = "refused mid-epoch"       # refused in the middle of an epoch, else as NEW
FRESH_OPTIMIZER = "needs --no-resume-opt"  # the saved optimizer state would undo it


@dataclass(frozen=True)
class Rule:
    setting: str  # a flag's dest, or what the checkpoint records otherwise (class_names, ...)
    policy: str
    why: str


_OPT_WHY = "the saved optimizer state carries the old value"
RESUME_POLICY: tuple[Rule, ...] = (
    Rule("model", REFUSE, "the weights are that architecture's"),
    Rule("gp", REFUSE, "the pooling changes what the weights compute"),
    Rule("model_kwargs", REFUSE, "they shape the network the weights belong to"),
    Rule("in_chans", REFUSE, "the stem's weights have the recorded channels"),
    Rule("num_classes", REFUSE, "the classifier has the recorded outputs"),
    Rule("class_names", REFUSE, "labels are class-folder positions: other folders shift them"),
    Rule("model_ema", REFUSE, "the checkpoint's EMA state would be dropped, or made up"),
    Rule("model_ema_decay", REFUSE, "each EMA shadow is the average at its own decay"),
    Rule("model_ema_half_life", REFUSE, "each EMA shadow is the average over its own horizon"),
    Rule("model_ema_sigma_rel", REFUSE, "each power EMA shadow is the average of its own profile"),
    Rule("model_ema_power_gamma", REFUSE, "each power EMA shadow is the average of its own "
         "profile"),
    Rule("model_ema_schedule", NEW, "the decays follow the new schedule from the resumed step "
         "on (its decays depend on the step count only); to or from power is refused, as its "
         "shadows are named by sigma_rel, not by a decay"),
    Rule("model_ema_bn", NEW, "the shadows' BatchNorm statistics are set before each "
         "validation from here on"),
    Rule("model_ema_bn_batches", NEW, "the shadows' BatchNorm statistics are set before each "
         "validation from here on"),
    Rule("model_ema_switch", NEW, "the live model takes the EMA's weights at each epoch's end "
         "from here on"),
    Rule("model_ema_posthoc", REFUSE, "each power EMA and its snapshot series is its own "
         "profile: another set would leave the series without its state, or mix profiles"),
    Rule("model_ema_snapshot_dtype", REFUSE, "the snapshots of one series share one dtype"),
    Rule("model_ema_snapshot_every", NEW, "the series stays one series at any spacing: later "
         "snapshots follow the new interval"),
    Rule("seed", KEEP, "data order, augmentation and dropout follow the seed: another one "
         "would make the rest no continuation of this run"),
    Rule("primary_weights", KEEP, "summary.csv's eval_* columns, model_best.pth.tar and the "
         "history keep one meaning for the whole run (runs saved before the setting existed "
         "keep the raw weights there)"),
    Rule("output", KEEP, "a resumed run continues in its own folder"),
    Rule("experiment", KEEP, "a resumed run continues in its own folder"),
    Rule("batch_size", MID_EPOCH, "the position within the epoch is counted in batches; a "
         "half-life keeps its horizon (the per-step decay follows)"),
    Rule("grad_accum_steps", MID_EPOCH, "the position within the epoch is counted in batches"),
    Rule("aug_repeats", MID_EPOCH, "it reorders the epoch's samples"),
    Rule("world_size", MID_EPOCH, "each process's share of the epoch depends on it"),
    Rule("dataset", MID_EPOCH, "the epoch's samples and their order are its reader's"),
    Rule("train_split", MID_EPOCH, "the epoch's samples are the split's"),
    Rule("train_num_samples", MID_EPOCH, "a stream's steps per epoch follow from it"),
    Rule("epoch_repeats", MID_EPOCH, "a stream's steps per epoch follow from it"),
    Rule("data_stream", KEEP, "a stream (wds/, hfids/) resumes where it stood: at an epoch's "
         "end its order comes from (seed, epoch) alone; mid-epoch each loader worker replays "
         "its raw stream to its saved position without decoding it, bit-identical, given the "
         "same processes and -j (else refused in one line, as under torchrun with "
         "--corrupt-samples skip: resume from the epoch's checkpoint)"),
    Rule("opt", FRESH_OPTIMIZER, "the saved optimizer state is the old optimizer's"),
    Rule("momentum", FRESH_OPTIMIZER, _OPT_WHY),
    Rule("weight_decay", FRESH_OPTIMIZER, _OPT_WHY),
    Rule("opt_eps", FRESH_OPTIMIZER, _OPT_WHY),
    Rule("opt_betas", FRESH_OPTIMIZER, _OPT_WHY),
    Rule("opt_kwargs", FRESH_OPTIMIZER, _OPT_WHY),
    Rule("layer_decay", FRESH_OPTIMIZER, _OPT_WHY),
    Rule("layer_decay_min_scale", FRESH_OPTIMIZER, _OPT_WHY),
    Rule("layer_decay_no_opt_scale", FRESH_OPTIMIZER, "the frozen layers have no optimizer "
         "state; the saved state is of the old split"),
    Rule("start_epoch", REFUSE, "a resumed run goes on where its checkpoint is; --start-epoch "
         "places a new run"),
    Rule("kd_model_name", REFUSE, "the run distills from its teacher: another makes the rest no "
         "continuation of this run"),
    Rule("kd_pretrained_path", REFUSE, "the run distills from its teacher's weights"),
    Rule("kd_distill_type", REFUSE, "the loss of the run is that kind of distillation"),
    *(Rule(key, REFUSE, "feature distillation's projection (the checkpoint's `task_state`) "
           "has the recorded widths") for key in ("kd_student_feature_dim",
                                                  "kd_teacher_feature_dim")),
    Rule("aug_splits", REFUSE, "the BatchNorm statistics and the batches are of that many "
         "augmentation splits"),
    Rule("split_bn", REFUSE, "the weights hold (or lack) per-split BatchNorm layers"),
    *(Rule(key, MID_EPOCH, "they make the epoch's batches: the position within it is counted "
           "in them") for key in ("train_img_sizes", "train_batch_sizes", "train_size_probs",
                                  "train_size_schedule", "train_size_schedule_spread",
                                  "train_size_random_mix", "train_batches_per_epoch")),
    *(Rule(key, MID_EPOCH, "they make the epoch's NaFlex batches: the position within it is "
           "counted in them") for key in ("naflex_loader", "naflex_train_seq_lens",
                                          "naflex_patch_sizes", "naflex_patch_size_probs")),
    Rule("naflex_patchify_channels_first", REFUSE, "the patch embedding's weights read patches "
         "in the recorded layout"),
    Rule("log_wandb", NEW, "W&B logs from the resumed step on, into the W&B run the checkpoint "
         "names (its `trackers` key) when it has one, else a new one"),
    Rule("wandb_project", NEW, "for a W&B run started on resume; the run the checkpoint names "
         "goes on in its own project"),
    Rule("wandb_resume_id", NEW, "the W&B run to continue instead of the one the checkpoint "
         "names (as timm's train.py: it must exist)"),
    Rule("log_tensorboard", NEW, "TensorBoard logs from the resumed step on; in the same folder "
         "its steps after the checkpoint are purged, so each step shows once"),
)
# Every other setting (epochs, the LR and its schedule, the EMA interval and warmup, the
# augmentation, ...) applies from the resumed step on.
DEFAULT_RULE = Rule("*", NEW, "it applies from here on")
RULES = {rule.setting: rule for rule in RESUME_POLICY}
# Settings that say how to start this process, not what the run is.
_NOT_COMPARED = {"config", "resume", "data", "no_resume_opt"}
# The scheduler's saved state holds these settings: when one changes it is rebuilt instead.
SCHEDULE_SETTINGS = {"sched", "epochs", "warmup_epochs", "warmup_lr", "min_lr", "cooldown_epochs",
                     "decay_epochs", "decay_rate", "decay_milestones", "patience_epochs",
                     "warmup_prefix", "lr_noise", "lr_noise_pct", "lr_noise_std", "lr_cycle_mul",
                     "lr_cycle_decay", "lr_cycle_limit", "lr_k_decay", "sched_on_updates", "lr",
                     "lr_base", "lr_base_size", "lr_base_scale", "eval_metric",
                     # The global batch sets the LR (--lr-base) and the updates per epoch.
                     "batch_size", "grad_accum_steps", "world_size",
                     # Variable-size training sets the batches per epoch and the LR's batch.
                     "train_img_sizes", "train_batch_sizes", "train_size_probs",
                     "train_size_schedule", "train_batches_per_epoch",
                     # So do NaFlex batches.
                     "naflex_loader", "naflex_train_seq_lens"}


def policy_markdown() -> str:
    """The table as the README shows it."""
    lines = ["| setting | on resume | why |", "|---|---|---|"]
    lines += [f"| `{r.setting}` | {r.policy} | {r.why} |" for r in RESUME_POLICY + (DEFAULT_RULE,)]
    return "\n".join(lines).replace("| `*` |", "| every other setting |")


@dataclass
class ResumeSource:
    """The checkpoint a run resumes from."""
    path: Path
    ckpt: dict
    changed: set = field(default_factory=set)  # settings whose new value applies

    @property
    def recorded(self) -> dict | None:
        """Every setting of the run, for checkpoints of ours; None for timm's and others'."""
        if not is_ours(self.ckpt):
            return None
        # Before --primary-weights, summary.csv's eval_* and model_best.pth.tar were the raw
        # weights': a run saved then goes on as it began.
        return {"primary_weights": "raw", **self.ckpt["args"]}

    @property
    def mid_epoch(self) -> bool:
        return bool(self.ckpt.get("counters", {}).get("epoch_step"))


def find_checkpoint(resume: str, output: str, experiment: str, model: str = "") -> Path | None:
    """--resume PATH, or with 'auto' the newer of the run's last and recovery checkpoints: the
    run `experiment` names, or without one the newest unfinished run of `model` under
    `output` (`newest_unfinished_run`)."""
    if not resume:
        return None
    if resume != "auto":
        return Path(resume)
    if not experiment:
        return newest_unfinished_run(Path(output) if output else DEFAULT_OUTPUT, model)
    run_dir = Path(output) / experiment if output else DEFAULT_OUTPUT / experiment
    # Runs from before ematrain followed timm's layout lie in <--output>/train/<experiment>.
    for folder in (run_dir, Path(output) / "train" / experiment) if output else (run_dir,):
        found = _latest_checkpoint(folder)
        if found:
            return found
    log.info(f"--resume auto: no checkpoint in {run_dir}, starting fresh")
    return None


_CHECKPOINTS = ("last.pth.tar", "recovery.pth.tar")


def _latest_checkpoint(folder: Path) -> Path | None:
    found = [folder / name for name in _CHECKPOINTS if (folder / name).is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def planned_epochs(args: dict) -> int:
    """The epochs a run's recorded settings train, as timm's create_scheduler_v2 counts them:
    --epochs, for the cycle schedules (cosine, tanh, poly) times the cycles with the warmup
    prefix, plus --cooldown-epochs."""
    epochs = int(args.get("epochs") or 0)
    if args.get("sched", "cosine") not in ("cosine", "tanh", "poly"):
        return epochs
    cycles, mul = int(args.get("lr_cycle_limit") or 1), float(args.get("lr_cycle_mul") or 1.0)
    total = epochs * cycles if mul == 1.0 else math.floor(epochs * (mul ** cycles - 1) / (mul - 1))
    if args.get("warmup_prefix"):
        total += int(args.get("warmup_epochs") or 0)
    return total + int(args.get("cooldown_epochs") or 0)


def newest_unfinished_run(output: Path, model: str) -> Path | None:
    """--resume auto without --experiment: the newest checkpoint of a `model` run under
    `output` that stopped before its last epoch, said in one line. None (a fresh start) when
    no run of `model` is there; one line naming them when every one has finished."""
    unfinished, finished = [], []
    for folder in sorted(p for p in output.iterdir() if p.is_dir()) if output.is_dir() else []:
        path = _latest_checkpoint(folder)
        seen = peek(path) if path is not None else None
        if seen is None or (seen["arch"] or seen["args"].get("model")) != model:
            continue
        done = int((seen["counters"] or {}).get("epoch", 0)) >= planned_epochs(seen["args"])
        mid = bool((seen["counters"] or {}).get("epoch_step"))
        (finished if done and not mid else unfinished).append((path, seen))
    if unfinished:
        path, seen = max(unfinished, key=lambda c: c[0].stat().st_mtime_ns)
        others = [p.parent.name for p, _ in unfinished if p != path]
        log.info(f"--resume auto: continuing {path.parent} (the newest unfinished {model} run "
                 f"under {output}, at epoch {seen['counters']['epoch']} of "
                 f"{planned_epochs(seen['args'])})"
                 + (f"; also unfinished: {', '.join(others)}" if others else ""))
        return path
    if finished:
        names = ", ".join(p.parent.name for p, _ in finished)
        raise UserError(f"--resume auto: every {model} run under {output} has finished ({names}); "
                        f"give --experiment NAME to continue one with more --epochs, or leave "
                        f"--resume out to start a new run")
    log.info(f"--resume auto: no {model} run under {output}, starting fresh")
    return None


def open_source(path: Path) -> ResumeSource:
    ckpt = load_file(path)
    if "state_dict" not in ckpt or "epoch" not in ckpt:
        raise UserError(f"cannot resume from {path}: not a training checkpoint")
    if not isinstance(ckpt["epoch"], int) or isinstance(ckpt["epoch"], bool):
        raise UserError(f"cannot resume from {path}: its 'epoch' is {ckpt['epoch']!r}, "
                        f"not a whole number")
    return ResumeSource(path, timm_checkpoints.upgrade(schema.upgrade(ckpt)))


# ----------------------------------------------------------------------------- the policy
def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={v!r}" for k, v in value.items()) or "{}"
    return "(unset)" if value in (None, "") else str(value)


def _same(old, new) -> bool:
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)
    return norm(old) == norm(new)


def decide(rule: Rule, source: ResumeSource, old, new, flag: str, fresh_optimizer: bool) -> bool:
    """Apply `rule` to a changed setting: log the notice, or refuse. True: the new value holds."""
    policy = rule.policy
    why = rule.why
    if policy == MID_EPOCH:
        if source.mid_epoch:
            raise UserError(f"cannot resume {source.path} in the middle of an epoch with {flag} "
                            f"{_show(new)} (it records {_show(old)}): {rule.why}")
        policy, why = NEW, DEFAULT_RULE.why
    if policy == FRESH_OPTIMIZER:
        if not fresh_optimizer:
            raise UserError(f"cannot resume {source.path} with {flag} {_show(new)} (it records "
                            f"{_show(old)}): {rule.why}; add --no-resume-opt to start a fresh "
                            f"optimizer")
        policy = NEW
    if policy == REFUSE:
        raise UserError(f"cannot resume from {source.path}: it records {flag} {_show(old)}, this "
                        f"run asks for {_show(new)} ({rule.why})")
    if policy == KEEP:
        log.info(f"resume: keeping {flag} {_show(old)} from the checkpoint, not {_show(new)}: "
                 f"{rule.why}")
        return False
    log.info(f"resume: {flag} {_show(new)} (the checkpoint's run had {_show(old)}): {why}")
    return True


def apply_to_settings(ns: argparse.Namespace, source: ResumeSource) -> None:
    """Compare the parsed settings with the recorded ones and apply the policy to each that
    differs (`ns` holds the recorded values wherever the command line gave none)."""
    recorded = source.recorded or {}
    if not recorded and source.ckpt.get("arch"):
        recorded = {"model": source.ckpt["arch"]}  # timm's checkpoints name their model
    for dest, old in recorded.items():
        if dest in _NOT_COMPARED or not hasattr(ns, dest) or _same(old, getattr(ns, dest)):
            continue
        new = getattr(ns, dest)
        if decide(RULES.get(dest, DEFAULT_RULE), source, old, new, "--" + dest.replace("_", "-"),
                  ns.no_resume_opt):
            source.changed.add(dest)
        else:
            setattr(ns, dest, old)
