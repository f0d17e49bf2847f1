"""The shadows' BatchNorm policy and switch-EMA (`ematrain.ema.policies`), the horizon lines of
the start-up log and the final advice (`ematrain.ema.horizons`).

The recalibration reference is computed here by hand in float64: a BatchNorm after a Linear
layer sees ``x @ W.T + b`` of the *shadow's* W and b, so its recalibrated running mean is the
mean of the batch means and its variance the mean of the unbiased batch variances.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import run_in_process, tiny_args, torch_threads
from torch import nn

from ematrain.cli import train
from ematrain.ema import ModelEma
from ematrain.ema.horizons import RunLength, advice, startup_lines
from ematrain.ema.policies import ShadowPolicy, copy_statistics, recalibrate, switch_to_shadow

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")

TINY = tiny_args("--seed", "5", "--model-ema-decay", "0.8", epochs=None)


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).double()


def perturb(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 4, generator=gen, dtype=torch.float64) * 3 + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64))


def state(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("device", [None, "cpu"])
def test_recalibrate_matches_hand_computed_statistics_and_keeps_the_raw_weights(device):
    model = bn_net()
    ema = ModelEma(model, decay=[0.5, 0.9], device=device)
    for seed in range(3):
        perturb(model, seed)
        ema.update(model)
    raw = state(model)
    gen = torch.Generator().manual_seed(9)
    batches = [torch.randn(8, 4, generator=gen, dtype=torch.float64) * 2 for _ in range(3)]
    recalibrate(ema, model, lambda: iter(batches))
    assert_equal(state(model), raw)  # bit for bit
    for shadow in ema.shadows:
        w, b = shadow[0].weight, shadow[0].bias
        outs = [x @ w.T + b for x in batches]
        mean = torch.stack([o.mean(0) for o in outs]).mean(0)
        var = torch.stack([o.var(0, unbiased=True) for o in outs]).mean(0)
        torch.testing.assert_close(shadow[1].running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(shadow[1].running_var, var, rtol=1e-12, atol=1e-12)
        assert int(shadow[1].num_batches_tracked) == 3
        assert not shadow.training and shadow[1].momentum == 0.1  # put back as they were


def test_copy_takes_the_live_statistics_and_nothing_else():
    model = bn_net()
    ema = ModelEma(model, decay=0.9)
    perturb(model, 1)
    ema.update(model)
    before = state(ema.module)
    ShadowPolicy(bn="copy").apply(ema, model, 0, prepare=lambda x: x)
    after = state(ema.module)
    for k in after:
        want = model.state_dict()[k] if k.startswith("1.") and "running" in k else before[k]
        assert torch.equal(after[k], want), k
    copy_statistics(model, ema.module)  # idempotent
    assert_equal(state(ema.module), after)


# ----------------------------------------------------------------------------- switch
def test_switch_loads_the_first_shadow_and_keeps_the_optimizer_state():
    model = bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = ModelEma(model, decay=[0.5, 0.9])
    for seed in range(3):
        model.train()
        loss = model(torch.randn(8, 4, generator=torch.Generator().manual_seed(seed),
                                 dtype=torch.float64)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
    params = list(model.parameters())
    momenta = [opt.state[p]["momentum_buffer"].clone() for p in params]
    switch_to_shadow(ema, model)
    assert_equal(state(model), state(ema.shadows[0]))
    assert list(model.parameters()) == params  # the same Parameter objects
    for p, m in zip(params, momenta):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)


def test_switch_runs_resume_exactly_and_differ_from_plain_runs(small_data, tmp_path):
    """Two epochs straight vs one epoch, then --resume for the second: the same bits. The
    switched run's raw weights are its EMA's at each epoch end, unlike a plain run's."""
    def run(*extra, out="a"):
        with torch_threads(1):
            r = run_in_process(train.main, "train.py", small_data, *TINY, "--output",
                               tmp_path / out, "--experiment", "x", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        return r
    run("--epochs", "2", "--model-ema-switch", out="straight")
    run("--epochs", "1", "--model-ema-switch", out="resumed")
    run("--resume", tmp_path / "resumed" / "x" / "last.pth.tar", "--epochs", "2", out="resumed")
    run("--epochs", "2", out="plain")
    load = (lambda name: torch.load(tmp_path / name / "x" / "last.pth.tar", weights_only=True))
    straight, resumed, plain = load("straight"), load("resumed"), load("plain")
    for key in ("state_dict", "state_dict_ema"):
        assert_equal(straight[key], resumed[key])
    assert_equal(straight["state_dict"], straight["state_dict_ema"])
    assert not torch.equal(plain["state_dict"]["fc.weight"], plain["state_dict_ema"]["fc.weight"])
    assert not torch.equal(plain["state_dict"]["fc.weight"], straight["state_dict"]["fc.weight"])


def test_recalibration_leaves_the_raw_training_untouched(small_data, tmp_path):
    """Two epochs with --model-ema-bn recalibrate: raw weights bit-identical to a run without
    it; the saved shadow holds other BatchNorm statistics but the same averaged weights."""
    outs = {}
    for name, extra in {"avg": [], "recal": ["--model-ema-bn", "recalibrate",
                                             "--model-ema-bn-batches", "2"]}.items():
        with torch_threads(1):
            r = run_in_process(train.main, "train.py", small_data, *TINY, "--epochs", "2",
                               "--output", tmp_path / name, "--experiment", "x", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        # 12 steps; decay 0.8 is a half-life of 3.1 steps once the start weights hold < half.
        assert ("EMA 0.8 (constant schedule): effective half-life at 10% / 50% / 100% of the run "
                "start / 3.11 / 3.11 steps") in r.stderr
        outs[name] = torch.load(tmp_path / name / "x" / "last.pth.tar", weights_only=True)
    assert_equal(outs["avg"]["state_dict"], outs["recal"]["state_dict"])
    avg, recal = outs["avg"]["state_dict_ema"], outs["recal"]["state_dict_ema"]
    stats = [k for k in avg if "running" in k]
    assert stats and all(not torch.equal(avg[k], recal[k]) for k in stats)
    # Epoch 1's updates start from epoch 0's recalibrated statistics, but never the weights.
    weights = [k for k in avg if k.endswith("weight") and "bn" not in k]
    assert all(torch.equal(avg[k], recal[k]) for k in weights)


# ----------------------------------------------------------------------------- horizons
def test_startup_log_states_the_real_horizon_of_timm_warmup():
    """The issue's case: --model-ema-decay 0.9998 --model-ema-warmup on a 10-epoch run."""
    ema = ModelEma(bn_net(), decay=0.9998, warmup=True)
    length = RunLength(steps_per_epoch=500, total_steps=5000, images_per_step=128)
    lines = startup_lines(ema, ["EMA 0.9998"], length)
    (info, line), (warn, warning) = lines
    assert not info and warn
    # timm's warmup decay at step t is 1 - (1 + t)^(-2/3): the half-life of the decay in force
    # at the end is ln 0.5 / ln(that), about 204 steps; the shadow's real one is a bit less.
    in_force = math.log(0.5) / math.log(1 - 5001 ** (-2 / 3))
    end = float(line.split("of the run ")[1].split(" steps")[0].split(" / ")[2])
    assert 0.5 * in_force < end < in_force
    assert "the decay 0.9998 alone means 3466 steps" in line or "3465" in line
    assert "353,552 steps" in warning and "71x the run" in warning


def test_advice_names_the_long_ema_and_a_setting():
    ema = ModelEma(bn_net(), decay=[0.99, 0.9995])
    length = RunLength(steps_per_epoch=20, total_steps=300, images_per_step=64)
    lines = advice(ema, ["EMA 0.99", "EMA 0.9995"], length, raw=97.5, finals=[98.1, 19.2],
                   metric="top1")
    assert len(lines) == 1
    assert lines[0].startswith("EMA 0.9995 ended worse than the raw weights (top1 19.20 vs raw "
                               "97.50): its horizon at the end (longer than the run)")
    assert "try --model-ema-half-life 0.75ep" in lines[0]
    assert advice(ema, ["a", "b"], length, raw=0.5, finals=[0.4, 0.45], metric="loss") == []


@pytest.mark.parametrize("per_epoch,epochs,decay,every", [
    (2, 10, 0.995, 1),   # the case: 5% of a 20-step run is 0.1 epoch, 1 step
    (2, 2, 0.7, 1),      # a 4-step run: no shorter horizon of a few updates exists
    (100, 10, 0.5, 1),   # a horizon of 1 step: too short
    (22, 10, 0.995, 4),  # updates every 4 steps: a few updates are 16 steps
    (3, 10, 0.9, 1),     # 0.9 (6.6 steps) on 30 steps: long, and 5% of the run is 1.5 steps
])
def test_advice_never_proposes_a_horizon_under_a_few_updates_or_the_one_it_had(
        per_epoch, epochs, decay, every):
    from ematrain.ema.horizons import MIN_ADVISED_UPDATES, effective_half_lives
    ema = ModelEma(bn_net(), decay=decay, every=every)
    length = RunLength(steps_per_epoch=per_epoch, total_steps=per_epoch * epochs,
                       images_per_step=32)
    (line,) = advice(ema, ["EMA"], length, raw=90.0, finals=[20.0], metric="top1")
    (had,) = effective_half_lives(ema.schedule, length.total_steps, every)
    if "--model-ema-half-life" not in line:
        assert ("train longer" in line or "schedule debias" in line), line
        assert had < 1.5 * MIN_ADVISED_UPDATES * every, (line, had)
        return
    text = line.split("--model-ema-half-life ")[1].split()[0]
    steps = float(text[:-2]) * per_epoch if text.endswith("ep") else float(text[:-2])
    assert steps >= MIN_ADVISED_UPDATES * every, line
    assert not 0.75 * had < steps < 1.5 * had, (line, had)
