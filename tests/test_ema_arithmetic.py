"""Tests for the EMA engine (`ematrain.ema`), checked against hand-computed float64 references.

Every reference is computed independently of `ModelEma`: ``ema = d * ema + (1 - d) * model`` in
float64 from snapshots of the model, so a wrong decay, a missed tensor, a stale tensor list or a
rounding problem shows up as a mismatch.  Where the arithmetic is exact (copies, skipped updates,
restored weights) the comparison is bit for bit.
"""
from __future__ import annotations

import io
import math

import pytest
import timm
import torch
from torch import nn

from ematrain.ema import (
    HalfLife,
    ModelEma,
    decay_from_half_life,
    half_life_from_decay,
    parse_half_life,
    unwrap_model,
    warmup_decay,
)

# A float32 lerp rounds by about one ulp per step; values here are O(1), so a few steps stay far
# inside this.  A wrong decay or a stale tensor is off by orders of magnitude more.
ATOL = 2e-6
RTOL = 1e-6


# --------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tensors are tiny; one thread keeps the file fast on a small, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bn_net(seed: int = 0) -> nn.Module:
    """Small conv net with BatchNorm (float running stats + integer num_batches_tracked)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5),
    )


def big_net(seed: int = 0) -> nn.Module:
    """Has one tensor larger than 2**18 elements (614400), so slicing paths are exercised."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1024, 600), nn.BatchNorm1d(600), nn.ReLU(), nn.Linear(600, 3))


def tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=3)


def train_step(model: nn.Module, gen: torch.Generator, scale: float = 0.05) -> None:
    """Stand-in for an optimizer step: a train-mode forward (moves BatchNorm running stats and
    num_batches_tracked) plus a random perturbation of every parameter."""
    model.train()
    first = next(model.parameters())
    if first.dim() == 4:  # conv first layer
        x = torch.randn(4, 3, 16, 16, generator=gen)
    else:
        x = torch.randn(8, first.shape[1], generator=gen)
    with torch.no_grad():
        model(x.to(dtype=first.dtype, device=first.device))
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen).to(dtype=p.dtype, device=p.device)
            p.add_(noise, alpha=scale)


def float_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """float64 copies of the model's floating-point state, on the CPU."""
    return {k: v.detach().to("cpu", torch.float64, copy=True)
            for k, v in model.state_dict().items() if v.is_floating_point()}


def ema_reference(ref: dict, model: nn.Module, decay: float) -> dict:
    now = float_snapshot(model)
    return {k: decay * ref[k] + (1.0 - decay) * now[k] for k in ref}


def assert_shadow_close(shadow: dict, ref: dict, atol=ATOL, rtol=RTOL) -> None:
    assert set(ref) <= set(shadow)
    for k, want in ref.items():
        got = shadow[k].detach().to("cpu", torch.float64)
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def clone_state(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------- update
@pytest.mark.parametrize("make", [bn_net, tiny_resnet], ids=["bn_net", "test_resnet"])
def test_update_matches_float64_reference(make):
    model = make()
    gen = torch.Generator().manual_seed(1)
    decay = 0.8
    ema = ModelEma(model, decay=decay)
    ref = float_snapshot(model)
    for _ in range(5):
        train_step(model, gen)
        assert ema.update(model) is True
        ref = ema_reference(ref, model, decay)
    shadow = ema.module.state_dict()
    assert_shadow_close(shadow, ref)
    # BatchNorm running stats are averaged, not copied and not frozen.
    for k in ref:
        if k.endswith("running_mean") or k.endswith("running_var"):
            assert not torch.equal(shadow[k], model.state_dict()[k]), k
            assert not torch.equal(shadow[k].double(), float_snapshot(make())[k]), k
    # Integer buffers are copied exactly.
    nbt = [k for k, v in model.state_dict().items() if not v.is_floating_point()]
    assert nbt, "model should have num_batches_tracked buffers"
    for k in nbt:
        assert shadow[k].dtype == model.state_dict()[k].dtype
        assert torch.equal(shadow[k], model.state_dict()[k]), k
        assert int(shadow[k]) == 5
    assert ema.steps == 5 and ema.num_updates == 5 and ema.skipped_nonfinite == 0


def test_shadow_is_eval_frozen_independent_and_runs():
    model = bn_net()
    gen = torch.Generator().manual_seed(2)
    ema = ModelEma(model, decay=0.9)
    assert ema.module is ema.shadows[0]
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    model_ptrs = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    ema_ptrs = {t.data_ptr() for t in list(ema.module.parameters()) + list(ema.module.buffers())}
    assert not model_ptrs & ema_ptrs

    train_step(model, gen)
    ema.set(model)
    assert_state_equal(ema.module.state_dict(), model.state_dict())
    # .set keeps the counters.
    assert ema.steps == 0 and ema.num_updates == 0
    # Same weights, both in eval mode: same outputs.
    model.eval()
    x = torch.randn(3, 3, 8, 8, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ema.module(x), model(x), atol=0, rtol=0)

    # Changing the model afterwards leaves the shadow alone.
    before = clone_state(ema.module.state_dict())
    train_step(model, gen, scale=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    assert_state_equal(ema.module.state_dict(), before)
    assert not ema.module.training  # an update or set does not switch modes


def test_shadow_state_dict_names_and_index():
    model = bn_net()
    ema = ModelEma(model, decay=[0.5, 0.9])
    gen = torch.Generator().manual_seed(3)
    train_step(model, gen)
    ema.update(model)
    for i, d in enumerate([0.5, 0.9]):
        sd = ema.shadow_state_dict(i)
        assert list(sd) == list(model.state_dict())
        assert_state_equal(sd, ema.shadows[i].state_dict())
    assert not torch.equal(ema.shadow_state_dict(0)["0.weight"], ema.shadow_state_dict(1)["0.weight"])


def test_explicit_cpu_device():
    model = bn_net()
    gen = torch.Generator().manual_seed(4)
    ema = ModelEma(model, decay=0.7, device="cpu")
    assert ema.device == torch.device("cpu")
    assert all(t.device.type == "cpu" for t in ema.module.state_dict().values())
    ref = float_snapshot(model)
    for _ in range(3):
        train_step(model, gen)
        ema.update(model)
        ref = ema_reference(ref, model, 0.7)
    assert_shadow_close(ema.module.state_dict(), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decays", [0.7, [0.7, 0.95]])
def test_cuda_model_cpu_shadow(decays):
    model = bn_net().cuda()
    gen = torch.Generator().manual_seed(5)
    ema = ModelEma(model, decay=decays, device="cpu")
    decays = decays if isinstance(decays, list) else [decays]
    assert all(t.device.type == "cpu" for m in ema.shadows for t in m.state_dict().values())
    refs = [float_snapshot(model) for _ in decays]
    for _ in range(3):
        train_step(model, gen)
        assert ema.update(model)
        refs = [ema_reference(r, model, d) for r, d in zip(refs, decays)]
    for i, r in enumerate(refs):
        assert_shadow_close(ema.shadows[i].state_dict(), r)
    # A non-finite CUDA model is detected through the staging copy as well.
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    before = clone_state(ema.module.state_dict())
    assert ema.update(model) is False
    assert_state_equal(ema.module.state_dict(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_shadow_on_cuda():
    model = big_net().cuda()
    gen = torch.Generator().manual_seed(6)
    ema = ModelEma(model, decay=[0.6, 0.9])
    assert ema.module[0].weight.is_cuda
    refs = [float_snapshot(model), float_snapshot(model)]
    for _ in range(3):
        train_step(model, gen)
        ema.update(model)
        refs = [ema_reference(r, model, d) for r, d in zip(refs, [0.6, 0.9])]
    for i, r in enumerate(refs):
        assert_shadow_close(ema.shadows[i].state_dict(), r)


# --------------------------------------------------------------------------------------- decays
def test_several_decays_equal_separate_runs():
    model = nn.Sequential(big_net(), nn.BatchNorm1d(3))
    assert max(p.numel() for p in model.parameters()) > 2 ** 18
    decays = [0.5, 0.9, 0.999]
    gen = torch.Generator().manual_seed(7)
    joint = ModelEma(model, decay=decays)
    singles = [ModelEma(model, decay=d) for d in decays]
    refs = [float_snapshot(model) for _ in decays]
    for _ in range(4):
        train_step(model, gen)
        assert joint.update(model)
        for s in singles:
            assert s.update(model)
        refs = [ema_reference(r, model, d) for r, d in zip(refs, decays)]
    assert joint.current_decays() == decays
    for i, single in enumerate(singles):
        joint_sd, single_sd = joint.shadows[i].state_dict(), single.module.state_dict()
        for k in single_sd:
            torch.testing.assert_close(joint_sd[k], single_sd[k], atol=1e-7, rtol=0,
                                       msg=lambda m: f"decay {decays[i]} {k}: {m}")
        assert_shadow_close(joint_sd, refs[i])
    # The three shadows really differ from each other.
    w = [m[0][0].weight for m in joint.shadows]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


def test_several_decays_with_layout_change_after_creation():
    """A model switched to channels_last after the EMA was built still pairs the right elements."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(64, 80, 8, padding=1), nn.BatchNorm2d(80))  # 327680 > 2**18
    decays = [0.5, 0.9]
    ema = ModelEma(model, decay=decays)
    model = model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    refs = [float_snapshot(model) for _ in decays]
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        assert ema.update(model)
        refs = [ema_reference(r, model, d) for r, d in zip(refs, decays)]
    for i, r in enumerate(refs):
        assert_shadow_close(ema.shadows[i].state_dict(), r)


@pytest.mark.parametrize("decays", [0.6, [0.6, 0.9]], ids=["one", "two"])
def test_channels_last_model_small_and_large_tensors(decays):
    """channels_last tensors (small ones included) are read in their logical element order."""
    torch.manual_seed(18)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 2048, 3))
    ema = ModelEma(model, decay=decays)
    decays = decays if isinstance(decays, list) else [decays]
    gen = torch.Generator().manual_seed(19)
    refs = [float_snapshot(model) for _ in decays]
    for step in range(3):
        if step == 1:
            model = model.to(memory_format=torch.channels_last)
            assert not model[0].weight.is_contiguous() and not model[2].weight.is_contiguous()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        assert ema.update(model)
        refs = [ema_reference(r, model, d) for r, d in zip(refs, decays)]
        for i, r in enumerate(refs):
            assert_shadow_close(ema.shadows[i].state_dict(), r)


def test_shadow_moved_from_outside_keeps_averaging():
    """Converting a shadow module in place (``ema.module.double()``) does not strand updates."""
    model = bn_net()
    gen = torch.Generator().manual_seed(20)
    ema = ModelEma(model, decay=[0.5, 0.8])
    ref = [float_snapshot(model), float_snapshot(model)]
    train_step(model, gen)
    ema.update(model)
    ref = [ema_reference(r, model, d) for r, d in zip(ref, [0.5, 0.8])]
    for m in ema.shadows:
        m.double()
    for _ in range(2):
        train_step(model, gen)
        assert ema.update(model)
        ref = [ema_reference(r, model, d) for r, d in zip(ref, [0.5, 0.8])]
    for m, r in zip(ema.shadows, ref):
        assert m[0].weight.dtype == torch.float64
        assert_shadow_close(m.state_dict(), r)


class _WithNones(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4, bias=False)  # a None parameter slot
        self.norm = nn.LayerNorm(4)
        self.register_module("missing", None)  # a None submodule slot
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.int32))


def test_module_with_none_slots():
    model = _WithNones()
    gen = torch.Generator().manual_seed(21)
    ema = ModelEma(model, decay=0.75)
    ref = float_snapshot(model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
            model.steps_seen += 1
        ema.update(model)
        ref = ema_reference(ref, model, 0.75)
    assert_shadow_close(ema.module.state_dict(), ref)
    assert ema.module.steps_seen.dtype == torch.int32 and int(ema.module.steps_seen) == 3


def test_every_n_equals_one_step_with_power_decay():
    model = big_net()
    gen = torch.Generator().manual_seed(10)
    start = float_snapshot(model)
    n, decay = 4, 0.9
    every = ModelEma(model, decay=decay, every=n)
    single = ModelEma(model, decay=decay)
    assert every.current_decays() == [decay ** n]
    train_step(model, gen)  # then hold the model constant for n steps
    results = [every.update(model) for _ in range(n)]
    for _ in range(n):
        single.update(model)
    assert results == [False] * (n - 1) + [True]
    assert (every.steps, every.num_updates) == (n, 1)
    assert (single.steps, single.num_updates) == (n, n)
    now = float_snapshot(model)
    ref = {k: decay ** n * start[k] + (1 - decay ** n) * now[k] for k in start}
    assert_shadow_close(every.module.state_dict(), ref, atol=1e-6, rtol=0)
    every_sd, single_sd = every.module.state_dict(), single.module.state_dict()
    for k in ref:
        torch.testing.assert_close(every_sd[k], single_sd[k], atol=1e-6, rtol=0)
    # Two more intervals: counters keep step.
    for _ in range(2 * n):
        every.update(model)
    assert (every.steps, every.num_updates) == (3 * n, 3)


# --------------------------------------------------------------------------------------- warmup
def test_warmup_schedule_and_first_update_copies():
    power, gamma, target = 0.75, 2.0, 0.99
    model = bn_net()
    ema = ModelEma(model, decay=[target, 0.5], warmup=True, warmup_power=power,
                   warmup_gamma=gamma)
    for step in [0, 1, 2, 7, 50, 10 ** 6]:
        want = 1.0 - (1.0 + step / gamma) ** -power
        assert warmup_decay(target, step, power, gamma) == pytest.approx(min(target, want),
                                                                          rel=1e-12)
        got = ema.current_decays(step)
        assert got[0] == pytest.approx(min(target, want), rel=1e-12)
        assert got[1] == pytest.approx(min(0.5, want), rel=1e-12)
    assert ema.current_decays(10 ** 6)[0] == target  # capped
    assert ema.current_decays(0) == [0.0, 0.0]

    gen = torch.Generator().manual_seed(11)
    train_step(model, gen)
    assert ema.update(model)
    for m in ema.shadows:  # decay 0: the first update is a copy
        assert_state_equal(m.state_dict(), model.state_dict())
    ref = float_snapshot(model)
    for step in range(1, 5):
        train_step(model, gen)
        ema.update(model)
        d = min(target, 1.0 - (1.0 + step / gamma) ** -power)
        ref = ema_reference(ref, model, d)
    assert_shadow_close(ema.module.state_dict(), ref)


def test_warmup_with_every():
    model = bn_net()
    ema = ModelEma(model, decay=0.999, warmup=True, every=3)
    # The decay of an interval is that of its first step, raised to the interval length.
    assert ema.current_decays(0) == [0.0]
    assert ema.current_decays(3)[0] == pytest.approx(warmup_decay(0.999, 3) ** 3, rel=1e-12)


# --------------------------------------------------------------------------------------- half-life
@pytest.mark.parametrize("half_life", [1.0, 7.5, 693.0, 1e5])
def test_half_life_round_trip(half_life):
    d = decay_from_half_life(half_life)
    assert 0.0 < d < 1.0
    assert d ** half_life == pytest.approx(0.5, rel=1e-9)
    assert half_life_from_decay(d) == pytest.approx(half_life, rel=1e-9)


def test_half_life_known_values_and_errors():
    assert decay_from_half_life(1.0) == 0.5
    assert half_life_from_decay(0.5) == pytest.approx(1.0, rel=1e-15)
    assert half_life_from_decay(0.9999) == pytest.approx(math.log(0.5) / math.log(0.9999))
    for bad in [0.0, -3.0]:
        with pytest.raises(ValueError):
            decay_from_half_life(bad)
    for bad in [0.0, 1.0, 1.5]:
        with pytest.raises(ValueError):
            half_life_from_decay(bad)


@pytest.mark.parametrize("text,value,unit", [
    ("2ep", 2.0, "ep"), ("0.5ep", 0.5, "ep"), ("500it", 500.0, "it"),
    ("300kimg", 300e3, "img"), ("1.2Mimg", 1.2e6, "img"), ("64img", 64.0, "img"),
    (" 3 ep ", 3.0, "ep"),
])
def test_parse_half_life(text, value, unit):
    hl = parse_half_life(text)
    assert isinstance(hl, HalfLife)
    assert hl.unit == unit
    assert hl.value == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("text", ["", "2", "ep", "2epochs", "2 steps", "-1ep", "0it", "5kep",
                                  "1.2Mit", "kimg", "1.2.3img", "nanep"])
def test_parse_half_life_rejects(text):
    with pytest.raises(ValueError):
        parse_half_life(text)


def test_half_life_in_updates_keeps_image_horizon():
    dataset = 12_800
    for text, horizon_images in [("2ep", 2 * dataset), ("300kimg", 300e3), ("1.2Mimg", 1.2e6)]:
        hl = parse_half_life(text)
        horizons = []
        for images_per_update in (64, 256):
            updates = hl.in_updates(images_per_update, dataset / images_per_update)
            horizons.append(updates * images_per_update)
            # The decay built from it halves an old weight after that many images.
            d = decay_from_half_life(updates)
            assert d ** (horizon_images / images_per_update) == pytest.approx(0.5, rel=1e-9)
        assert horizons[0] == pytest.approx(horizon_images, rel=1e-12)
        assert horizons[1] == pytest.approx(horizon_images, rel=1e-12)
    # 'it' counts updates: the same number of updates at any batch size.
    hl = parse_half_life("500it")
    assert hl.in_updates(64, dataset / 64) == 500.0
    assert hl.in_updates(256, dataset / 256) == 500.0
    # img at 256 images per update is a quarter of the updates at 64.
    hl = parse_half_life("300kimg")
    assert hl.in_updates(64, 1.0) == pytest.approx(4 * hl.in_updates(256, 1.0), rel=1e-12)


# --------------------------------------------------------------------------------------- dtypes
def _constant_linear(dtype: torch.dtype, value: float) -> nn.Module:
    model = nn.Linear(8, 4).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def test_bfloat16_model_gets_float32_shadow_that_moves():
    model = _constant_linear(torch.bfloat16, 1.0)
    ema = ModelEma(model, decay=0.999)
    ema16 = ModelEma(model, decay=0.999, dtype=torch.bfloat16)
    assert ema.dtype == torch.float32 and ema16.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    assert all(p.dtype == torch.bfloat16 for p in ema16.module.parameters())
    assert model.weight.dtype == torch.bfloat16  # the model itself is left alone

    bump = 1.0 + 2.0 ** -7  # the next bfloat16 value above 1.0
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(bump)
    assert model.weight[0, 0].item() == bump
    n = 10
    for _ in range(n):
        assert ema.update(model) and ema16.update(model)
    want = 1.0 + (1.0 - 0.999 ** n) * 2.0 ** -7  # ~1 + 7.8e-5: far below a bfloat16 ulp
    torch.testing.assert_close(ema.module.weight.double(),
                               torch.full((4, 8), want, dtype=torch.float64), atol=1e-6, rtol=0)
    # A bfloat16 shadow rounds every one of these updates away.
    assert torch.equal(ema16.module.weight, torch.ones(4, 8, dtype=torch.bfloat16))


def test_dtype_override_float64():
    model = bn_net()
    gen = torch.Generator().manual_seed(12)
    ema = ModelEma(model, decay=0.9, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in ema.module.state_dict().values()
               if t.is_floating_point())
    ref = float_snapshot(model)
    for _ in range(3):
        train_step(model, gen)
        ema.update(model)
        ref = ema_reference(ref, model, 0.9)
    # A float64 shadow of a float32 model: only the float64 arithmetic error is left.
    assert_shadow_close(ema.module.state_dict(), ref, atol=1e-12, rtol=1e-12)


def test_float16_shadow_large_sums_are_not_called_nonfinite():
    """A finite fp16 tensor whose sum exceeds the fp16 range must not be skipped."""
    model = _constant_linear(torch.float16, 1.0)
    ema = ModelEma(model, decay=0.5, dtype=torch.float16)
    with torch.no_grad():
        model.weight.fill_(60000.0)  # sum 1.9e6, beyond float16's 65504
    assert ema.update(model) is True
    assert ema.skipped_nonfinite == 0
    assert ema.module.weight[0, 0].item() == pytest.approx(30000.5, rel=1e-3)


# --------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("where,bad", [
    ("0.weight", float("nan")),        # large tensor (sliced path)
    ("0.bias", float("inf")),          # small tensor
    ("1.running_var", float("inf")),   # buffer
    ("3.bias", float("-inf")),
])
@pytest.mark.parametrize("decays", [0.9, [0.9, 0.99]], ids=["one", "two"])
def test_nonfinite_update_is_skipped_with_the_precheck(where, bad, decays):
    model = big_net()
    gen = torch.Generator().manual_seed(13)
    ema = ModelEma(model, decay=decays, skip_nonfinite=True)
    train_step(model, gen)
    ema.update(model)
    before = [clone_state(m.state_dict()) for m in ema.shadows]
    train_step(model, gen)
    with torch.no_grad():
        model.state_dict()[where].view(-1)[-1] = bad
    assert ema.update(model) is False
    assert ema.skipped_nonfinite == 1
    assert (ema.steps, ema.num_updates) == (2, 1)
    for m, b in zip(ema.shadows, before):
        assert_state_equal(m.state_dict(), b)
    # Once the model is finite again, averaging resumes.
    with torch.no_grad():
        model.state_dict()[where].view(-1)[-1] = 0.0
    assert ema.update(model) is True
    assert (ema.num_updates, ema.skipped_nonfinite) == (2, 1)


def test_nonfinite_in_bfloat16_model_is_skipped():
    model = _constant_linear(torch.bfloat16, 1.0)
    ema = ModelEma(model, decay=0.9, skip_nonfinite=True)
    with torch.no_grad():
        model.bias[2] = float("nan")
    before = clone_state(ema.module.state_dict())
    assert ema.update(model) is False
    assert_state_equal(ema.module.state_dict(), before)


def test_by_default_a_nonfinite_update_is_averaged_and_then_reported():
    model = bn_net()
    ema = ModelEma(model, decay=[0.9, 0.99])
    assert ema.skip_nonfinite is False and ema.nonfinite_shadows() == []
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    assert ema.update(model) is True
    assert ema.skipped_nonfinite == 0
    assert torch.isnan(ema.module[0].weight[0, 0, 0, 0])
    assert ema.nonfinite_shadows() == [0, 1]


# --------------------------------------------------------------------------------------- swap
def test_swapped_into_loads_shadow_and_restores_everything():
    model = bn_net()
    gen = torch.Generator().manual_seed(14)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = ModelEma(model, decay=[0.5, 0.9])
    for _ in range(3):
        model.train()
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8, generator=gen)).square().mean().backward()
        opt.step()
        ema.update(model)
    raw = clone_state(model.state_dict())
    params = list(model.parameters())
    opt_state = {id(p): clone_state(opt.state[p]) for p in params}
    assert all("momentum_buffer" in s for s in opt_state.values())

    for index in (1, 0):
        with ema.swapped_into(model, index) as swapped:
            assert swapped is model
            assert_state_equal(model.state_dict(), ema.shadow_state_dict(index))
            assert not torch.equal(model[0].weight, raw["0.weight"])
            model.eval()
            with torch.no_grad():
                x = torch.randn(2, 3, 8, 8, generator=gen)
                torch.testing.assert_close(model(x), ema.shadows[index](x), atol=0, rtol=0)
        assert_state_equal(model.state_dict(), raw)
    assert list(model.parameters()) == params  # same objects the optimizer holds
    for p in params:
        assert_state_equal(opt.state[p], opt_state[id(p)])

    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped_into(model, 1):
            raise RuntimeError("boom")
    assert_state_equal(model.state_dict(), raw)


# --------------------------------------------------------------------------------------- state
def test_state_dict_round_trip():
    model = big_net()
    gen = torch.Generator().manual_seed(15)
    kwargs = dict(decay=[0.6, 0.95], every=2, warmup=True, warmup_gamma=3.0, skip_nonfinite=True)
    ema = ModelEma(model, **kwargs)
    for _ in range(5):
        train_step(model, gen)
        ema.update(model)
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    ema.update(model)
    with torch.no_grad():
        model[0].bias[0] = 0.0
    assert (ema.steps, ema.num_updates, ema.skipped_nonfinite) == (6, 2, 1)

    buf = io.BytesIO()
    torch.save(ema.full_state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh = ModelEma(big_net(seed=99), **kwargs)
    fresh.load_full_state_dict(state)
    assert (fresh.steps, fresh.num_updates, fresh.skipped_nonfinite) == (6, 2, 1)
    assert fresh.decays == [0.6, 0.95] and fresh.every == 2 and fresh.schedule.name == "timm"
    for a, b in zip(fresh.shadows, ema.shadows):
        assert_state_equal(a.state_dict(), b.state_dict())
    # Both continue identically.
    for _ in range(2):
        train_step(model, gen)
        assert ema.update(model) == fresh.update(model)
    for a, b in zip(fresh.shadows, ema.shadows):
        assert_state_equal(a.state_dict(), b.state_dict())

    with pytest.raises(ValueError):
        ModelEma(big_net(), decay=0.9).load_full_state_dict(state)


# --------------------------------------------------------------------------------------- wrappers
def test_unwrap_model_compile_and_data_parallel():
    model = bn_net()
    compiled = torch.compile(model)
    assert compiled is not model
    assert unwrap_model(compiled) is model
    dp = nn.DataParallel(model)
    assert unwrap_model(dp) is model
    assert unwrap_model(nn.DataParallel(torch.compile(model))) is model
    assert unwrap_model(model) is model

    # The EMA of a wrapped model averages the inner model's weights under the inner names.
    ema = ModelEma(dp, decay=0.5)
    assert list(ema.module.state_dict()) == list(model.state_dict())
    gen = torch.Generator().manual_seed(16)
    ref = float_snapshot(model)
    train_step(model, gen)
    ema.update(compiled)
    ref = ema_reference(ref, model, 0.5)
    assert_shadow_close(ema.module.state_dict(), ref)


# --------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1, [0.9, 1.0], []])
def test_rejects_bad_decay(decay):
    with pytest.raises(ValueError):
        ModelEma(bn_net(), decay=decay)


@pytest.mark.parametrize("every", [0, -2])
def test_rejects_bad_every(every):
    with pytest.raises(ValueError):
        ModelEma(bn_net(), decay=0.9, every=every)


def test_rejects_other_model():
    ema = ModelEma(bn_net(), decay=0.9)
    with pytest.raises(ValueError):
        ema.update(big_net())


# --------------------------------------------------------------------------------------- new storage
@pytest.mark.parametrize("decays", [0.7, [0.7, 0.9]], ids=["one", "two"])
def test_model_in_new_storage_is_picked_up(decays):
    model = big_net()
    gen = torch.Generator().manual_seed(17)
    ema = ModelEma(model, decay=decays)
    decays = decays if isinstance(decays, list) else [decays]
    refs = [float_snapshot(model) for _ in decays]

    def step_and_check():
        train_step(model, gen)
        assert ema.update(model)
        refs[:] = [ema_reference(r, model, d) for r, d in zip(refs, decays)]
        for i, r in enumerate(refs):
            assert_shadow_close(ema.shadows[i].state_dict(), r)

    step_and_check()  # builds the cached tensor lists
    # 1. Round trip through float64: every tensor gets new memory; update while in float64 too.
    model.to(torch.float64)
    step_and_check()
    model.to(torch.float32)
    step_and_check()
    # 2. New tensors behind the same Parameter objects.
    for t in list(model.parameters()) + list(model.buffers()):
        t.data = t.data.clone()
    step_and_check()
    # 3. Brand-new Parameter objects (load_state_dict with assign=True).
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    step_and_check()
    # 4. One small and one large tensor alone given new storage.
    model[3].bias.data = model[3].bias.data.clone()
    model[0].weight.data = model[0].weight.data.clone()
    step_and_check()
    # 5. A submodule replaced by an equal one (its tensors are new objects).
    replacement = nn.BatchNorm1d(600)
    replacement.load_state_dict(model[1].state_dict())
    model[1] = replacement
    step_and_check()
    # 6. Buffer objects replaced the way Module.to() does it, without a registration.
    model[1]._buffers["running_mean"] = model[1].running_mean.clone()
    model.to(torch.float64).to(torch.float32)
    step_and_check()


def test_the_update_plan_is_kept_while_no_tensor_object_changes():
    """An update re-plans only when the model's tensors may have changed: setting a buffer
    attribute to the object it holds (``self.n += 1``, as torch's AveragedModel does every
    update, here on another module) does not count, a new object does."""
    model = big_net()
    other = nn.Module()
    other.register_buffer("n", torch.zeros(()))
    ema = ModelEma(model, decay=0.9)
    ema.update(model)
    plan = ema._shadows._plan
    other.n += 1
    ema.update(model)
    assert ema._shadows._plan is plan
    model[1].running_mean = model[1].running_mean.clone()
    ema.update(model)
    assert ema._shadows._plan is not plan
