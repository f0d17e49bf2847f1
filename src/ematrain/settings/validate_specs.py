"""validate.py's settings: which weights of a checkpoint to evaluate (`WeightChoice`), everything
else it was asked for (`ValidateSettings`, --posthoc's targets included), resolved once."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..data.readers.spec import DatasetSpec
from ..ema.half_life import parse_half_life
from ..util.distributed import device_named
from ..util.errors import UserError
from ..util.runtime import check_compile_mode
from .checks import at_least, at_most, check_sigma_rels, from_args
from .data_specs import CROP_MODES, ImageSpec, LoaderSpec, NaflexSpec, dataset_spec
from .flags import validate_parser
from .layers import parse_command
from .model_specs import PrecisionSpec

MAX_TARGETS = 32


# ----------------------------------------------------------------------------- validate.py
@dataclass(frozen=True)
class WeightChoice:
    """Which weights of a checkpoint validate.py evaluates."""
    use_ema: bool
    ema_decay: str | None  # a decay or a shadow's name (`checkpoint.weights.ema_index_for_decay`)
    ema_index: int | None

    def __post_init__(self):
        at_least(self, 0, "ema_index")

    @property
    def wants_ema(self) -> bool:
        return self.use_ema or self.ema_index is not None or self.ema_decay is not None


@dataclass(frozen=True)
class SelectSpec:
    """validate.py --posthoc's selection protocol (`posthoc.selection`): where the best weight
    set is chosen, and by what."""
    select_split: str | None = None
    select_fraction: float | None = None
    select_seed: int = 0
    select_metric: str | None = None

    def __post_init__(self):
        if self.select_split is not None and self.select_fraction is not None:
            raise UserError("--select-split and --select-fraction are two ways to choose on "
                            "other images than the reported ones: give one")
        if self.select_split is not None and not self.select_split.strip():
            raise UserError("--select-split: give a split folder name")
        if self.select_fraction is not None and not 0.0 < self.select_fraction < 1.0:
            raise UserError(f"--select-fraction is the part of --split that chooses, in (0, 1), "
                            f"got {self.select_fraction:g}")
        at_least(self, 0, "select_seed")

    @property
    def given(self) -> list[str]:
        """The --select-* flags given."""
        return [f"--{f.name.replace('_', '-')}" for f in fields(self)
                if getattr(self, f.name) != f.default]


@dataclass(frozen=True)
class TestTimeSpec:
    """timm validate.py's options: the evaluation transform beyond ImageSpec's fields, the
    model as evaluated, the label sets and metrics, and how the pass runs."""
    use_train_size: bool = False
    crop_mode: str | None = None
    crop_border_pixels: int | None = None
    test_pool: bool = False
    in_chans: int | None = None
    gp: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    reparam: bool = False
    torchcompile: str | None = None
    torchcompile_mode: str | None = None
    fast_norm: bool = False
    real_labels: str = ""
    valid_labels: str = ""
    metrics_avg: str | None = None
    retry: bool = False
    log_freq: int = 10
    num_gpu: int = 1
    seed: int = 42

    FLAGS = {"gp": "--gp"}

    def __post_init__(self):
        if self.crop_mode not in (None, "") + CROP_MODES:
            raise UserError(f"--crop-mode must be one of {', '.join(CROP_MODES)}, got "
                            f"{self.crop_mode!r}")
        at_least(self, 0, "crop_border_pixels")
        at_least(self, 1, "log_freq")
        if self.num_gpu != 1:
            raise UserError(f"--num-gpu {self.num_gpu}: one device per process here; for more "
                            f"use torchrun --nproc-per-node {self.num_gpu} validate.py (the "
                            f"numbers of one process)")
        if self.in_chans is not None and self.in_chans != 3:
            raise UserError(f"--in-chans {self.in_chans}: ImageFolder images are loaded as RGB, "
                            f"so only 3 channels are supported")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be in [0, 2**32 - 1], got {self.seed}")
        check_compile_mode(self.torchcompile_mode, self.torchcompile)
        for flag, path in (("--real-labels", self.real_labels),
                           ("--valid-labels", self.valid_labels)):
            if path and not Path(path).is_file():
                raise UserError(f"{flag} file not found: {path}")

    def model_kwargs_given(self) -> dict:
        """create_model arguments the flags give (over what the checkpoint records)."""
        named = {"global_pool": self.gp, "in_chans": self.in_chans}
        return {**{k: v for k, v in named.items() if v is not None}, **self.model_kwargs}


@dataclass(frozen=True)
class ValidateSettings:
    """Everything validate.py was asked for, checked."""
    args: argparse.Namespace
    data_dir: str | None
    split: str
    checkpoint: str | None
    pretrained: bool
    pretrained_path: str | None
    posthoc: str | None
    sigma_rel: list | None
    half_life: list | None
    model: str | None
    num_classes: int | None
    device: str | None
    results_file: str
    results_format: str | None
    image: ImageSpec
    loader: LoaderSpec
    choice: WeightChoice
    precision: PrecisionSpec
    dataset: DatasetSpec
    select: SelectSpec
    test: TestTimeSpec = field(default_factory=TestTimeSpec)
    naflex: NaflexSpec = field(default_factory=NaflexSpec)

    def __post_init__(self):
        if not self.data_dir and not self.dataset.dataset:
            raise UserError("no data root given: validate.py DIR --checkpoint PATH")
        sources = [f for f, on in (("--checkpoint", self.checkpoint),
                                   ("--pretrained-path", self.pretrained_path),
                                   ("--pretrained", self.pretrained),
                                   ("--posthoc", self.posthoc)) if on]
        if len(sources) != 1:
            raise UserError("give the weights to evaluate: --checkpoint PATH, --posthoc RUN_DIR, "
                            "or --model NAME with --pretrained-path FILE or --pretrained"
                            + (f" (not {' and '.join(sources)})" if sources else ""))
        if self.pretrained and not self.model:
            raise UserError("--pretrained needs --model NAME")
        if self.pretrained and self.choice.wants_ema:
            raise UserError("--pretrained loads timm's released weights: they have no EMA to pick")
        if not self.posthoc and (self.sigma_rel is not None or self.half_life is not None):
            raise UserError("--sigma-rel and --half-life choose what --posthoc reconstructs: "
                            "give --posthoc RUN_DIR")
        if self.posthoc and (self.choice.wants_ema or self.model or self.results_file):
            raise UserError("--posthoc scores its own weight sets from the run's snapshots: "
                            "--use-ema, --ema-decay, --ema-index, --model and --results-file "
                            "do not apply")
        if not self.posthoc and self.select.given:
            raise UserError(f"{' and '.join(self.select.given)} choose(s) among --posthoc's "
                            f"weight sets: give --posthoc RUN_DIR")
        if self.select.select_split == self.split:
            raise UserError(f"--select-split {self.select.select_split} is the --split that is "
                            f"reported: choose on another split, or with --select-fraction")
        check_sigma_rels("--sigma-rel", self.sigma_rel, MAX_TARGETS)
        at_most("--half-life", self.half_life, MAX_TARGETS, "each is one more EMA to form")
        if self.device:
            device_named(self.device)
        for text in self.half_life or []:
            try:
                parse_half_life(str(text))
            except ValueError as exc:
                raise UserError(f"--half-life: {exc}") from None
        at_least(self, 1, "num_classes")
        if self.results_file:
            path = Path(self.results_file)
            if self.results_format is None and path.suffix not in (".json", ".csv"):
                raise UserError(f"--results-file must end in .json or .csv (or give "
                                f"--results-format): {path}")
            if not path.parent.is_dir():
                raise UserError(f"--results-file directory does not exist: {path.parent}")

    @property
    def source(self) -> str:
        """The file the weights come from, or timm's name for its cache."""
        return self.checkpoint or self.pretrained_path or f"timm's pretrained {self.model}"

    @property
    def results_kind(self) -> str:
        """csv or json: --results-format, else the results file's suffix."""
        return self.results_format or Path(self.results_file).suffix.lstrip(".")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "ValidateSettings":
        parts = {"image": ImageSpec, "loader": LoaderSpec, "choice": WeightChoice,
                 "precision": PrecisionSpec, "select": SelectSpec, "test": TestTimeSpec,
                 "naflex": NaflexSpec}
        own = {f.name: getattr(ns, f.name) for f in fields(cls)
               if f.name not in ("args", "dataset") and f.name not in parts}
        return cls(args=ns, **{name: from_args(spec, ns) for name, spec in parts.items()},
                   dataset=dataset_spec(ns, train=False), **own)


def validate_settings(argv: list[str]) -> ValidateSettings:
    """validate.py's settings from its command line."""
    return ValidateSettings.from_args(parse_command(validate_parser, [str(a) for a in argv]))
