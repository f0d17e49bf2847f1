"""The EMA library: `ModelEma` and what it is made of.

``from ematrain.ema import ModelEma`` (or ``from ematrain import ModelEma``). The modules:

* `model_ema`: `ModelEma`, one or several shadows of a model in one fused update
  (`_fused`: the update plan, private), an `nn.Module` with timm V3's surface (`timm_v3`).
* `devices`: shadows on another device (`WeightSwapper`, the background host averager).
* `schedules`: each update's decay (constant, timm, debias, power); `half_life`: horizons in
  steps, epochs or images; `horizons`: what a horizon really is under a schedule.
* `policies`: BatchNorm statistics of the shadows and switch-EMA at an epoch's end.
* `collection`: a run's EMAs as one collection.
"""
from ..util.exports import lazy_exports

_NAMES = {
    "ModelEma": ".model_ema",
    "WeightSwapper": ".devices",
    "EmaCollection": ".collection",
    "EmaSchedule": ".schedules", "Constant": ".schedules", "TimmWarmup": ".schedules",
    "Debias": ".schedules", "Power": ".schedules", "SCHEDULES": ".schedules",
    "make_schedule": ".schedules", "schedule_for": ".schedules", "warmup_decay": ".schedules",
    "sigma_rel_to_gamma": ".schedules", "gamma_to_sigma_rel": ".schedules",
    "SIGMA_REL_MIN": ".schedules", "SIGMA_REL_MAX": ".schedules",
    "HalfLife": ".half_life", "parse_half_life": ".half_life",
    "decay_from_half_life": ".half_life", "half_life_from_decay": ".half_life",
    "effective_half_lives": ".horizons", "start_shares": ".horizons", "RunLength": ".horizons",
    "ShadowPolicy": ".policies",
    # Re-exported where earlier versions' ematrain.ema had it.
    "unwrap_model": "ematrain.util.modules",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
