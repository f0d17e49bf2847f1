"""validate.py on our checkpoints, timm-style ones, plain state dicts and .safetensors files,
and its one-line refusals (missing, truncated, unsafe or mismatched files).

One short training run makes the checkpoint; the other files are derived from it in-process;
all validate.py calls run once in a module fixture. Training and most validate.py calls run
in-process through the entry points' ``main(argv)`` (captured as a process would be: see
``conftest.run_in_process``); the unsafe-checkpoint call runs the real ``validate.py`` script in a
subprocess, concurrently, so the pickled-code check holds for a fresh process and its exit is
checked at the process level.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import run_in_process, run_jobs, tiny_args, torch_threads

from ematrain.cli import train as train_entry
from ematrain.cli import validate as validate_entry

TRAIN = tiny_args("--model-ema", "--model-ema-decay", "0.9", batch=16)

ENTRY_POINTS = {"train.py": train_entry.main, "validate.py": validate_entry.main}
SUBPROCESS = ("unsafe",)  # run as `python validate.py ...`


def run_all(jobs: dict) -> dict:
    return run_jobs(jobs, as_process=SUBPROCESS)


class _RunsCode:
    """Unpickling this object opens (creates) `path`: stands in for any pickled code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class Setup:
    pass


@pytest.fixture(scope="module")
def env(tiny_data, tmp_path_factory) -> Setup:
    s = Setup()
    s.base = base = tmp_path_factory.mktemp("validate")
    s.data = tiny_data
    s.num_val = sum(1 for _ in (tiny_data / "val").rglob("*.png"))
    train = run_all({"train": ("train.py", [tiny_data, *TRAIN, "--output", base / "out",
                                            "--experiment", "run"])})["train"]
    assert train.returncode == 0, train.stderr[-3000:]
    s.run_dir = base / "out" / "run"
    s.ckpt = s.run_dir / "last.pth.tar"
    with open(s.run_dir / "summary.csv", newline="") as f:
        s.row = list(csv.DictReader(f))[-1]
    ckpt = torch.load(s.ckpt, map_location="cpu", weights_only=True)
    s.state_dict = ckpt["state_dict"]

    s.no_ema = base / "no_ema.pth.tar"
    torch.save({k: v for k, v in ckpt.items() if not k.startswith(("state_dict_ema", "ema"))},
               s.no_ema)

    s.truncated = base / "truncated.pth.tar"
    blob = s.ckpt.read_bytes()
    s.truncated.write_bytes(blob[: len(blob) // 2])

    s.marker = base / "pickled_code_ran"
    s.unsafe = base / "unsafe.pth.tar"
    torch.save({"state_dict": ckpt["state_dict"], "arch": "test_resnet",
                "payload": _RunsCode(s.marker)}, s.unsafe)
    # Control: the payload really does run code when unpickled without weights_only.
    s.control_marker = base / "control_ran"
    control = base / "control.pth.tar"
    torch.save({"payload": _RunsCode(s.control_marker)}, control)
    loaded = torch.load(control, weights_only=False)
    loaded["payload"].close()
    s.control_ran = s.control_marker.exists()

    # timm's train.py: args as an argparse.Namespace, only timm's keys, EMA as state_dict_ema.
    s.timm_style = base / "timm_style.pth.tar"
    timm_keys = ("epoch", "arch", "state_dict", "state_dict_ema", "optimizer", "args", "metric",
                 "version")
    timm_ckpt = {k: ckpt[k] for k in timm_keys}
    timm_ckpt["args"] = argparse.Namespace(**ckpt["args"])
    torch.save(timm_ckpt, s.timm_style)

    s.plain = base / "plain_state_dict.pth"
    torch.save(ckpt["state_dict"], s.plain)
    from safetensors.torch import save_file
    s.safetensors = base / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt["state_dict"].items()}, str(s.safetensors))

    s.missing_dir = base / "no_such_dir"

    def val(*args, results=None):
        extra = ["--results-file", base / results] if results else []
        return ("validate.py", [tiny_data, "-j", "0", *args, *extra])

    # Bare weights carry no training settings: give the input size and the batch size training
    # validated with (float32 forward passes differ in the last bits between batch sizes).
    bare = ["--model", "test_resnet", "--img-size", "32", "-b", "16"]

    jobs = {
        "raw_csv": val("--checkpoint", s.ckpt, results="raw_csv.csv"),
        "ema_json": val("--checkpoint", s.ckpt, "--use-ema", results="ema_json.json"),
        "missing": val("--checkpoint", base / "nope.pth.tar"),
        "no_ema": val("--checkpoint", s.no_ema, "--use-ema"),
        "other_arch": val("--checkpoint", s.ckpt, "--model", "test_vit"),
        "truncated": val("--checkpoint", s.truncated),
        "unsafe": val("--checkpoint", s.unsafe),
        "timm_raw": val("--checkpoint", s.timm_style, results="timm_raw.json"),
        "timm_ema": val("--checkpoint", s.timm_style, "--use-ema", results="timm_ema.json"),
        "plain": val("--checkpoint", s.plain, *bare, results="plain.json"),
        "plain_no_model": val("--checkpoint", s.plain),
        "safetensors": val("--checkpoint", s.safetensors, *bare, results="safetensors.json"),
        # timm's validate.py flags: weights without a training checkpoint, AMP, result formats.
        "pretrained_path": val("--pretrained-path", s.timm_style, "--model", "test_resnet",
                               results="pretrained_path.json"),
        "amp": val("--checkpoint", s.ckpt, "--amp", "--amp-dtype", "bfloat16",
                   "--results-format", "json", results="amp.txt"),
        "two_sources": val("--checkpoint", s.ckpt, "--pretrained-path", s.timm_style),
        "no_source": val(),
        "results_suffix": val("--checkpoint", s.ckpt, results="r.txt"),
        "results_missing_dir": ("validate.py", [tiny_data, "-j", "0", "--checkpoint", s.ckpt,
                                                "--results-file", s.missing_dir / "r.json"]),
    }
    s.jobs = jobs
    s.procs = run_all(jobs)
    return s


def results(env, name: str, suffix: str = ".json") -> dict:
    proc = env.procs[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return json.loads((env.base / f"{name}{suffix}").read_text())


def assert_one_line_error(env, name: str, *words: str) -> str:
    proc = env.procs[name]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("validate.py: error: ")
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    assert proc.stdout.strip() == ""
    return lines[0]


# ----------------------------------------------------------------------------- our checkpoint
def test_results_json(env):
    res = results(env, "ema_json")
    assert res["model"] == "test_resnet"
    assert res["checkpoint"] == str(env.ckpt)
    assert res["weights"].startswith("ema")
    assert res["count"] == env.num_val
    assert res["top1"] == float(env.row["eval_top1"])
    assert res["top5"] == float(env.row["eval_top5"])
    assert res["loss"] == float(env.row["eval_loss"])
    assert res["img_size"] == 32
    assert f"top1 {res['top1']:.4f}" in env.procs["ema_json"].stdout


def test_the_results_file_carries_timms_fields_in_timms_order(env):
    res = results(env, "ema_json")
    timm_fields = ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size",
                   "crop_pct", "interpolation"]
    assert list(res)[:len(timm_fields)] == timm_fields
    assert res["top1_err"] == 100.0 - res["top1"] and res["top5_err"] == 100.0 - res["top5"]
    model = timm.create_model("test_resnet", num_classes=3)
    assert res["param_count"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2) > 0
    saved = torch.load(env.ckpt, weights_only=True)["data_config"]
    assert (res["crop_pct"], res["interpolation"]) == (saved["crop_pct"], saved["interpolation"])


def test_results_csv(env):
    proc = env.procs["raw_csv"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(env.base / "raw_csv.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    res = rows[0]
    assert res["model"] == "test_resnet" and res["weights"] == "raw"
    assert int(res["count"]) == env.num_val
    assert float(res["top1"]) == float(env.row["raw_eval_top1"])
    assert float(res["top5"]) == float(env.row["raw_eval_top5"])
    assert float(res["loss"]) == float(env.row["raw_eval_loss"])
    # Same fields as the JSON form.
    assert list(res) == list(results(env, "ema_json"))
    assert float(res["loss"]) != results(env, "ema_json")["loss"]


# ----------------------------------------------------------------------------- refusals
def test_missing_checkpoint(env):
    assert_one_line_error(env, "missing", "nope.pth.tar", "not found")


def test_use_ema_without_ema(env):
    assert_one_line_error(env, "no_ema", "no EMA")


def test_other_architecture(env):
    assert_one_line_error(env, "other_arch", "does not fit")


def test_truncated_checkpoint(env):
    assert_one_line_error(env, "truncated", env.truncated.name)


def test_pickled_code_is_not_run(env):
    assert env.control_ran, "the test payload does not run code: the check below would be vacuous"
    assert_one_line_error(env, "unsafe", env.unsafe.name)
    assert not env.marker.exists()


def test_in_process_run_matches_the_script(env):
    """The in-process runner reports what `python validate.py` reports (so the other cases hold
    for the script too): same exit code, same stdout, same stderr; still no code run."""
    assert "unsafe" in SUBPROCESS
    script, args = env.jobs["unsafe"]
    with torch_threads(1):
        here = run_in_process(ENTRY_POINTS[script], script, *args)
    proc = env.procs["unsafe"]
    assert (here.returncode, here.stdout, here.stderr) == (proc.returncode, proc.stdout, proc.stderr)
    assert not env.marker.exists()


def test_plain_state_dict_needs_model(env):
    assert_one_line_error(env, "plain_no_model", "--model")


def test_results_file_in_missing_directory(env):
    assert_one_line_error(env, "results_missing_dir", env.missing_dir.name)
    assert not env.missing_dir.exists()


# ----------------------------------------------------------------------------- other formats
def _same_numbers(a: dict, b: dict) -> None:
    assert (a["top1"], a["top5"], a["loss"], a["count"]) == (b["top1"], b["top5"], b["loss"], b["count"])


def test_timm_checkpoint_with_namespace_args(env):
    raw = results(env, "timm_raw")
    assert raw["model"] == "test_resnet" and raw["weights"] == "raw"
    assert raw["loss"] == float(env.row["raw_eval_loss"])
    assert raw["top1"] == float(env.row["raw_eval_top1"])
    assert raw["img_size"] == 32  # taken from the Namespace args


def test_timm_checkpoint_use_ema(env):
    ema = results(env, "timm_ema")
    _same_numbers(ema, results(env, "ema_json"))
    assert ema["loss"] != results(env, "timm_raw")["loss"]


@pytest.mark.parametrize("name", ["plain", "safetensors"])
def test_bare_weights_file(env, name):
    res = results(env, name)
    assert res["model"] == "test_resnet"
    assert res["weights"] == "raw"
    assert res["loss"] == float(env.row["raw_eval_loss"])
    assert res["top1"] == float(env.row["raw_eval_top1"])
    assert res["top5"] == float(env.row["raw_eval_top5"])
    assert res["count"] == env.num_val


# ----------------------------------------------------------------------------- architecture flags
def test_architecture_flags_are_rebuilt_for_validation(tiny_data, tmp_path):
    """--gp catavgmax changes the head's shape and --bn-eps what every BatchNorm computes:
    validate.py must rebuild that network from the checkpoint to reproduce the log."""
    out = tmp_path / "out"
    train = run_all({"train": ("train.py", [tiny_data, *TRAIN, "--gp", "catavgmax", "--bn-eps",
                                            "0.5", "--output", out, "--experiment", "arch"])})
    assert train["train"].returncode == 0, train["train"].stderr[-3000:]
    run_dir = out / "arch"
    with open(run_dir / "summary.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    val = ["validate.py", [tiny_data, "-j", "0", "--checkpoint", run_dir / "last.pth.tar"]]
    procs = run_all({"raw": (val[0], val[1] + ["--results-file", tmp_path / "raw.json"]),
                     "ema": (val[0], val[1] + ["--use-ema", "--results-file", tmp_path / "ema.json"])})
    for name, prefix in (("raw", "raw_eval_"), ("ema", "eval_")):
        assert procs[name].returncode == 0, procs[name].stderr[-2000:]
        res = json.loads((tmp_path / f"{name}.json").read_text())
        assert res["loss"] == float(row[prefix + "loss"])
        assert res["top1"] == float(row[prefix + "top1"])


def test_bfloat16_model_keeps_float32_shadows_and_validates_alike(tiny_data, tmp_path):
    """--model-dtype bfloat16: the weights train in bfloat16, the EMA is kept in float32 (an
    update of (1 - decay) x (model - ema) would round away in 16 bits), and validate.py evaluates
    each in its own dtype, reproducing the log."""
    out = tmp_path / "out"
    train = run_all({"train": ("train.py", [tiny_data, *TRAIN, "--model-dtype", "bfloat16",
                                            "--output", out, "--experiment", "bf16"])})
    assert train["train"].returncode == 0, train["train"].stderr[-3000:]
    run_dir = out / "bf16"
    ckpt = torch.load(run_dir / "last.pth.tar", map_location="cpu", weights_only=True)
    floats = lambda sd: {v.dtype for v in sd.values() if v.is_floating_point()}  # noqa: E731
    assert floats(ckpt["state_dict"]) == {torch.bfloat16}
    assert floats(ckpt["state_dict_ema"]) == {torch.float32}
    with open(run_dir / "summary.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    val = [tiny_data, "-j", "0", "--checkpoint", run_dir / "last.pth.tar"]
    procs = run_all({"raw": ("validate.py", val + ["--results-file", tmp_path / "raw.json"]),
                     "ema": ("validate.py", val + ["--use-ema", "--results-file", tmp_path / "ema.json"])})
    for name, prefix in (("raw", "raw_eval_"), ("ema", "eval_")):
        assert procs[name].returncode == 0, procs[name].stderr[-2000:]
        res = json.loads((tmp_path / f"{name}.json").read_text())
        assert res["loss"] == float(row[prefix + "loss"])
        assert res["top1"] == float(row[prefix + "top1"])
    from ematrain.run.evaluation import evaluation_dtype
    assert evaluation_dtype(ckpt["state_dict"], torch.device("cpu")) == torch.bfloat16
    assert evaluation_dtype(ckpt["state_dict_ema"], torch.device("cpu")) is None


def test_a_swapped_shadow_is_scored_in_the_model_dtype_and_validate_py_follows():
    """On a GPU, --model-ema-force-cpu scores the float32 shadow swapped into the bfloat16 model:
    the checkpoint records that dtype and validate.py evaluates the EMA weights in it."""
    import timm

    from ematrain.checkpoint import schema
    from ematrain.ema import ModelEma
    from ematrain.run.evaluation import evaluation_dtype
    model = timm.create_model("test_resnet", num_classes=3).to(torch.bfloat16)
    ema = ModelEma(model, 0.9)

    def saved():
        return schema.ema_entries(ema.full_state_dict(), ema.scored_dtype(model))
    assert saved()["ema"]["eval_dtype"] == "float32"
    ema.device = torch.device("meta")  # the shadow lives elsewhere than the model: swapped
    ckpt = saved()
    assert ckpt["ema"]["eval_dtype"] == "bfloat16"
    cpu = torch.device("cpu")
    assert evaluation_dtype(ckpt["state_dict_ema"], cpu, "bfloat16") == torch.bfloat16
    assert evaluation_dtype(ckpt["state_dict_ema"], cpu, "float32") is None
    assert evaluation_dtype(ckpt["state_dict_ema"], cpu) is None
    assert evaluation_dtype(model.state_dict(), cpu) == torch.bfloat16


def test_ema_decay_can_be_given_as_printed(tiny_data, tmp_path, capsys):
    tiny = tiny_args()
    with torch_threads(1):
        assert train_entry.main([str(tiny_data), *tiny, "--output", str(tmp_path),
                                 "--experiment", "h", "--model-ema-half-life", "3it", "1ep"]) == 0
    from ematrain.checkpoint import files, weights
    ckpt = files.load_file(tmp_path / "h/last.pth.tar")
    printed = float(f"{ckpt['ema']['decays'][1]:g}")
    assert printed != ckpt["ema"]["decays"][1]
    assert weights.ema_index_for_decay(ckpt, printed, "x") == 1


# ----------------------------------------------------------------------------- timm's validate flags
def test_pretrained_path_evaluates_a_weights_file_as_training_would_start_from_it(env):
    """Without a training checkpoint: the file's EMA weights, as --pretrained-path takes them."""
    res = results(env, "pretrained_path")
    assert res["weights"] == "ema" and res["checkpoint"] == str(env.timm_style)
    _same_numbers(res, results(env, "timm_ema"))


def test_amp_and_results_format(env):
    res = results(env, "amp", suffix=".txt")  # JSON by --results-format, whatever the suffix
    assert res["weights"] == "raw" and res["count"] == env.num_val
    # bfloat16 autocast: close to the float32 numbers, not identical to them.
    assert abs(res["loss"] - float(env.row["raw_eval_loss"])) < 0.05
    assert res["loss"] != float(env.row["raw_eval_loss"])


def test_exactly_one_source_of_weights(env):
    assert_one_line_error(env, "two_sources", "not --checkpoint and --pretrained-path")
    assert_one_line_error(env, "no_source", "--checkpoint PATH", "--pretrained")
    assert_one_line_error(env, "results_suffix", "--results-format")
