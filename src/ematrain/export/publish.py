"""The files `export` writes: the weights alone (.safetensors, or a .pth of plain tensors) and,
beside them, timm's model config (the ``config.json`` layout timm's ``save_config_for_hf``
writes: architecture, class count and names, ``model_args``, ``pretrained_cfg``), with an
``ematrain`` section saying which weights they are.

``pretrained_cfg`` is the architecture's default one with the run's evaluation transform
(input size, interpolation, mean, std, crop_pct, crop_mode), its class count and names, and
without what described timm's own weights (their source, tag, license, papers, test sizes).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path

import timm
import torch

from .. import __version__
from .. import checkpoint as ckpt_io
from ..run.model import architecture_kwargs, check_model_name
from ..util.atomic import atomic_write, atomic_write_text
from ..util.errors import UserError
from .choose import Chosen

SUFFIXES = (".safetensors", ".pth")
# The hub layout (a folder): what timm's ``local-dir:`` and ``hf-hub:`` sources read.
HUB_WEIGHTS, HUB_CONFIG = "model.safetensors", "config.json"
DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# Fields of timm's default config that describe timm's published weights, not these.
NOT_OURS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "tag",
            "license", "description", "origin_url", "paper_name", "paper_ids", "notes",
            "test_input_size", "test_crop_pct", "test_pool_size", "label_offset",
            "label_descriptions", "label_names", "architecture")


def output_paths(output: str) -> tuple[Path, Path]:
    """The weights file and its config: FILE.safetensors (or .pth) and FILE.json, or, for a
    folder (a name ending in / or an existing folder), FOLDER/model.safetensors and
    FOLDER/config.json."""
    path = Path(output)
    if output.endswith(("/", "\\")) or path.is_dir():
        return path / HUB_WEIGHTS, path / HUB_CONFIG
    if path.suffix not in SUFFIXES:
        raise UserError(f"--output must end in .safetensors or .pth (or name a folder), got "
                        f"{output}")
    return path, path.with_suffix(".json")


def build_model(arch: str, num_classes: int, model_args: dict):
    """The architecture, without allocating its weights (meta device), to check the weights
    fit it and read what timm's config records of it."""
    check_model_name(arch)
    try:
        with torch.device("meta"):
            return timm.create_model(arch, num_classes=num_classes, **model_args)
    except Exception:  # noqa: BLE001 - a model whose init needs real tensors
        return timm.create_model(arch, num_classes=num_classes, **model_args)


def check_fits(model, chosen: Chosen, arch: str) -> None:
    """The weights load into the architecture with no missing or unexpected key."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta tensors is a no-op, said as a warning
        ckpt_io.load_weights_into(model, chosen.state, chosen.sources[0], arch=arch,
                                  model_name=arch)


def _global_pool(model) -> str | None:
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    return pool if isinstance(pool, str) and pool else None


def pretrained_cfg(model, data_config: dict, num_classes: int, class_names: list[str]) -> dict:
    """timm's pretrained_cfg for these weights (see the module's docstring)."""
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in NOT_OURS}
    default_size = cfg.get("input_size")
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()
                if k in DATA_KEYS})
    if default_size is not None and list(default_size)[1:] != list(cfg["input_size"])[1:]:
        cfg["pool_size"] = None  # timm's rule: the default pool size is for the default input
    cfg.update(num_classes=num_classes, custom_load=False)
    if class_names:
        cfg["label_names"] = list(class_names)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def model_config(chosen: Chosen, model, arch: str, model_args: dict, sha256: str,
                 weights_file: Path) -> dict:
    """The JSON beside the weights: timm's config.json layout, then ours."""
    ckpt = chosen.ckpt
    num_classes = int(model.num_classes)
    names = list(ckpt.get("class_names") or [])
    config = {"architecture": arch, "num_classes": num_classes,
              "num_features": int(model.num_features)}
    if _global_pool(model):
        config["global_pool"] = _global_pool(model)
    if names:
        config["label_names"] = names
    if model_args:
        config["model_args"] = model_args
    config["pretrained_cfg"] = pretrained_cfg(model, dict(ckpt.get("data_config") or {}),
                                              num_classes, names)
    args = ckpt_io.args_dict(ckpt)
    config["ematrain"] = {
        "weights": chosen.weights, "kind": chosen.kind, "decay": chosen.decay,
        "sigma_rel": chosen.sigma_rel, "epoch": chosen.epoch, "logged": chosen.logged,
        "notes": [n for n in chosen.notes if n], "sources": chosen.sources,
        "run_id": ckpt.get("run_id"), "bn_eps": args.get("bn_eps"),
        "file": weights_file.name, "sha256": sha256, "ematrain_version": __version__}
    return config


def plain_tensors(state: dict) -> dict:
    """Each tensor on the CPU, contiguous and with storage of its own (safetensors refuses
    shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def write_weights(path: Path, state: dict) -> str:
    """The weights alone, atomically; returns the file's SHA-256 (as timm's scripts print)."""
    tensors = plain_tensors(state)
    if path.suffix == ".pth":
        atomic_write(path, lambda tmp: torch.save(tensors, tmp), by_path=True)
    else:
        from safetensors.torch import save_file
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
                     by_path=True)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def publish(chosen: Chosen, output: str, overwrite: bool = False) -> tuple[Path, Path, dict]:
    """Write the weights and their config; returns both paths and the config."""
    weights_path, config_path = output_paths(output)
    if not overwrite:
        for path in (weights_path, config_path):
            if path.exists():
                raise UserError(f"{path} exists; remove it, choose another --output or pass "
                                f"--overwrite")
    ckpt = chosen.ckpt
    arch = ckpt.get("arch") or ckpt_io.args_dict(ckpt).get("model")
    if not isinstance(arch, str) or not arch:
        raise UserError(f"{chosen.sources[0]} does not name its model (no 'arch')")
    model_args = {k: v for k, v in architecture_kwargs(ckpt_io.args_dict(ckpt)).items()
                  if v is not None}
    num_classes = ckpt.get("num_classes") or ckpt_io.args_dict(ckpt).get("num_classes")
    if not num_classes:
        raise UserError(f"{chosen.sources[0]} does not record its class count")
    model = build_model(arch, int(num_classes), model_args)
    check_fits(model, chosen, arch)
    with contextlib.suppress(FileExistsError):
        weights_path.parent.mkdir(parents=True, exist_ok=True)
    sha = write_weights(weights_path, chosen.state)
    config = model_config(chosen, model, arch, model_args, sha, weights_path)
    atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
    return weights_path, config_path, config
