"""`python -m ematrain export`: each --weights choice written alone (safetensors or a .pth of
plain tensors, no pickled objects) with timm's config beside it; timm.create_model loads it with
no missing key, and validate.py reads it back with the numbers the run logged; --average-best is
timm's avg_checkpoints.py average of the best history checkpoints.

One run (two EMAs and post-hoc EMA) and its post-hoc sweep are made once for the module; every
export and validation runs in-process through the commands' ``main(argv)``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import timm
import torch
from conftest import REPO_ROOT, run_in_process, tiny_args, torch_threads
from safetensors.torch import load_file as load_safetensors

from ematrain import checkpoint as ckpt_io
from ematrain.cli import train, validate
from ematrain.cli.export import main as export_main
from ematrain.run import curves, summary

TRAIN = tiny_args("--seed", "1", "--model-ema", "--model-ema-decay", "0.99", "0.5",
                  "--model-ema-posthoc", "0.05", "0.10", "--model-ema-snapshot-every", "2it",
                  epochs=3)
# Bare weights carry no settings: validate.py is given the model, the input size and training's
# validation batch size (float32 sums differ in their last bits between batch sizes).
BARE = tiny_args(epochs=None, lr=None, warmup=None)
CHOICES = {"raw": "raw", "ema": "ema", "ema0.5": "ema0.5", "posthoc": "posthoc-best"}


class Env:
    pass


def export(*args):
    return run_in_process(export_main, "export", *args)


@pytest.fixture(scope="module")
def env(small_data, tmp_path_factory) -> Env:
    e = Env()
    e.data, e.base = small_data, tmp_path_factory.mktemp("export")
    with torch_threads(1), pytest.MonkeyPatch.context() as mp:
        mp.setattr(curves.CurveRenderer, "submit", lambda *a, **k: None)
        r = run_in_process(train.main, "train.py", small_data, *TRAIN, "--output", e.base,
                           "--experiment", "run")
        assert r.returncode == 0, r.stderr[-3000:]
        e.run = e.base / "run"
        r = run_in_process(validate.main, "validate.py", small_data, "--posthoc", e.run, "-j", "0")
        assert r.returncode == 0, r.stderr[-3000:]
        e.exports = {}
        for key, choice in CHOICES.items():
            out = e.base / "out" / f"{key}.safetensors"
            e.exports[key] = (export(e.run, "--weights", choice, "--output", out), out)
    return e


def config_of(weights: Path) -> dict:
    return json.loads(weights.with_suffix(".json").read_text())


def source_weights(config: dict) -> dict:
    """The weights the export says it holds, read from the checkpoint it names."""
    meta = config["ematrain"]
    path = Path(meta["sources"][0])
    ckpt = ckpt_io.load_file(path)
    if meta["kind"] == "raw":
        return ckpt_io.select_weights(ckpt, path).state
    if meta["kind"] == "posthoc":
        return ckpt_io.select_weights(ckpt, path, use_ema=True).state
    return ckpt_io.select_weights(ckpt, path, ema_decay=meta["weights"].removeprefix("ema ")).state


def assert_holds(model, state: dict) -> None:
    own = model.state_dict()
    assert own.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(own[key], tensor), key


@pytest.mark.parametrize("key", list(CHOICES))
def test_each_choice_is_written_alone_and_loads_in_timm_with_no_missing_key(env, key):
    r, out = env.exports[key]
    assert r.returncode == 0, r.stderr[-2000:]
    config = config_of(out)
    state = source_weights(config)
    assert load_safetensors(str(out)).keys() == state.keys()
    # timm's pretrained loading, given the class count (otherwise timm leaves a classifier of
    # another class count than its default 1000 at its initialisation, as for any weights).
    model = timm.create_model("test_resnet", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(out), num_classes=3))
    assert_holds(model, state)
    # timm's config beside the weights is enough: class count, names, evaluation transform.
    model = timm.create_model(config["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(config["pretrained_cfg"], file=str(out)))
    assert_holds(model, state)
    assert model.pretrained_cfg["label_names"] == ["class_0", "class_1", "class_2"]
    data_config = timm.data.resolve_data_config({}, model=model)
    saved = ckpt_io.load_file(env.run / "last.pth.tar")["data_config"]
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()} == \
        {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}


def test_the_config_says_which_weights_and_what_the_run_logged(env):
    rows = summary.read_summary(env.run)
    ema = config_of(env.exports["ema0.5"][1])
    meta = ema["ematrain"]
    assert (meta["weights"], meta["kind"], meta["decay"], meta["sigma_rel"]) == \
        ("ema 0.5", "ema", 0.5, None)
    assert Path(meta["sources"][0]).name == "model_best_ema0.5.pth.tar"
    row = next(r for r in rows if int(r["epoch"]) == meta["epoch"])
    assert meta["logged"]["top1"] == float(row["ema0.5_eval_top1"])
    first = config_of(env.exports["ema"][1])["ematrain"]
    assert (first["weights"], first["decay"]) == ("ema 0.99", 0.99)
    assert Path(first["sources"][0]).name == "model_best.pth.tar"  # timm's file: the first EMA
    raw = config_of(env.exports["raw"][1])["ematrain"]
    assert Path(raw["sources"][0]).name == "model_best_raw.pth.tar"
    posthoc = config_of(env.exports["posthoc"][1])["ematrain"]
    info = ckpt_io.load_file(env.run / "model_posthoc_best.pth.tar")["posthoc"]
    assert posthoc["kind"] == "posthoc" and posthoc["sigma_rel"] == info["sigma_rel"]
    assert posthoc["logged"]["top1"] == info["top1"]
    assert ema["num_classes"] == 3 and ema["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert ema["label_names"] == ["class_0", "class_1", "class_2"]


def _validate(env, *args) -> dict:
    results = env.base / f"val_{len(list(env.base.glob('val_*.json')))}.json"
    r = run_in_process(validate.main, "validate.py", env.data, *args, "--results-file", results)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(results.read_text())


@pytest.mark.parametrize("key", list(CHOICES))
def test_validate_reads_the_export_and_gives_the_logged_numbers(env, key):
    _, out = env.exports[key]
    logged = config_of(out)["ematrain"]["logged"]
    for flag in ("--checkpoint", "--pretrained-path"):
        res = _validate(env, flag, out, *BARE)
        assert res["top1"] == logged["top1"], flag
        assert res["loss"] == pytest.approx(logged["loss"], rel=1e-6, abs=1e-9), flag


def test_the_safetensors_file_holds_tensors_and_nothing_else(env):
    """A header of tensor entries, then exactly their bytes: no room for a pickle."""
    _, out = env.exports["ema"]
    blob = out.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    assert header.pop("__metadata__") == {"format": "pt"}
    ends = [entry["data_offsets"][1] for entry in header.values()]
    assert 8 + size + max(ends) == len(blob)
    assert set(header) == set(load_safetensors(str(out)))


def test_a_pth_export_is_plain_tensors(env):
    out = env.base / "out" / "ema_plain.pth"
    r = export(env.run, "--weights", "ema", "--output", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(out)) == []
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model = timm.create_model("test_resnet", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out), num_classes=3))
    assert_holds(model, source_weights(config_of(out)))


def test_a_folder_output_is_the_layout_timm_reads_as_local_dir(env):
    folder = env.base / "hub"
    r = export(env.run, "--weights", "ema0.5", "--output", f"{folder}/")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert model.num_classes == 3
    config = json.loads((folder / "config.json").read_text())
    assert_holds(model, source_weights(config))


def test_average_best_is_the_uniform_mean_of_the_k_best_history_checkpoints(env):
    out = env.base / "out" / "avg.safetensors"
    r = export(env.run, "--weights", "ema0.5", "--average-best", "2", "--output", out)
    assert r.returncode == 0, r.stderr[-2000:]
    # The history checkpoints ranked by the exported set's top-1 (ties in the keeper's order).
    top1 = {int(row["epoch"]): float(row["ema0.5_eval_top1"]) for row in summary.read_summary(env.run)}
    kept = [e for _, e in ckpt_io.load_file(env.run / "last.pth.tar")["keeper"]["history"]]
    order = sorted(kept, key=lambda e: -top1[e])[:2]
    states = [ckpt_io.select_weights(ckpt_io.load_file(env.run / f"checkpoint-{e}.pth.tar"),
                                     "x", ema_decay="0.5").state for e in order]
    averaged = load_safetensors(str(out))
    for key, first in states[0].items():
        if first.is_floating_point():
            mean = ((first.double() + states[1][key].double()) / 2).to(first.dtype)
            assert torch.equal(averaged[key], mean), key
        else:  # BatchNorm's batch counter: the best checkpoint's
            assert torch.equal(averaged[key], first), key
    meta = config_of(out)["ematrain"]
    assert meta["kind"] == "average"
    assert [Path(p).name for p in meta["sources"]] == [f"checkpoint-{e}.pth.tar" for e in order]
    model = timm.create_model("test_resnet", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out), num_classes=3))
    assert_holds(model, averaged)


@pytest.mark.parametrize("args, text", [
    (["--weights", "ema0.7"], "has no EMA 0.7 (it has: 0.99, 0.5)"),
    (["--weights", "ema", "--average-best", "9"], "--average-best 9: "),
    (["--output", "{base}/x.bin"], "--output must end in .safetensors or .pth"),
    (["--output", "{base}/out/ema.safetensors"], "exists; remove it, choose another --output"),
])
def test_bad_exports_are_one_line(env, args, text):
    args = [a.format(base=env.base) for a in args]
    if "--output" not in args:
        args += ["--output", env.base / "never.safetensors"]
    r = export(env.run, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m ematrain export: error: ") and text in lines[0], \
        r.stderr
    assert not (env.base / "never.safetensors").exists()


def test_posthoc_best_needs_the_sweep_first(env, tmp_path):
    (tmp_path / "last.pth.tar").write_bytes((env.run / "last.pth.tar").read_bytes())
    r = export(tmp_path, "--weights", "posthoc-best", "--output", tmp_path / "p.safetensors")
    assert r.returncode == 2 and "run validate.py DATA --posthoc" in r.stderr


def readme_export_commands() -> list[str]:
    section = (REPO_ROOT / "README.md").read_text().split("## Sharing weights: export", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_export_commands_run_and_validate_gives_the_logged_top1(env):
    """The README's commands, on this module's run: its folder for output/train/<run>, its data
    for DATA, its model and input size for resnet34 at 224 px."""
    folder = env.base / "readme"
    folder.mkdir()
    commands = readme_export_commands()
    assert len(commands) == 6
    for command in commands:
        words = (command.replace("output/train/<run>", str(env.run)).replace("DATA", str(env.data))
                 .replace("--model resnet34 --img-size 224", "--model test_resnet --img-size 32")
                 .split())
        words = [f"{folder}/{w}" if w.startswith("resnet34-") else w for w in words]
        if words[:4] == [".venv/bin/python", "-m", "ematrain", "export"]:
            r = export(*words[4:])
        else:
            assert words[:2] == [".venv/bin/python", "validate.py"], command
            r = run_in_process(validate.main, "validate.py", *words[2:], "-j", "0")
        assert r.returncode == 0, (command, r.stderr[-2000:])
    logged = config_of(folder / "resnet34-ema.safetensors")["ematrain"]["logged"]
    assert f"top1 {logged['top1']:.4f} " in r.stdout
    assert (folder / "resnet34-hub" / "config.json").is_file()
    assert config_of(folder / "resnet34-ema0.99.pth")["ematrain"]["weights"] == "ema 0.99"
