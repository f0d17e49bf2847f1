"""Post-hoc coefficients sum to one: a constant weight comes back as itself (to 1e-12, also from
a sparse series, also through a real run and validate.py --posthoc), and on simulated weight
sequences the reconstruction is at least as close to the exact discrete power EMA as EDM2's
published solve.

The reference is EDM2's ``solve_posthoc_coefficients`` (Karras et al. 2024, appendix C.3,
Algorithm 3; NVlabs/edm2 ``training/phema.py`` at commit 4bf8162f601bcc09472ce8a32dd0cbe8889dc8fc),
written again here from the paper: continuous power profiles ``(g+1) tau^g / t^(g+1)`` on
``[0, t]``, their inner products in closed form, the normal equations solved as they are and
each column of coefficients divided by its sum.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_imagefolder, run_in_process, torch_threads

from ematrain.checkpoint import files as ckpt_io
from ematrain.cli import train, validate
from ematrain.ema.schedules import sigma_rel_to_gamma
from ematrain.posthoc import Profile, solve
from ematrain.posthoc import series as series_mod
from ematrain.posthoc import snapshots as snapshots_mod
from ematrain.posthoc.sweep import default_sigma_rels

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")

TRACKED = (0.05, 0.10)
SWEEP = default_sigma_rels(TRACKED)  # 0.0125 .. 0.25


# ----------------------------------------------------------------------------- EDM2's solve
def edm2_exponent(sigma_rel: float) -> float:
    """The power exponent of a relative width (EDM2 Algorithm 2): the largest real root of
    ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2)``."""
    inv = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv]).real.max())


def edm2_inner(t_a, g_a, t_b, g_b):
    """<p_a, p_b> of continuous power profiles ending at t_a and t_b (EDM2 Algorithm 3)."""
    ratio = t_a / t_b
    power = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * ratio ** power / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def edm2_solve(times, sigma_rels, target_t, target_sigma_rels) -> np.ndarray:
    """EDM2's coefficients (targets x snapshots) for snapshots at `times` of `sigma_rels`."""
    t = np.array(times, dtype=np.float64)[:, None]
    g = np.array([edm2_exponent(s) for s in sigma_rels])[:, None]
    g_out = np.array([edm2_exponent(s) for s in target_sigma_rels])[None, :]
    a = edm2_inner(t, g, t.T, g.T)
    b = edm2_inner(t, g, np.full_like(g_out, float(target_t)), g_out)
    x = np.linalg.solve(a, b)
    return (x / x.sum(axis=0)).T


# ----------------------------------------------------------------------------- exact EMAs
def power_emas(thetas: np.ndarray, sigma_rels, at: set[int]) -> dict[int, np.ndarray]:
    """Power EMAs of `thetas` updated step by step in float64 with ``beta_t = (1 - 1/t)^(g+1)``
    (the first update replaces theta_0): {t: array (profiles x size)} at the steps `at`."""
    gammas = np.array([sigma_rel_to_gamma(s) for s in sigma_rels])[:, None]
    ema = np.repeat(thetas[:1], len(gammas), axis=0)
    out = {}
    for t in range(1, len(thetas)):
        beta = (1.0 - 1.0 / t) ** (gammas + 1.0)
        ema = beta * ema + (1.0 - beta) * thetas[t]
        if t in at:
            out[t] = ema.copy()
    return out


def signal(kind: str, steps: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Iterates theta_0 .. theta_steps of one kind of weight."""
    rng = np.random.default_rng(seed)
    k = np.arange(steps + 1)[:, None] / steps
    if kind == "random walk":  # a weight under SGD: its init, steps and a drift
        return (rng.normal(scale=0.1, size=size) + k * rng.normal(scale=0.3, size=size)
                + np.cumsum(rng.normal(scale=0.01, size=(steps + 1, size)), axis=0))
    if kind == "walk around 1":  # a LayerNorm gain
        return 1.0 + np.cumsum(rng.normal(scale=1e-3, size=(steps + 1, size)), axis=0)
    if kind == "noisy slow drift":  # a mean moving slowly under large step-to-step noise
        return (rng.normal(scale=0.5, size=size) + k * rng.normal(scale=0.2, size=size)
                + rng.normal(scale=0.05, size=(steps + 1, size)))
    assert kind == "running_var"  # BatchNorm's: momentum 0.1 over noisy batch variances
    true = rng.uniform(0.5, 2.0, size) * np.exp(-k * rng.uniform(0.5, 2.0, size))
    out = np.empty((steps + 1, size))
    out[0] = 1.0
    for i in range(1, steps + 1):
        batch = true[i] * rng.chisquare(32, size) / 32
        out[i] = 0.9 * out[i - 1] + 0.1 * batch
    return out


def even_times(updates: int, count: int) -> list[int]:
    return [round(updates * (i + 1) / count) for i in range(count)]


@pytest.mark.parametrize("kind", ["random walk", "walk around 1", "noisy slow drift",
                                  "running_var"])
def test_reconstructions_are_at_least_as_close_to_the_exact_ema_as_edm2s(kind):
    """The default series (sigma_rel 0.05 and 0.10, 32 snapshots over 3,200 updates) and the
    default sweep; relative weight errors against the exact discrete EMA. Measured, ours/EDM2
    (seed 0 here; seeds 0-9 of each kind in brackets): over the sweep (root sum of squares)
    0.86-0.92 (0.86-0.95); beyond the tracked lengths (0.179, 0.25) 0.57-0.83 at each
    (0.55-0.84); on the well-fit middle targets, where both are within 1e-5 of the weights and
    which is closer depends on the signal, up to 1.05 (1.10). Asserted: over the sweep at least
    4% closer, beyond the tracked lengths at least 10% closer at each, no target more than 15%
    farther."""
    updates = 3200
    times = even_times(updates, 32)
    thetas = signal(kind, updates)
    tracked = power_emas(thetas, TRACKED, set(times))
    stack = np.concatenate([tracked[t] for t in times])  # snapshot-major, as Series.profiles
    exact = power_emas(thetas, SWEEP, {updates})[updates]
    ours = solve([Profile("power", sigma_rel_to_gamma(s), t) for t in times for s in TRACKED],
                 [Profile("power", sigma_rel_to_gamma(s), updates) for s in SWEEP]).coefficients
    edm2 = edm2_solve([t for t in times for _ in TRACKED], [s for _ in times for s in TRACKED],
                      updates, SWEEP)

    def errors(coefficients):
        return (np.linalg.norm(coefficients @ stack - exact, axis=1)
                / np.linalg.norm(exact, axis=1))
    e_ours, e_edm2 = errors(ours), errors(edm2)
    report = " ".join(f"{s:g}:{a:.2e}/{b:.2e}" for s, a, b in zip(SWEEP, e_ours, e_edm2))
    assert np.linalg.norm(e_ours) <= 0.96 * np.linalg.norm(e_edm2), report
    beyond = [i for i, s in enumerate(SWEEP) if s > 1.5 * max(TRACKED)]
    assert len(beyond) == 2 and (e_ours[beyond] <= 0.9 * e_edm2[beyond]).all(), report
    assert (e_ours <= 1.15 * e_edm2).all(), report


def test_our_fit_of_the_discrete_profiles_is_no_worse_than_edm2s():
    """The least-squares optimum among sums to one: EDM2's normalised coefficients, scored on
    the same discrete profiles, never fit better (a short run, where the continuous profiles
    differ most, and the default series)."""
    for updates, count in ((96, 32), (3200, 32)):
        times = even_times(updates, count)
        snapshots = [Profile("power", sigma_rel_to_gamma(s), t) for t in times for s in TRACKED]
        targets = [Profile("power", sigma_rel_to_gamma(s), updates) for s in SWEEP]
        ours = solve(snapshots, targets)
        edm2 = edm2_solve([t for t in times for _ in TRACKED],
                          [s for _ in times for s in TRACKED], updates, SWEEP)
        w = np.stack([p.weights(0, updates + 1) for p in snapshots])
        for j, target in enumerate(targets):
            want = target.weights(0, updates + 1)
            edm2_fit = np.linalg.norm(edm2[j] @ w - want) / np.linalg.norm(want)
            assert ours.fit_errors[j] <= edm2_fit * (1 + 1e-9) + 1e-14, (updates, SWEEP[j])


# ----------------------------------------------------------------------------- sums to one
SERIES = {
    "default": (even_times(3200, 32), TRACKED),
    # The sparse run: 12 epochs of 3 steps, a snapshot every 3 epochs.
    "sparse": ([9, 18, 27, 36], TRACKED),
    "long sparse": ([25_000, 50_000, 75_000, 100_000], TRACKED),
    # More profiles than iterates: the least squares has many exact solutions.
    "dense": (list(range(1, 21)), (0.05, 0.07, 0.10)),
    "one tracked": (even_times(500, 8), (0.10,)),
}


@pytest.mark.parametrize("name", list(SERIES))
def test_the_coefficients_sum_to_one_and_a_constant_comes_back_as_itself(name):
    times, tracked = SERIES[name]
    end = times[-1]
    snapshots = [Profile("power", sigma_rel_to_gamma(s), t) for t in times for s in tracked]
    targets = ([Profile("power", sigma_rel_to_gamma(s), end) for s in SWEEP + [0.07]]
               + [Profile("exp", d, end) for d in (0.5, 0.9, 0.999)])
    solution = solve(snapshots, targets)
    assert np.abs(solution.coefficients.sum(axis=1) - 1.0).max() < 1e-12
    # Every snapshot of a constant weight is that constant, in float64 as training keeps it.
    constant = np.array([1.0, -0.37, 4.2e-3, 1e4])
    rebuilt = solution.coefficients @ np.tile(constant, (len(snapshots), 1))
    assert np.abs(rebuilt / constant - 1.0).max() < 1e-12


def test_a_sparse_series_of_constant_weights_is_synthesized_as_those_weights(tmp_path):
    """snapshots.synthesize (float64 sums, BatchNorm variances clamped) from float64 snapshots
    of weights that never change: every target, sigma_rel 0.25 included, is them to 1e-12."""
    weights = {"w": torch.linspace(-2.0, 3.0, 50, dtype=torch.float64),
               "bn.running_var": torch.linspace(1e-3, 2.0, 50, dtype=torch.float64),
               "bn.num_batches_tracked": torch.tensor(36)}
    meta = {k: None for k in snapshots_mod.META_KEYS} | {"every": 1, "steps_per_epoch": 3,
                                                         "images_per_step": 8, "num_classes": 2,
                                                         "class_names": ["a", "b"]}
    gammas = [sigma_rel_to_gamma(s) for s in TRACKED]
    for t in (9, 18, 27, 36):
        entry = snapshots_mod.snapshot_entry([weights, weights], TRACKED, gammas, t, t,
                                             torch.float64, meta)
        ckpt_io.write_file(tmp_path / snapshots_mod.snapshot_name(t), entry)
    series = series_mod.read_series(tmp_path)
    solution = solve(series.profiles(), [Profile("power", sigma_rel_to_gamma(s), 36)
                                         for s in SWEEP])
    states, clamped = series_mod.synthesize(series, solution)
    assert clamped == 0
    for state in states:
        for k in ("w", "bn.running_var"):
            assert ((state[k] - weights[k]).abs() / weights[k].abs()).max() < 1e-12, k
        assert torch.equal(state["bn.num_batches_tracked"], weights["bn.num_batches_tracked"])


def test_weights_that_never_change_come_back_from_the_sweep_as_themselves(tmp_path):
    """The issue's run, small: test_resnet for 12 epochs at --lr 1e-30 (the weights never
    change, so every EMA of them is them), a snapshot every 3 epochs (4 snapshots), then
    validate.py --posthoc --sigma-rel 0.25: the best file's parameters are the raw weights to
    float32 rounding (the unconstrained solve was 17.8% off)."""
    data = make_imagefolder(tmp_path / "data", num_classes=2, train_per_class=8,
                            val_per_class=2)
    with torch_threads(1):
        r = run_in_process(train.main, "train.py", data, "--model", "test_resnet",
                           "--img-size", "32", "-b", "8", "-j", "0", "--epochs", "12",
                           "--warmup-epochs", "0", "--lr", "1e-30", "--weight-decay", "0",
                           "--model-ema-posthoc", "--model-ema-snapshot-every", "3ep",
                           "--seed", "0", "--output", tmp_path / "out", "--experiment", "r")
        assert r.returncode == 0, r.stderr[-2000:]
        run_dir = tmp_path / "out" / "r"
        assert len(snapshots_mod.snapshot_files(run_dir / snapshots_mod.FOLDER)) == 4
        r = run_in_process(validate.main, "validate.py", data, "--posthoc", run_dir,
                           "--sigma-rel", "0.25", "-j", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    best = ckpt_io.load_file(run_dir / "model_posthoc_best.pth.tar")
    assert best["posthoc"]["target"] == "sigma_rel 0.25"
    raw = ckpt_io.load_file(run_dir / "last.pth.tar")["state_dict"]
    import timm
    names = [n for n, _ in timm.create_model("test_resnet", num_classes=2).named_parameters()]
    rebuilt = best["state_dict_ema"]
    diff = sum(((rebuilt[n].double() - raw[n].double()) ** 2).sum() for n in names).sqrt()
    norm = sum((raw[n].double() ** 2).sum() for n in names).sqrt()
    assert float(diff / norm) < 1e-6
