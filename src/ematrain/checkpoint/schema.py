"""The checkpoint format: its keys, who owns each, and the run's state saved and restored.

A checkpoint has timm's keys, so timm's tools read it, plus ours. Each stateful part of a run
(`Run.parts()`: model, optimizer, scheduler, amp_scaler, emas, snapshots, counters, keeper,
summary, data_stream, trackers, task_state) gives its ``state_dict()`` and takes it back with ``load_state_dict()``; the run's
settings and data add what describes the run (`run_record`: owners `settings`, `data`, `run`),
and the schema its version. This module alone knows under which keys they live. The key table
`SCHEMA` is the reference: the README's table is checked against it by a test, and `save` writes
exactly its keys. `weights_file` is the other kind of checkpoint we write: weights only, as
timm's tools and validate.py read them (``model_posthoc_best.pth.tar``).

Files are read and written by `files` (the one safe loader: no pickled code ever runs); which
weights of a file to take, by `weights`; timm's checkpoints, by `timm_checkpoints`.
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..util.distributed import load_local_buffers
from ..util.errors import UserError
from .files import safe_load, short_reason
from .weights import load_weights_into, select_weights

CHECKPOINT_VERSION = 3


@dataclass(frozen=True)
class Key:
    name: str
    owner: str   # the part whose state it is (`Run.parts`; two: both hold some of it)
    origin: str  # "timm": a key timm's train.py writes too; "ematrain": ours
    what: str


SCHEMA: tuple[Key, ...] = (
    Key("epoch", "counters", "timm", "the last complete epoch (-1 before the first one ends)"),
    Key("arch", "settings", "timm", "timm model name"),
    Key("state_dict", "model", "timm", "the raw weights (of the plain module, no wrapper prefixes)"),
    Key("state_dict_ema", "emas", "timm", "the first EMA shadow's weights"),
    Key("state_dict_ema_<i>", "emas", "ematrain", "the weights of further shadows, i = 1, 2, ..."),
    Key("optimizer", "optimizer", "timm", "the optimizer's state_dict()"),
    Key("amp_scaler", "amp_scaler", "timm", "the float16 AMP grad scaler's state (only with one)"),
    Key("args", "settings", "timm", "every setting of the run as a plain dict: what "
        "`--resume PATH` continues with"),
    Key("metric", "keeper", "timm", "the primary weight set's --eval-metric this epoch, as timm's: "
        "the first EMA's with an EMA on (the raw weights' with --primary-weights raw; None "
        "mid-epoch)"),
    Key("version", "schema", "timm", "this format's version"),
    Key("ematrain_version", "schema", "ematrain", "the ematrain release that wrote it"),
    Key("scheduler", "scheduler", "ematrain", "the LR scheduler's state_dict() (when one runs)"),
    Key("ema", "emas", "ematrain", "decays (sigma_rels under the power schedule), `names` (how "
        "the run names each shadow: `0.99`, `hl2ep`, `sr0.1`), `schedule` (its name and "
        "settings), `keys` (where each shadow is), update counters, settings, and `eval_dtype` "
        "(the dtype validation scored the shadows in)"),
    Key("posthoc_ema", "emas, snapshots", "ematrain", "with --model-ema-posthoc: the "
        "power-function EMAs' state (`ema`: sigma_rels, schedule, counters, shadows), the "
        "snapshot interval and dtype, the last snapshot taken (its step and that of the EMAs' last average) and the "
        "fork folder its series goes on in, if any"),
    Key("posthoc", "posthoc", "ematrain", "in model_posthoc_best.pth.tar only (validate.py "
        "--posthoc): the reconstructed EMA's length, fit error and the series it came from"),
    Key("counters", "counters", "ematrain", "epoch and step to resume at, optimizer updates, the "
        "epoch's running loss, skipped steps, world size"),
    Key("keeper", "keeper", "ematrain", "best epoch and metric of each weight set, and the "
        "checkpoint-<epoch> history"),
    Key("summary", "summary", "ematrain", "the summary.csv rows so far"),
    Key("trackers", "trackers", "ematrain", "with --log-wandb or --log-tensorboard: each "
        "tracker's state, so a resumed run continues it: W&B's run id and project, its last "
        "step and the rows of its last minute (W&B may lose them in a kill); TensorBoard's last "
        "step (later ones are purged) and folder"),
    Key("task_state", "task_state", "timm", "with --kd-distill-type feature when the student's "
        "and the teacher's feature widths differ: the trained projection (timm's task state, "
        "`projection`); never averaged, so there is no `task_state_ema`"),
    Key("rank_buffers", "distributed", "ematrain", "under torchrun only: every process's "
        "BatchNorm statistics of the model and of each shadow, by rank (they differ between "
        "reductions); a resumed process with the same process count takes its own back"),
    Key("data_stream", "data_stream", "ematrain", "with a stream (--dataset wds/, hfids/) only: "
        "where its training epoch stands (epoch, batches taken, each loader worker's position "
        "in its raw stream, the processes and workers that read it): a mid-epoch resume goes "
        "on from there"),
    Key("data_config", "data", "ematrain", "the evaluation transform (validate.py rebuilds it)"),
    Key("num_classes", "data", "ematrain", "classifier outputs"),
    Key("class_names", "data", "ematrain", "class folder names, in label order"),
    Key("run_id", "run", "ematrain", "the run's identity: drawn at a fresh start, kept by every "
        "resume, carried by each post-hoc snapshot too (no series mixes two runs)"),
)


def schema_markdown() -> str:
    """The key table as the README shows it."""
    lines = ["| key | owner | from | what |", "|---|---|---|---|"]
    lines += [f"| `{k.name}` | {k.owner} | {k.origin} | {k.what} |" for k in SCHEMA]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- saving
def run_record(run) -> dict:
    """What describes the run in every file it writes (a checkpoint, a post-hoc snapshot): its
    model, every setting, its classes, its evaluation transform and its identity."""
    return {"arch": run.settings.model.model, "args": run.record(),
            "num_classes": run.num_classes, "class_names": list(run.data.class_names),
            "data_config": dict(run.data.data_config), "run_id": run.run_id}


def save(run, metric: float | None = None, rank_buffers: list | None = None) -> dict:
    """The checkpoint of `run` now: every part's state under its schema key (`rank_buffers`:
    `util.distributed.local_buffers` of every rank, under torchrun)."""
    parts = run.parts()
    ckpt = {"epoch": run.counters.epoch - 1, "state_dict": parts.pop("model").state_dict(),
            "metric": metric, "version": CHECKPOINT_VERSION, "ematrain_version": __version__,
            **run_record(run)}
    emas = parts.pop("emas", None)
    states = emas.state_dict() if emas is not None else {}
    if "regular" in states:
        ckpt.update(ema_entries(states["regular"], emas.regular.scored_dtype(run.model),
                                run.ema_names()))
    snapshots = parts.pop("snapshots", None)
    if snapshots is not None:  # the power EMAs' state with where their series stands
        ckpt["posthoc_ema"] = {"ema": states["posthoc"], **snapshots.state_dict()}
    for name, part in parts.items():
        ckpt[name] = part.state_dict()
    if rank_buffers is not None and run.dist.enabled:
        ckpt["rank_buffers"] = rank_buffers
    return ckpt


def ema_entries(state: dict, scored: torch.dtype, names: list[str] | None = None) -> dict:
    """An EMA's full state in timm's layout: the first shadow where timm puts it, the others
    beside it, and everything else under `ema` (with `names`: how the run names each shadow;
    `scored`: the dtype validation scored the shadows in)."""
    meta = dict(state)
    shadows = meta.pop("shadows")
    keys = ["state_dict_ema"] + [f"state_dict_ema_{i}" for i in range(1, len(shadows))]
    meta["keys"] = keys
    if names:
        meta["names"] = list(names)
    meta["eval_dtype"] = str(scored).removeprefix("torch.")
    return {"ema": meta, **dict(zip(keys, shadows))}


def weights_file(record: dict, raw: dict, emas: list[dict], names: list[str],
                 scored: torch.dtype, **extra) -> dict:
    """A checkpoint of weights only, as timm's tools and validate.py read one: `raw` as
    ``state_dict``, `emas` as the EMA shadows (``state_dict_ema``, ...: `--use-ema`) named by
    `names` (validate.py's output line), with the run's `record` (`run_record`: what rebuilds
    the network) and `extra` keys of the schema (``posthoc``)."""
    state = {"decays": [], "shadows": list(emas)}
    return {"state_dict": raw, **ema_entries(state, scored, names),
            **{k: record[k] for k in ("arch", "args", "num_classes", "class_names",
                                      "data_config")},
            "version": CHECKPOINT_VERSION, "ematrain_version": __version__, **extra}


# ----------------------------------------------------------------------------- restoring
# Parts a checkpoint may lack (timm's have no scheduler, keeper or summary; a run that turns on
# float16 AMP has no scaler state yet; one written before trackers or streams has none): they
# start fresh.
OPTIONAL_PARTS = frozenset({"scheduler", "amp_scaler", "keeper", "summary", "data_stream",
                            "trackers"})
# Where each part's state is; the EMAs' is under each role's key (`ema_states`).
_KEYS = {"model": "state_dict", "emas": "ema", "snapshots": "posthoc_ema"}


def restore(run, ckpt: dict, path, skip: frozenset = frozenset(),
            other_decays: bool = False) -> list[str]:
    """Load every part of `run` from `ckpt` except those named in `skip`; returns the optional
    parts the checkpoint lacks (they start fresh). `other_decays`: the regular EMA's saved
    decays may differ from the run's (`ModelEma.load_full_state_dict`).

    A required key missing, or a key holding something its part cannot take, is one line
    naming the key.
    """
    ckpt = upgrade(ckpt)
    fresh = []
    for name, part in run.parts().items():
        key = _KEYS.get(name, name)
        if name in skip:
            continue
        if name == "emas":
            _restore_emas(part, ckpt, path, other_decays)
            continue
        if key not in ckpt and name in OPTIONAL_PARTS:
            fresh.append(name)
            continue
        if key not in ckpt:
            raise UserError(f"cannot resume from {path}: it has no '{key}' (it was saved "
                            f"without the {name} this run has)")
        if name == "model":
            load_weights_into(part, select_weights(ckpt, path).state, path,
                              arch=ckpt.get("arch"), model_name=run.settings.model.model)
            continue
        with _fits(path, key, name):
            part.load_state_dict(ckpt[key])
    _restore_rank_buffers(run, ckpt.get("rank_buffers"), path)
    return fresh


def _restore_emas(emas, ckpt: dict, path, other_decays: bool) -> None:
    """Each EMA of the collection from its key: the regular shadows' `ema` (and their
    ``state_dict_ema*``), the post-hoc power EMAs' under `posthoc_ema`."""
    for role, key in (("regular", "ema"), ("posthoc", "posthoc_ema")):
        if role not in emas.members():
            continue
        if key not in ckpt:
            raise UserError(f"cannot resume from {path}: it has no '{key}' (it was saved "
                            f"without the {role} EMA this run has)")
        with _fits(path, key, f"{role} EMA"):
            emas.load_member(role, ema_state(ckpt) if role == "regular" else ckpt[key]["ema"],
                             other_decays)


@contextlib.contextmanager
def _fits(path, key: str, name: str):
    """A part that cannot take its key's state is one line naming the key."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        raise UserError(f"cannot resume from {path}: its '{key}' does not fit this run's {name} "
                        f"({short_reason(exc)})") from None


def _restore_rank_buffers(run, saved: list | None, path) -> None:
    """This process's own BatchNorm statistics, when the checkpoint holds every rank's and the
    process count is the same (otherwise every process starts from rank 0's, in the parts)."""
    if saved is None or len(saved) != run.dist.world_size:
        return
    if not load_local_buffers(run.replica_modules(), saved[run.dist.rank]):
        raise UserError(f"cannot resume from {path}: its 'rank_buffers' do not fit this run's "
                        f"model and shadows")


def ema_state(ckpt: dict) -> dict:
    """The regular EMA's full_state_dict() put back together from the schema's keys."""
    meta = dict(ckpt["ema"])
    meta["shadows"] = [ckpt[key] for key in meta.pop("keys")]
    meta.pop("eval_dtype", None)
    meta.pop("names", None)
    return meta


def upgrade(ckpt: dict) -> dict:
    """An older checkpoint in the current layout: version 2 kept counters, keeper and summary in
    one `resume_state` dict; timm's have none of them (the run goes on after `epoch`)."""
    if "counters" in ckpt or not isinstance(ckpt.get("epoch"), int):
        return ckpt
    ckpt = dict(ckpt)
    old = ckpt.pop("resume_state", None)
    old = old if isinstance(old, dict) else {}
    mid = bool(old.get("epoch_step"))
    ckpt["counters"] = {
        "epoch": int(old["epoch"]) if mid else ckpt["epoch"] + 1,
        "epoch_step": int(old.get("epoch_step", 0)), "loss_sum": float(old.get("loss_sum", 0.0)),
        "loss_count": int(old.get("loss_count", 0)), "num_updates": int(ckpt.get("num_updates", 0)),
        "skipped_nonfinite": int(old.get("skipped_nonfinite", 0))}
    if old:
        decays = (ckpt.get("ema") or {}).get("decays", [])
        names = ["raw"] + [f"ema {float(d):g}" for d in decays]
        ckpt["keeper"] = {"best": {n: dict(b) for n, b in zip(names, old.get("best", []))},
                          "history": [list(e) for e in old.get("history", [])]}
        ckpt["summary"] = {"rows": [dict(r) for r in old.get("rows", [])]}
        if "amp_scaler" in old:
            ckpt["amp_scaler"] = old["amp_scaler"]
    return ckpt


def is_ours(ckpt: dict) -> bool:
    """Written by ematrain (so `args` records every setting of the run)."""
    return "ematrain_version" in ckpt and isinstance(ckpt.get("args"), dict)


def peek(path: str | Path) -> dict | None:
    """A checkpoint's `epoch`, `counters`, `keeper`, `summary`, run identity, `arch`, `args` (a
    plain dict) and `metric` without reading its tensors (memory-mapped), or None when it cannot
    be read."""
    try:
        data = safe_load(path, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not the one wanted
        return None
    if not isinstance(data, dict):
        return None
    data = upgrade(data)
    peeked = {k: data.get(k) for k in ("epoch", "counters", "keeper", "summary", "run_id",
                                       "arch", "metric")}
    peeked["args"] = args_dict(data)
    posthoc = data.get("posthoc_ema")
    if isinstance(posthoc, dict):  # where its post-hoc series lies, and how far it reaches
        peeked["posthoc"] = {k: posthoc.get(k) for k in ("fork", "last_snapshot")}
    return peeked


def args_dict(ckpt: dict) -> dict:
    """The training args of a checkpoint as a plain dict (ours, or timm's Namespace)."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}
