"""--opt-fused: on the CPU, torch's SGD, Adam, AdamW and Adagrad run as their fused kernel.

The contract: the kernel is chosen only where torch has one (those four classes, parameters on
the CPU) and the user asked for no implementation of their own; it makes the same update as
torch's default (to float32 rounding); and the
choice belongs to the running process, so a checkpoint from another run (timm's says
fused=None) neither switches it off nor carries it into a --no-opt-fused run.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_args

from ematrain.run.optimizer import build_optimizer
from ematrain.settings.train_specs import train_settings

TINY = tiny_args(lr=None, warmup=None)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=3)


def optimizer(small_data, model, *flags, lr=1e-3):
    spec = train_settings([str(small_data), *TINY, *flags]).optim
    return build_optimizer(spec, model, lr)


def implementations(opt) -> set:
    return {(g.get("fused"), g.get("foreach")) for g in opt.param_groups}


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw", "adagrad"])
def test_fused_kernel_is_chosen_for_torch_optimizers_on_the_cpu(small_data, model, name):
    assert implementations(optimizer(small_data, model, "--opt", name)) == {(True, None)}


@pytest.mark.parametrize("name", ["lamb", "lion", "rmsprop", "nadamw", "adopt"])
def test_optimizers_without_a_fused_kernel_keep_their_default(small_data, model, name):
    made = optimizer(small_data, model, "--opt", name)
    assert not any(fused for fused, _ in implementations(made))


@pytest.mark.parametrize("flags", [["--no-opt-fused"], ["--opt-kwargs", "foreach=True"],
                                   ["--opt-kwargs", "fused=False"]])
def test_the_users_choice_of_implementation_is_kept(small_data, model, flags):
    chosen = implementations(optimizer(small_data, model, "--opt", "adamw", *flags))
    assert not any(fused for fused, _ in chosen)
    if "foreach=True" in flags:
        assert chosen == {(None, True)}


def train(small_data, base, name, *flags, steps=4, dtype=torch.float32):
    """`steps` updates of a copy of `base` on fixed batches; the weights after them."""
    net = copy.deepcopy(base).to(dtype)
    opt = optimizer(small_data, net, "--opt", name, "--weight-decay", "1e-4", *flags, lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = torch.randn(4, 3, 32, 32, generator=gen).to(dtype)
        targets = torch.randint(0, 3, (4,), generator=gen)
        loss = F.cross_entropy(net(images).float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return torch.cat([p.detach().float().flatten() for p in net.parameters()]), opt


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw", "adagrad"])
def test_fused_kernels_make_the_same_update_to_float32_rounding(small_data, model, name):
    # One step: Adam's first update is lr * sign(g) for most weights, so a rounding difference
    # in a later step is amplified by the optimizer itself, not by the kernel.
    fused, opt = train(small_data, model, name, steps=1)
    default, ref = train(small_data, model, name, "--no-opt-fused", steps=1)
    assert implementations(opt) == {(True, None)} and implementations(ref) == {(None, None)}
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (fused - start).abs().max() > 1e-4  # the step moved the weights
    torch.testing.assert_close(fused, default, rtol=1e-6, atol=1e-7)


def test_fused_sgd_training_stays_with_the_default_kernels(small_data, model):
    fused, _ = train(small_data, model, "sgd", steps=20)
    default, _ = train(small_data, model, "sgd", "--no-opt-fused", steps=20)
    torch.testing.assert_close(fused, default, rtol=0, atol=1e-5)


def test_bfloat16_weights_get_the_fused_kernel_and_a_close_update(small_data, model):
    fused, opt = train(small_data, model, "sgd", dtype=torch.bfloat16)
    default, _ = train(small_data, model, "sgd", "--no-opt-fused", dtype=torch.bfloat16)
    assert implementations(opt) == {(True, None)}
    # The fused kernel computes in float32 and rounds once; the loop rounds every operation.
    torch.testing.assert_close(fused, default, rtol=2e-2, atol=2e-2)


def test_a_loaded_state_keeps_the_running_process_kernel(small_data, model):
    _, fused = train(small_data, model, "sgd", steps=1)
    _, loop = train(small_data, model, "sgd", "--no-opt-fused", steps=1)
    timm_state, ours_state = loop.state_dict(), fused.state_dict()
    assert {g["fused"] for g in timm_state["param_groups"]} == {None}
    fused.load_state_dict(timm_state)
    assert implementations(fused) == {(True, None)}
    loop.load_state_dict(ours_state)
    assert implementations(loop) == {(None, None)}
    # The momentum is what travels: both hold the saved buffers.
    for a, b in zip(fused.state.values(), loop.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
