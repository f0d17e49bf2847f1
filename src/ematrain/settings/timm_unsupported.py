"""timm train.py settings that ematrain does not implement, and how a recipe may carry them.

timm writes every setting into its args.yaml, so these keys are what lets such a file serve as a
recipe here: at the value that leaves them off they change nothing and are dropped; set to
anything else they are refused by name, never silently ignored.
"""
from __future__ import annotations

from ..util.errors import UserError

# Each unsupported setting with the value that leaves it off.
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
    # timm's variable-size training (NaFlex-era train.py): several image and batch sizes per run.
    "train_img_sizes": None, "train_batch_sizes": None, "train_size_probs": None,
    "train_size_schedule": "constant", "train_size_schedule_spread": 0.65,
    "train_size_random_mix": 0.1, "variable_batch_loss_scale": "none",
    "train_batches_per_epoch": None, "val_interval": 1,
    "layer_decay_min_scale": 0, "layer_decay_no_opt_scale": None,
}
# Settings that only act when another one is on: whatever their value, they are idle while
# their gate is off. Matched by prefix, so timm's variants of these families (NaFlex,
# distillation, wandb) are known.
_TIMM_GATED = {"naflex_": "naflex_loader", "kd_": "kd_model_name",
               "distill_loss_weight": "kd_model_name", "task_loss_weight": "kd_model_name",
               "wandb_": "log_wandb"}


def timm_gate(key: str) -> str | None:
    """The switch that a gated timm setting belongs to, or None."""
    return next((gate for prefix, gate in _TIMM_GATED.items()
                 if key.startswith(prefix) and key != gate), None)


def is_timm_flag(flag: str) -> bool:
    """A command-line word (``--aug-splits`` or ``--aug-splits=3``) naming such a setting."""
    key = flag[2:].split("=")[0].replace("-", "_")
    return key in TIMM_SETTINGS_NOT_SUPPORTED or timm_gate(key) is not None


def _is_off(key: str, value) -> bool:
    return value in (None, "", False, 0, [], {}) or value == TIMM_SETTINGS_NOT_SUPPORTED.get(key)


def refuse_foreign_keys(source: str, extra: dict) -> None:
    """Keys of a recipe that are no flag of ours may only be timm settings left off (the caller
    drops them); a typo, or a timm feature switched on, is an error naming the keys."""
    unknown = sorted(k for k in extra if k not in TIMM_SETTINGS_NOT_SUPPORTED and not timm_gate(k))
    if unknown:
        raise UserError(f"{source}: unknown key(s): {', '.join(unknown)}")
    # A gated setting is part of its gate's feature: only the gate, when on, is reported.
    active = [f"{k}={extra[k]!r}" for k in sorted(extra)
              if timm_gate(k) is None and not _is_off(k, extra[k])]
    if active:
        raise UserError(f"{source}: timm setting(s) ematrain does not support: {', '.join(active)}")
