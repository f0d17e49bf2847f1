"""Run trackers: TensorBoard and Weights & Biases, with the same values under the same names.

`Trackers` (composite) is what a run logs through; `names` builds the values and their tags;
`TrackerSpec` says which trackers a run has, `check_installed` refuses a missing package before
training starts. The writers (`tensorboard_writer`, `wandb_writer`) import their library only
when a run asks for them.
"""
from .composite import Trackers
from .names import best_tags, best_values, epoch_values, interval_values, set_tag
from .spec import INSTALL, TrackerSpec, check_installed

__all__ = ["INSTALL", "TrackerSpec", "Trackers", "best_tags", "best_values", "check_installed",
           "epoch_values", "interval_values", "set_tag"]
