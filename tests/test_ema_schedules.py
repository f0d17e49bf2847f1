"""EMA schedules (`ematrain.ema.schedules`) against float64 references written here.

Each reference computes the shadow as an explicit weighted sum of the model's iterates (not the
recursion ModelEma runs): constant and timm from their decay products, debias as the normalised
exponential average, power from EDM2's closed-form weights ``(i**(g+1) - (i-1)**(g+1)) /
k**(g+1)``. The models are float64 so that the comparison is tight (1e-10): a decay off by one
step, or an update counted wrongly, is off by orders of magnitude more.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from conftest import torch_threads
from torch import nn

from ematrain.ema import ModelEma
from ematrain.ema.horizons import effective_half_lives, start_shares
from ematrain.ema.schedules import (
    Constant,
    Debias,
    Power,
    TimmWarmup,
    gamma_to_sigma_rel,
    make_schedule,
    sigma_rel_to_gamma,
)

STEPS = 60


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(dtype)


def step(model: nn.Module, gen: torch.Generator) -> None:
    """A stand-in optimizer step: a train-mode forward (BatchNorm statistics move) and a random
    change of every parameter."""
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 6, generator=gen, dtype=torch.float64).to(next(model.parameters())))
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype), alpha=0.1)


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().to(torch.float64, copy=True)
            for k, v in model.state_dict().items() if v.is_floating_point()}


def weighted(states: list[dict], weights: list[float]) -> dict:
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-12)
    return {k: sum(w * s[k] for w, s in zip(weights, states)) for k in states[0]}


# --------------------------------------------------------------------------- references
def ref_weights(kind: str, target: float, steps: int, every: int) -> list[float]:
    """Weights of the start state and of the iterate after each update (k = 1..K)."""
    K = steps // every
    if kind == "debias":
        b = target ** every
        norm = sum(b ** (K - i) for i in range(1, K + 1))
        return [0.0] + [b ** (K - i) / norm for i in range(1, K + 1)]
    if kind == "power":
        g = sigma_rel_to_gamma(target)
        return [0.0] + [(i ** (g + 1) - (i - 1) ** (g + 1)) / K ** (g + 1) for i in range(1, K + 1)]
    if kind == "constant":
        per = [target ** every] * K
    else:  # timm, power 2/3, gamma 1, of each interval's first step
        per = [min(target, 1 - (1 + (k * every)) ** (-2 / 3)) ** every for k in range(K)]
    # Iterate k keeps (1 - d_k) * prod_{j > k} d_j; the start state prod of all.
    weights = [math.prod(per)]
    for k in range(K):
        weights.append((1 - per[k]) * math.prod(per[k + 1:]))
    return weights


SCHEDULE_TARGETS = {
    "constant": [0.9, 0.97, 0.995],
    "timm": [0.9, 0.97, 0.995],
    "debias": [0.9, 0.97, 0.995],
    "power": [0.05, 0.1, 0.2],
}


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("kind", list(SCHEDULE_TARGETS))
def test_each_schedule_matches_its_float64_reference(kind, every):
    model = net()
    gen = torch.Generator().manual_seed(1)
    targets = SCHEDULE_TARGETS[kind]
    schedule = make_schedule(kind, targets)
    ema = ModelEma(model, device="cpu", every=every, schedule=schedule)
    states = [snapshot(model)]  # the start, then the model at each update
    for n in range(1, STEPS + 1):
        step(model, gen)
        applied = ema.update(model)
        assert applied == (n % every == 0)
        if applied:
            states.append(snapshot(model))
    assert ema.num_updates == STEPS // every
    for shadow, target in zip(ema.shadows, targets):
        want = weighted(states, ref_weights(kind, target, STEPS, every))
        got = shadow.state_dict()
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, atol=1e-10, rtol=1e-10, msg=lambda m: f"{k} {m}")


@pytest.mark.parametrize("kind", ["timm", "debias", "power"])
def test_warm_schedules_give_the_start_weights_no_share(kind):
    """The first update copies the model (constant keeps the start weights: timm #1182)."""
    model = net()
    ema = ModelEma(model, schedule=make_schedule(kind, SCHEDULE_TARGETS[kind]), every=2)
    assert ema.current_decays() == [0.0, 0.0, 0.0]
    step(model, torch.Generator().manual_seed(2))
    ema.update(model)
    ema.update(model)
    for shadow in ema.shadows:
        for k, v in model.state_dict().items():
            assert torch.equal(shadow.state_dict()[k], v), k


def test_float32_cpu_shadow_follows_the_same_arithmetic():
    """A float32 model, shadows kept in host memory: the same decays, float32 rounding only."""
    model = net(torch.float32)
    gen = torch.Generator().manual_seed(3)
    ema = ModelEma.power(model, [0.08, 0.15], device="cpu", every=2)
    states = [snapshot(model)]
    for n in range(1, 41):
        step(model, gen)
        if ema.update(model):
            states.append(snapshot(model))
    for shadow, sr in zip(ema.shadows, [0.08, 0.15]):
        want = weighted(states, ref_weights("power", sr, 40, 2))
        for k, v in want.items():
            torch.testing.assert_close(shadow.state_dict()[k].double(), v, atol=2e-6, rtol=2e-6)


# --------------------------------------------------------------------------- sigma_rel
def test_sigma_rel_and_gamma_convert_both_ways():
    # EDM2's paper: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for gamma in [0.0, 0.5, 3.0, 6.94, 16.97, 200.0]:
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-10,
                                                                               abs=1e-9)
    # sigma_rel is the standard deviation of the profile t**gamma on [0, 1] (midpoint rule).
    t = (np.arange(200_000) + 0.5) / 200_000
    for gamma in [1.0, 6.94]:
        p = t ** gamma / np.sum(t ** gamma)
        std = math.sqrt(np.sum(p * t * t) - np.sum(p * t) ** 2)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(std, rel=1e-6)
    for bad in [0.0, -0.1, 0.3]:
        with pytest.raises(ValueError):
            sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError):
        Power(sigma_rels=[0.1], gammas=[3.0])
    assert Power(gammas=[6.94]).targets[0] == pytest.approx(0.1, abs=1e-4)


def test_a_power_shadow_has_the_width_it_was_given():
    """Over many updates the power shadow's weights on the iterates have std sigma_rel * t."""
    schedule = Power(sigma_rels=[0.1])
    K = 4000
    decays = np.array([schedule.decays(k)[0] for k in range(K)])
    # Weight of update k: (1 - d_k) * prod_{j > k} d_j.
    tail = np.concatenate([np.cumprod(decays[::-1])[::-1][1:], [1.0]])
    weights = (1 - decays) * tail
    t = np.arange(1, K + 1) / K
    std = math.sqrt(np.sum(weights * t * t) - np.sum(weights * t) ** 2)
    assert weights.sum() == pytest.approx(1.0, rel=1e-12)
    assert std == pytest.approx(0.1, rel=2e-3)


# --------------------------------------------------------------------------- state, resume
@pytest.mark.parametrize("kind", list(SCHEDULE_TARGETS))
def test_resume_mid_interval_continues_exactly(kind):
    gen = torch.Generator().manual_seed(4)
    model = net()
    kwargs = dict(every=3, device="cpu")
    ema = ModelEma(model, schedule=make_schedule(kind, SCHEDULE_TARGETS[kind]), **kwargs)
    for _ in range(10):  # 3 updates, one step into the next interval
        step(model, gen)
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.full_state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["schedule"]["name"] == kind
    fresh = ModelEma(net(), schedule=make_schedule(kind, SCHEDULE_TARGETS[kind]), **kwargs)
    fresh.load_full_state_dict(state)
    for _ in range(11):
        step(model, gen)
        assert ema.update(model) == fresh.update(model)
    for a, b in zip(ema.shadows, fresh.shadows):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k


def test_power_state_does_not_load_into_decay_shadows():
    state = ModelEma.power(net(), [0.1]).full_state_dict()
    with pytest.raises(ValueError, match="power"):
        ModelEma(net(), decay=0.1).load_full_state_dict(state)


def test_old_warmup_flag_is_the_timm_schedule():
    ema = ModelEma(net(), decay=0.99, warmup=True, warmup_power=0.75)
    assert isinstance(ema.schedule, TimmWarmup)
    assert ema.schedule.power == 0.75
    assert isinstance(ModelEma(net(), decay=0.99).schedule, Constant)
    assert isinstance(ModelEma(net(), decay=0.99, schedule="debias").schedule, Debias)
    with pytest.raises(ValueError):
        ModelEma(net(), decay=0.99, warmup=True, schedule="debias")
    with pytest.raises(ValueError):
        make_schedule("cosine", [0.9])


# --------------------------------------------------------------------------- horizons
def brute_half_life(schedule, index: int, steps: int, every: int) -> float:
    """Smallest age (in whole updates, times every) holding at least half the weight."""
    K = steps // every
    per = [schedule.decays(k * every, every)[index] for k in range(K)]
    older = 1.0
    for m in range(1, K + 1):
        older *= per[K - m]
        if older <= 0.5:
            return m * every
    return math.inf


@pytest.mark.parametrize("kind,every", [("constant", 1), ("timm", 1), ("timm", 4),
                                        ("debias", 2), ("power", 1)])
def test_effective_half_life_matches_brute_force(kind, every):
    schedule = make_schedule(kind, SCHEDULE_TARGETS[kind][:2])
    for steps in [40, 400, 3000]:
        got = effective_half_lives(schedule, steps, every)
        for i, h in enumerate(got):
            want = brute_half_life(schedule, i, steps, every)
            if math.isinf(want):
                assert math.isinf(h)
            else:  # interpolated within the last update
                assert want - every <= h <= want + 1e-9


def test_effective_half_life_of_a_constant_decay_is_its_half_life():
    assert effective_half_lives(Constant([0.99]), 10_000)[0] == pytest.approx(
        math.log(0.5) / math.log(0.99), rel=1e-9)
    assert math.isinf(effective_half_lives(Constant([0.9999]), 1000)[0])  # start holds > half
    assert start_shares(Constant([0.9, 0.99]), 30, every=3) == pytest.approx([0.9 ** 30,
                                                                              0.99 ** 30])
    assert start_shares(Debias([0.99]), 30) == [0.0]


def test_timm_warmup_horizon_is_far_below_its_target():
    """The issue's numbers: 0.9998 is reached after ~354,000 updates, 0.999 after ~31,600."""
    sched = TimmWarmup([0.9998, 0.999])
    assert sched.steps_to_target(0) == pytest.approx(353_552, rel=1e-4)
    assert sched.steps_to_target(1) == pytest.approx(31_622, rel=1e-3)
    h = effective_half_lives(sched, 5000)[0]
    assert h < 0.2 * math.log(0.5) / math.log(0.9998)
