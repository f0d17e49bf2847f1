"""Post-hoc EMA: the profile arithmetic against a float64 reference tracker, reconstructions
against EMAs tracked directly (weights and top-1), the snapshot series of a real run, the best
file read by validate.py and timm, and every bad input as one line."""
from __future__ import annotations

import csv
import math
import shutil
import weakref

import numpy as np
import pytest
import torch
from conftest import (
    REPO_ROOT,
    make_imagefolder,
    make_training,
    run_in_process,
    tiny_args,
    torch_threads,
)

from ematrain.checkpoint import files as ckpt_files
from ematrain.cli import train, validate
from ematrain.ema.schedules import sigma_rel_to_gamma
from ematrain.posthoc import Profile, Solution, solve
from ematrain.posthoc import series as series_mod
from ematrain.posthoc import snapshots as snapshots_mod
from ematrain.run import curves, evaluation
from ematrain.run.evaluation import validate as score

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")


# ----------------------------------------------------------------------------- reference
class Reference:
    """float64 EMAs of a sequence of weight vectors, written from the definitions: a power EMA
    with ``beta_t = (1 - 1/t)^(gamma+1)`` and a classic EMA started as a copy of theta_0."""

    def __init__(self, theta0: np.ndarray, gammas=(), decays=()):
        self.t = 0
        self.gammas, self.decays = list(gammas), list(decays)
        self.power = [theta0.copy() for _ in gammas]
        self.exp = [theta0.copy() for _ in decays]

    def update(self, theta: np.ndarray) -> None:
        self.t += 1
        for i, g in enumerate(self.gammas):
            beta = (1.0 - 1.0 / self.t) ** (g + 1.0)
            self.power[i] = beta * self.power[i] + (1.0 - beta) * theta
        for i, d in enumerate(self.decays):
            self.exp[i] = d * self.exp[i] + (1.0 - d) * theta


def random_walk(steps: int, size: int, seed: int = 0) -> np.ndarray:
    """Iterates theta_0 .. theta_steps: a drifting random walk, like weights under SGD."""
    rng = np.random.default_rng(seed)
    drift = rng.normal(size=size)
    noise = rng.normal(scale=0.3, size=(steps + 1, size))
    return np.cumsum(noise + 0.05 * drift, axis=0)


META = {"arch": "toy", "args": {}, "num_classes": 1, "class_names": ["a"], "data_config": {},
        "eval_dtype": "float32", "steps_per_epoch": 10, "images_per_step": 4, "every": 1}


def write_series(folder, thetas, sigma_rels, every: int, dtype=torch.float64):
    """Snapshots of power EMAs of `thetas` every `every` steps, tracked by the reference."""
    folder.mkdir(parents=True, exist_ok=True)
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    ref = Reference(thetas[0], gammas)
    for t in range(1, len(thetas)):
        ref.update(thetas[t])
        if t % every == 0:
            shadows = [{"w": torch.from_numpy(p.copy()), "bn.running_var": torch.from_numpy(p ** 2),
                        "bn.num_batches_tracked": torch.tensor(t)} for p in ref.power]
            entry = snapshots_mod.snapshot_entry(shadows, sigma_rels, gammas, t, t, dtype, META)
            ckpt_files.write_file(folder / snapshots_mod.snapshot_name(t), entry)
    return ref


# ----------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("kind,param", [("power", 6.94), ("power", 0.3), ("exp", 0.9)])
def test_a_profile_is_the_weights_the_reference_tracker_gives_the_iterates(kind, param):
    thetas = random_walk(200, 5)
    ref = Reference(thetas[0], [param] if kind == "power" else [],
                    [param] if kind == "exp" else [])
    for t in range(1, 201):
        ref.update(thetas[t])
        if t in (1, 7, 200):
            w = Profile(kind, param, t).weights(0, t + 1)
            tracked = (ref.power or ref.exp)[0]
            assert np.allclose(w @ thetas[: t + 1], tracked, rtol=1e-12, atol=1e-12)
            assert math.isclose(w.sum(), 1.0, rel_tol=1e-12)


def test_a_power_profile_has_the_sigma_rel_it_was_built_for():
    for sigma in (0.05, 0.1, 0.2):
        assert Profile("power", sigma_rel_to_gamma(sigma), 100_000).sigma_rel == pytest.approx(
            sigma, rel=1e-3)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-7),
                                       (torch.bfloat16, 8e-3)])
def test_a_tracked_profile_reconstructed_is_its_last_snapshot(tmp_path, dtype, tol):
    thetas = random_walk(120, 50)
    write_series(tmp_path, thetas, [0.05, 0.10], every=10, dtype=dtype)
    series = series_mod.read_series(tmp_path)
    targets = [Profile("power", g, series.updates) for g in series.gammas]
    solution = solve(series.profiles(), targets)
    assert solution.fit_errors.max() < 1e-9
    states, _ = series_mod.synthesize(series, solution)
    last = snapshots_mod.load_shadows(series.snapshots[-1])
    for state, shadow in zip(states, last):
        got, want = state["w"].double(), shadow["w"].double()
        assert ((got - want).norm() / want.norm()).item() < tol
        assert torch.equal(state["bn.num_batches_tracked"], shadow["bn.num_batches_tracked"])


def test_reconstructions_match_the_same_emas_tracked_directly(tmp_path):
    """A power profile between the tracked ones and a classic EMA, reconstructed from float64
    snapshots, against the reference tracking them directly: the weight error is the fit error's
    size (the fit is of the profiles, not of these iterates, so allow 3x)."""
    thetas = random_walk(400, 200, seed=3)
    write_series(tmp_path, thetas, [0.05, 0.10], every=20)
    series = series_mod.read_series(tmp_path)
    half_life = 30.0
    decay = 0.5 ** (1 / half_life)
    direct = Reference(thetas[0], [sigma_rel_to_gamma(0.07)], [decay])
    for t in range(1, 401):
        direct.update(thetas[t])
    targets = [Profile("power", sigma_rel_to_gamma(0.07), 400), Profile("exp", decay, 400)]
    solution = solve(series.profiles(), targets)
    states, _ = series_mod.synthesize(series, solution)
    spread = np.linalg.norm(thetas[-1] - thetas[0])
    for state, want, fit in zip(states, direct.power + direct.exp, solution.fit_errors):
        error = np.linalg.norm(state["w"].double().numpy() - want)
        assert fit < 0.05
        assert error < 3 * fit * spread + 1e-6 * np.linalg.norm(want), (error, fit, spread)


def test_one_read_of_the_series_forms_every_target_as_one_target_at_a_time_would(
        tmp_path, monkeypatch):
    """All targets accumulate in one pass, each snapshot read once and alone in memory: the
    same weights as forming each target by itself from its own reads, to float64 rounding."""
    thetas = random_walk(120, 300, seed=4)
    write_series(tmp_path, thetas, [0.05, 0.10], every=10)
    series = series_mod.read_series(tmp_path)
    t = series.updates
    targets = [Profile("power", sigma_rel_to_gamma(s), t) for s in (0.03, 0.07, 0.2)]
    targets.append(Profile("exp", 0.95, t))
    solution = solve(series.profiles(), targets)
    reads, alive = [], []
    original = series_mod.load_shadows

    def counted(snapshot):
        alive.append(sum(ref() is not None for ref in held))  # earlier snapshots still held
        shadows = original(snapshot)
        reads.append(snapshot.path)
        held.extend(weakref.ref(v) for shadow in shadows for v in shadow.values())
        return shadows
    held: list = []
    monkeypatch.setattr(series_mod, "load_shadows", counted)
    formed = series_mod.accumulate(series, solution)
    assert reads == [s.path for s in series.snapshots] and alive == [0] * len(reads)
    monkeypatch.setattr(series_mod, "load_shadows", original)
    tracked = len(series.gammas)
    for k, state in enumerate(formed.states):
        for key in ("w", "bn.running_var"):
            want = sum(solution.coefficients[k, i * tracked + j]
                       * snapshots_mod.load_shadows(snap)[j][key].double()
                       for i, snap in enumerate(series.snapshots) for j in range(tracked))
            assert state[key].dtype == torch.float64
            assert torch.allclose(state[key], want.clamp(min=0) if "var" in key else want,
                                  rtol=1e-13, atol=1e-13 * want.abs().max().item())
        assert torch.equal(state["bn.num_batches_tracked"], torch.tensor(120))
    assert [x.keys() for x in formed.last] == [x.keys() for x in original(series.snapshots[-1])]


def test_a_target_the_snapshots_cannot_represent_has_a_large_fit_error():
    snapshots = [Profile("power", sigma_rel_to_gamma(s), t) for t in (50, 100) for s in (0.05, 0.1)]
    narrow = Profile("power", sigma_rel_to_gamma(0.005), 100)
    exp_long = Profile("exp", 0.5 ** (1 / 200), 100)  # mostly theta_0, which power EMAs never hold
    errors = solve(snapshots, [narrow, exp_long]).fit_errors
    assert errors[0] > 0.3 and errors[1] > 0.5


def test_a_negative_combination_of_variances_is_clamped_at_zero(tmp_path):
    thetas = random_walk(40, 20)
    write_series(tmp_path, thetas, [0.05, 0.10], every=10)
    series = series_mod.read_series(tmp_path)
    n = len(series.profiles())
    coefficients = np.zeros((1, n))
    coefficients[0, -1], coefficients[0, -2] = -1.0, 0.0  # minus a variance
    states, clamped = series_mod.synthesize(series, Solution(coefficients, np.zeros(1)))
    assert clamped == 20 and states[0]["bn.running_var"].min() == 0.0


# ----------------------------------------------------------------------------- bad input
def one_line_error(r, text: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("posthoc") / "data", num_classes=3,
                            train_per_class=16, val_per_class=8)


def test_bad_series_are_one_line_each(data, tmp_path):
    thetas = random_walk(30, 4)
    cases = {}
    cases["missing"] = (tmp_path / "nope", "no such folder")
    (tmp_path / "empty" / "posthoc").mkdir(parents=True)
    cases["empty"] = (tmp_path / "empty", "holds no post-hoc snapshots")
    write_series(tmp_path / "one" / "posthoc", thetas[:11], [0.05, 0.10], every=10)
    cases["one"] = (tmp_path / "one", "one snapshot only")
    write_series(tmp_path / "mixed" / "posthoc", thetas[:21], [0.05, 0.10], every=10)
    write_series(tmp_path / "other", thetas, [0.05, 0.20], every=30)
    (tmp_path / "other" / snapshots_mod.snapshot_name(30)).rename(
        tmp_path / "mixed" / "posthoc" / snapshots_mod.snapshot_name(30))
    cases["mixed"] = (tmp_path / "mixed", "mixes snapshots of different runs or settings")
    for folder, text in cases.values():
        r = run_in_process(validate.main, "validate.py", data, "--posthoc", folder)
        one_line_error(r, text)
    for argv, text in [(["--posthoc", tmp_path, "--sigma-rel", "0.4"], "--sigma-rel must be in"),
                       (["--posthoc", tmp_path, "--half-life", "2days"], "--half-life: bad"),
                       (["--posthoc", tmp_path, "--use-ema"], "do not apply"),
                       (["--sigma-rel", "0.1"], "give the weights to evaluate: --checkpoint PATH, --posthoc"),
                       (["--checkpoint", "x", "--sigma-rel", "0.1"], "give --posthoc RUN_DIR")]:
        one_line_error(run_in_process(validate.main, "validate.py", data, *argv), text)


@pytest.mark.parametrize("argv,text", [
    (["--model-ema-snapshot-every", "2it"], "give it too"),
    (["--model-ema-posthoc", "0.5"], "sigma_rel must be in"),
    (["--model-ema-posthoc", "0.1", "0.1"], "must differ"),
    (["--model-ema-posthoc", "--model-ema-snapshot-every", "2"], "--model-ema-snapshot-every: bad"),
])
def test_bad_posthoc_training_flags_are_one_line(data, tmp_path, argv, text):
    r = run_in_process(train.main, "train.py", data, "--model", "test_resnet", "--output",
                       tmp_path, *argv)
    one_line_error(r, text)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- a real run
TINY = tiny_args("--seed", "3", batch=8, epochs=4)


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    """4 epochs of 6 steps: power EMAs 0.05 0.07 0.10 snapshotted every 3 steps in float32 (8
    snapshots: fewer profiles than iterates, so a reconstruction is a real fit), and a regular
    EMA of half-life 4 steps tracked directly."""
    out = tmp_path_factory.mktemp("posthoc_run")
    with torch_threads(1), pytest.MonkeyPatch.context() as mp:
        mp.setattr(curves.CurveRenderer, "submit", lambda *a, **k: None)
        r = run_in_process(train.main, "train.py", data, *TINY, "--model-ema-half-life", "4it",
                           "--model-ema-posthoc", "0.05", "0.07", "0.10",
                           "--model-ema-snapshot-every", "3it", "--output", out,
                           "--experiment", "r")
    assert r.returncode == 0, r.stderr
    assert "post-hoc EMA: power EMAs sigma_rel 0.05 0.07 0.1, a snapshot every 3 optimizer " \
           "steps (0.5 epochs) and at the end: 8 snapshots of" in r.stderr
    return out / "r"


def test_a_run_writes_its_series_and_resumes_it(run_dir, data):
    files = snapshots_mod.snapshot_files(run_dir / "posthoc")
    assert [s for s, _ in files] == list(range(3, 25, 3))
    last = torch.load(files[-1][1], weights_only=True)
    ckpt = torch.load(run_dir / "last.pth.tar", weights_only=True)
    assert last["updates"] == ckpt["posthoc_ema"]["ema"]["steps"] == 24
    for shadow, saved in zip(last["shadows"], ckpt["posthoc_ema"]["ema"]["shadows"]):
        for k in shadow:
            assert torch.equal(shadow[k], saved[k].to(shadow[k].dtype)), k
    r = run_in_process(train.main, "train.py", "--resume", run_dir / "last.pth.tar",
                       "--model-ema-posthoc", "0.05", "0.10")
    one_line_error(r, "model-ema-posthoc")


def test_a_snapshot_holds_exactly_the_schemas_keys_and_the_readme_shows_them(run_dir):
    """Every snapshot of a real run holds the keys `SNAPSHOT_SCHEMA` names, in its order, and no
    other; the run's record in it is its checkpoint's; the README shows the table."""
    ckpt = torch.load(run_dir / "last.pth.tar", weights_only=True)
    files = snapshots_mod.snapshot_files(run_dir / "posthoc")
    for _, path in files:
        snapshot = torch.load(path, weights_only=True)
        assert list(snapshot) == [k.name for k in snapshots_mod.SNAPSHOT_SCHEMA], path
        assert snapshot["format"] == snapshots_mod.FORMAT and snapshot["fork"] is None
        for key in ("arch", "args", "num_classes", "class_names", "data_config", "run_id"):
            assert snapshot[key] == ckpt[key], key
    assert len(files) == 8
    assert snapshots_mod.snapshot_markdown() in (REPO_ROOT / "README.md").read_text()


def test_the_tracked_power_emas_are_validated_every_epoch_like_any_ema(run_dir):
    rows = list(csv.DictReader(open(run_dir / "summary.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    for sigma in ("0.05", "0.07", "0.1"):
        values = [float(r[f"powersr{sigma}_eval_top1"]) for r in rows]
        assert all(0.0 <= v <= 100.0 for v in values), values
    assert rows[-1]["powersr0.05_eval_loss"] != rows[-1]["powersr0.1_eval_loss"]
    best = torch.load(run_dir / "last.pth.tar", weights_only=True)["keeper"]["best"]
    assert {"power sr0.05", "power sr0.07", "power sr0.1"} <= set(best)
    assert not list(run_dir.glob("model_best_power*"))  # their weights are the snapshots'


def test_a_series_that_would_fill_the_disk_is_refused_and_a_large_one_warned(data, tmp_path,
                                                                            monkeypatch):
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    argv = [data, *TINY, "--epochs", "1", "--model-ema-posthoc", "--output", tmp_path]
    monkeypatch.setattr(curves.CurveRenderer, "submit", lambda *a, **k: None)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, 10**5))
    r = run_in_process(train.main, "train.py", *argv, "--experiment", "full")
    one_line_error(r, "post-hoc EMA: 6 snapshots of")
    assert "GB are free there" in r.stderr and "--model-ema-snapshot-dtype float16" in r.stderr
    assert not (tmp_path / "full").exists()  # nothing left behind
    need = 6 * 4 * sum(p.numel() for p in __import__("timm").create_model(
        "test_resnet", num_classes=3).state_dict().values()) * 2  # two float32 power EMAs
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 2 * need))
    with torch_threads(1):
        r = run_in_process(train.main, "train.py", *argv, "--experiment", "warned")
    assert r.returncode == 0, r.stderr
    assert "warning: post-hoc EMA: 6 snapshots" in r.stderr and "% of the" in r.stderr


def _sub_solution(series, targets, keep: list[int]) -> Solution:
    """Solve with the tracked EMAs `keep` only: zero coefficients for the others."""
    tracked = len(series.gammas)
    columns = [i * tracked + j for i in range(len(series.snapshots)) for j in keep]
    profiles = series.profiles()
    part = solve([profiles[c] for c in columns], targets)
    full = np.zeros((len(targets), len(profiles)))
    full[:, columns] = part.coefficients
    return Solution(full, part.fit_errors)


def test_reconstructions_from_a_run_match_emas_it_tracked(run_dir, data):
    """From the 0.05 and 0.10 snapshots: the 0.07 power EMA (tracked too, in the same run) and
    the half-life 4it EMA (the regular shadow): weights close, the same top-1 within 1 image."""
    series = series_mod.read_series(run_dir)
    t = series.updates
    targets = [Profile("power", series.gammas[1], t), Profile("exp", 0.5 ** (1 / 4), t)]
    solution = _sub_solution(series, targets, keep=[0, 2])
    states, _ = series_mod.synthesize(series, solution)
    direct = [snapshots_mod.load_shadows(series.snapshots[-1])[1],
              torch.load(run_dir / "last.pth.tar", weights_only=True)["state_dict_ema"]]
    errors = []
    for state, want in zip(states, direct):
        keys = [k for k in want if want[k].is_floating_point() and "running" not in k]
        diff = sum(((state[k] - want[k]) ** 2).sum() for k in keys).sqrt()
        errors.append(float(diff / sum((want[k] ** 2).sum() for k in keys).sqrt()))
    # Measured (relative to the weights' norm): power 0.07 fit error 0.9%, weight error 7.7e-6;
    # the exponential EMA fit error 6.7% (its 1.6% share of theta_0, which no power EMA holds),
    # weight error 0.11%. Coefficients that did not sum to one were 74x and 24x farther (5.7e-4
    # and 2.7%): the weights' mean was rebuilt scaled by their sum.
    assert solution.fit_errors[0] < 0.02 and errors[0] < 1e-4, (solution.fit_errors, errors)
    assert solution.fit_errors[1] < 0.1 and errors[1] < 0.01, (solution.fit_errors, errors)
    tr = make_training([data, *TINY])
    model = tr.run.module
    model.load_state_dict(states[0])
    bank = evaluation.WeightBank(model, [direct[0], states[1], direct[1]], torch.float32)
    _, val_loader = tr.run.data.loaders(0, 0, 3)
    scores = score(model, val_loader, torch.device("cpu"), ema=bank,
                   normalize=tr.run.data.normalize)
    tr.run.data.close()
    one_image = 100.0 / scores[0]["count"]
    assert abs(scores[0]["top1"] - scores[1]["top1"]) <= one_image + 1e-9
    assert abs(scores[2]["top1"] - scores[3]["top1"]) <= one_image + 1e-9


def test_the_sweep_writes_its_table_files_and_a_best_file_timm_reads(run_dir, data):
    r = run_in_process(validate.main, "validate.py", data, "--posthoc", run_dir, "-j", "0",
                       "--half-life", "4it")
    assert r.returncode == 0, r.stderr
    rows = (run_dir / "posthoc.csv").read_text().splitlines()
    # raw, the run's regular EMA (half-life 4it), three tracked, the default sweep of ten, one
    # half-life.
    assert len(rows) == 1 + 1 + 1 + 3 + 10 + 1 and rows[1].startswith("raw,raw")
    assert rows[2].startswith("ema hl4it,ema,")
    assert (run_dir / "posthoc.png").stat().st_size > 10_000
    best = ckpt_files.load_file(run_dir / "model_posthoc_best.pth.tar")
    info = best["posthoc"]
    assert info["snapshots"] == 8 and info["tracked_sigma_rels"] == [0.05, 0.07, 0.1]
    line = next(x for x in r.stdout.splitlines() if x.endswith("<- best"))
    assert line.startswith(info["target"])
    # The tracked 0.05 row is its last snapshot; its reconstruction (the first sweep value near
    # it is not it) is checked exactly in the arithmetic tests above.
    r2 = run_in_process(validate.main, "validate.py", data, "--checkpoint",
                        run_dir / "model_posthoc_best.pth.tar", "--use-ema", "-j", "0")
    assert r2.returncode == 0, r2.stderr
    assert f"top1 {info['top1']:.4f}" in r2.stdout
    # The reconstruction is named by its length and fit wherever it is validated.
    named = f"(ema posthoc sr{info['sigma_rel']:.3g} (fit error {info['fit_error']:.2%})) on "
    assert named in r2.stdout if info["kind"] == "power" else "(ema posthoc hl" in r2.stdout
    # A tracked EMA's row is its last snapshot: the run validated the same weights at its end.
    trained = list(csv.DictReader(open(run_dir / "summary.csv")))[-1]
    swept = {row["weights"]: row for row in csv.DictReader(open(run_dir / "posthoc.csv"))}
    for sigma in ("0.05", "0.07", "0.1"):
        trained_top1 = float(trained[f"powersr{sigma}_eval_top1"])
        assert f"{trained_top1:.4f}" == swept[f"tracked {sigma}"]["top1"]
    # The run's regular EMA, from last.pth.tar: the weights its last epoch validated.
    assert f"{float(trained['eval_top1']):.4f}" == swept["ema hl4it"]["top1"]
    import timm
    from timm.models import load_checkpoint
    model = timm.create_model("test_resnet", num_classes=3)
    load_checkpoint(model, str(run_dir / "model_posthoc_best.pth.tar"), use_ema=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, best["state_dict_ema"][k]), k
