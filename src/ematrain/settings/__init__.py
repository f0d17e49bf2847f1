"""Settings: the command line's flags, resolved once, each with every check of its values.

* `flags`: the flag tables of train.py and validate.py (timm's names and groups).
* `layers`: a checkpoint's recorded settings, a `-c` recipe and the command line, parsed as one.
* `timm_unsupported`: timm's settings ematrain does not implement, and how a recipe carries them.
* `resume_policy`: which checkpoint to resume, and what becomes of each recorded setting.
* the specs: `data_specs` (images, loaders, data, augmentation, labels), `model_specs` (model,
  optimizer, LR schedule, precision), `ema_specs` (EMA, post-hoc EMA), `train_specs` (loop,
  devices, `TrainSettings`, `resolve_train`), `validate_specs` (`ValidateSettings`),
  `tracker_specs` (W&B and TensorBoard); `checks`: what their checks share.

A spec is a frozen dataclass whose fields are flag values; its `__post_init__` holds all the
checks of those values, so the checks of one flag are found next to it. train.py and validate.py
share the specs of what they share (images, loaders). Builders take specs, never the argparse
Namespace; the Namespace itself survives only as the run's record (args.yaml, a checkpoint's
``args``).

``from ematrain.settings import resolve_train, ...``: the names below, imported on use.
"""
from ematrain.util.exports import lazy_exports

_NAMES = {
    **dict.fromkeys(["from_args", "dtype_named", "FLOAT32_MAX"], ".checks"),
    **dict.fromkeys(["MAX_IMAGE_SIZE", "MAX_RATIO", "MAX_JITTER", "ImageSpec", "LoaderSpec",
                     "available_cores", "DataSpec", "AugSpec", "LabelSpec"], ".data_specs"),
    **dict.fromkeys(["ModelSpec", "OptimSpec", "ScheduleSpec", "Precision", "PrecisionSpec"],
                    ".model_specs"),
    **dict.fromkeys(["MAX_SHADOWS", "EmaSpec", "PosthocSpec"], ".ema_specs"),
    **dict.fromkeys(["LoopSpec", "DistSpec", "TrainSettings", "train_settings", "resolve_train"],
                    ".train_specs"),
    **dict.fromkeys(["TRACKER_SETTINGS", "tracker_spec"], ".tracker_specs"),
    **dict.fromkeys(["MAX_TARGETS", "WeightChoice", "ValidateSettings", "validate_settings"],
                    ".validate_specs"),
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
