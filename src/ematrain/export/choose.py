"""Which weights `export` hands out: one weight set of a checkpoint, found in a run folder or
a file, with what the run knew of it (its EMA's decay or sigma_rel, its epoch, the numbers it
logged for it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt_io
from ..run.checkpoint_files import LAST
from ..run.weight_sets import WeightSet, regular_emas, weight_sets
from ..util.errors import UserError

POSTHOC_BEST = "model_posthoc_best.pth.tar"
METRICS = ("top1", "top5", "loss")


@dataclass
class Chosen:
    """One set of weights to export and what describes it.

    Attributes:
        state: the weights (plain module keys).
        ckpt: the checkpoint they were read from (its arch, args, data_config, class names).
        weights: the set's name as the run gives it (``raw``, ``ema 0.99``, ``posthoc ...``).
        kind: ``raw``, ``ema``, ``posthoc`` or ``average``.
        decay, sigma_rel: the EMA's per-step decay, or its sigma_rel (power schedule; post-hoc).
        epoch: the last complete epoch of those weights (None for a post-hoc reconstruction).
        logged: the numbers the run logged for them (top1, top5, loss), when it did.
        sources: the files they come from.
    """
    state: dict
    ckpt: dict
    weights: str
    kind: str
    decay: float | None = None
    sigma_rel: float | None = None
    epoch: int | None = None
    logged: dict | None = None
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def sets_of(ckpt: dict) -> tuple[WeightSet, ...]:
    """The weight sets a checkpoint of ours names (raw first, then its EMAs)."""
    meta = ckpt.get("ema") if isinstance(ckpt.get("ema"), dict) else {}
    power = (meta.get("schedule") or {}).get("name") == "power"
    args = ckpt_io.args_dict(ckpt)
    return weight_sets([float(d) for d in meta.get("decays", [])], tag="sr" if power else "",
                       names=meta.get("names") or None,
                       primary=args.get("primary_weights", "raw"))


def ema_text(choice: str) -> str:
    """``ema0.99``, ``ema 0.99``, ``ema_hl2ep`` -> ``0.99``, ``hl2ep``."""
    return choice.removeprefix("ema").strip(" _-")


def shadow_index(ckpt: dict, choice: str, path) -> int | None:
    """The EMA shadow `choice` names, or None for the raw weights."""
    if choice == "raw":
        return None
    if not ckpt_io.ema_keys(ckpt):
        raise UserError(f"{path} holds no EMA weights; --weights raw exports the raw weights")
    text = ema_text(choice)
    return 0 if not text else ckpt_io.ema_index_for_decay(ckpt, text, path)


def weight_set(ckpt: dict, index: int | None) -> WeightSet | None:
    """The run's weight set of the raw weights (`index` None) or of EMA shadow `index`."""
    sets = sets_of(ckpt)
    if index is None:
        return sets[0]
    emas = regular_emas(sets)
    return emas[index] if index < len(emas) else None


def logged(ckpt: dict, ws: WeightSet | None, epoch) -> dict | None:
    """The numbers the run logged for `ws` at `epoch` (its summary.csv row), if any."""
    rows = (ckpt.get("summary") or {}).get("rows") or []
    row = next((r for r in rows if r.get("epoch") == epoch), None)
    if row is None or ws is None:
        return None
    found = {m: row.get(f"{ws.column_prefix}eval_{m}") for m in METRICS}
    return found if all(v is not None for v in found.values()) else None


def from_checkpoint(ckpt: dict, path: Path, choice: str) -> Chosen:
    """The raw weights or an EMA of one checkpoint."""
    index = shadow_index(ckpt, choice, path)
    picked = ckpt_io.select_weights(ckpt, path, use_ema=index is not None, ema_index=index)
    ws = weight_set(ckpt, index)
    epoch = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None
    chosen = Chosen(picked.state, ckpt, picked.name, "raw" if index is None else "ema",
                    epoch=epoch, logged=logged(ckpt, ws, epoch),
                    sources=[str(Path(path).resolve())])
    if index is not None:
        decays = ckpt_io.ema_decays(ckpt)
        power = ((ckpt.get("ema") or {}).get("schedule") or {}).get("name") == "power"
        value = decays[index] if index < len(decays) else None
        chosen.sigma_rel, chosen.decay = (value, None) if power else (None, value)
    return chosen


def from_posthoc(ckpt: dict, path: Path) -> Chosen:
    """The best post-hoc reconstruction validate.py --posthoc kept."""
    info = ckpt.get("posthoc")
    if not isinstance(info, dict):
        raise UserError(f"{path} is not a post-hoc result (no 'posthoc'); validate.py --posthoc "
                        f"RUN_DIR writes {POSTHOC_BEST}")
    picked = ckpt_io.select_weights(ckpt, path, use_ema=True)
    scores = {m: info.get(m) for m in METRICS if info.get(m) is not None}
    chosen = Chosen(picked.state, ckpt, picked.name.removeprefix("ema "), "posthoc",
                    sigma_rel=info.get("sigma_rel"), logged=scores or None,
                    sources=[str(Path(path).resolve())])
    if info.get("half_life_epochs") is not None:  # the name already says the fit error
        chosen.notes.append(f"a half-life of {info['half_life_epochs']:.3g} epochs")
    return chosen


def run_file(run_dir: Path, choice: str) -> tuple[Path, str | None]:
    """The file of a run folder that keeps `choice` at its best epoch: the set's best file
    (timm's model_best.pth.tar for the primary set), else last.pth.tar; and a note on it."""
    if choice == "posthoc-best":
        path = run_dir / POSTHOC_BEST
        if not path.is_file():
            raise UserError(f"{run_dir} has no {POSTHOC_BEST}: run validate.py DATA --posthoc "
                            f"{run_dir} first")
        return path, None
    last = run_dir / LAST
    if not last.is_file():
        raise UserError(f"{run_dir} is not a run folder of ours: it has no {LAST}")
    ckpt = ckpt_io.load_file(last)
    ws = weight_set(ckpt, shadow_index(ckpt, choice, last))
    if ws is not None and ws.best_file and (run_dir / ws.best_file).is_file():
        return run_dir / ws.best_file, f"its best epoch: {ws.best_file}"
    return last, "the last epoch (the run keeps no best file of these weights)"


def choose(source: Path, choice: str | None) -> Chosen:
    """The weights `choice` (None: the first EMA when there is one, else the raw weights, as
    timm's clean_checkpoint.py) of `source`, a checkpoint or a run folder."""
    if source.is_dir():
        if choice is None:
            last = source / LAST
            choice = "ema" if last.is_file() and ckpt_io.ema_keys(ckpt_io.load_file(last)) \
                else "raw"
        path, note = run_file(source, choice)
    else:
        path, note = source, None
    ckpt = ckpt_io.load_file(path)
    if choice is None:
        choice = "ema" if ckpt_io.ema_keys(ckpt) else "raw"
    chosen = from_posthoc(ckpt, path) if choice == "posthoc-best" else from_checkpoint(
        ckpt, path, choice)
    if note:
        chosen.notes.append(note)
    return chosen
