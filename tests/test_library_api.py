"""The library: `from ematrain import ModelEma` (without importing torch for `import ematrain`),
and a timm ModelEmaV3 user's arguments giving V3's arithmetic."""
from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from conftest import REPO_ROOT
from timm.utils import ModelEmaV3

import ematrain
from ematrain import ModelEma

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")


def test_the_package_exports_the_ema_and_stays_light_until_used():
    code = ("import sys, ematrain; assert 'torch' not in sys.modules; "
            "from ematrain import ModelEma, half_life_from_decay; "
            "print(ModelEma.__module__, round(half_life_from_decay(0.5), 6))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO_ROOT / "src")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ematrain.ema.model_ema", "1.0"]
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        ematrain.Nothing


def _train_a_little(model, emas, steps: int = 12, pass_step: bool = True):
    """SGD steps in train mode (BatchNorm statistics move), each followed by every EMA's
    update, the step passed as timm's train.py passes it (updates so far, this one included)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, steps + 1):
        x = torch.randn(4, 3, 16, 16, generator=gen)
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for ema in emas:
            ema.update(model, step=step) if pass_step else ema.update(model)


@pytest.mark.parametrize("kwargs,pass_step", [
    ({"decay": 0.8}, False),
    ({"decay": 0.8, "exclude_buffers": True}, False),
    ({"decay": 0.95, "use_warmup": True, "warmup_power": 0.75}, True),
    ({"decay": 0.95, "use_warmup": True, "exclude_buffers": True, "foreach": False}, True),
], ids=["constant", "exclude_buffers", "warmup", "warmup_no_buffers"])
def test_model_ema_v3_arguments_give_v3s_averages(kwargs, pass_step):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    ours, theirs = ModelEma(model, **kwargs), ModelEmaV3(model, **kwargs)
    _train_a_little(model, [ours, theirs], pass_step=pass_step)
    mine, ref, live = (m.state_dict() for m in (ours.module, theirs.module, model))
    assert mine.keys() == ref.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
    buffers = [k for k, _ in model.named_buffers() if "running" in k]
    assert buffers
    for key in buffers:  # excluded buffers are the model's own; averaged ones are not
        assert torch.equal(mine[key], live[key]) == bool(kwargs.get("exclude_buffers"))


def test_v3_arguments_without_an_equivalent_are_refused():
    model = timm.create_model("test_resnet", num_classes=3)
    ModelEma(model, min_decay=0.0, update_after_step=0)  # the no-op values
    with pytest.raises(ValueError, match="no min_decay"):
        ModelEma(model, min_decay=0.5)
    with pytest.raises(ValueError, match="no update_after_step"):
        ModelEma(model, update_after_step=10)
    with pytest.raises(TypeError, match="unexpected keyword argument.*: stochastic"):
        ModelEma(model, stochastic=True)


def test_the_readmes_training_loop_runs(tmp_path, monkeypatch):
    text = (REPO_ROOT / "README.md").read_text()
    code = text.split("<!-- api-example -->\n```python\n", 1)[1].split("```", 1)[0]
    assert code.count("\n") <= 30
    monkeypatch.chdir(tmp_path)
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a: printed.append(a))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert [p[:2] for p in printed] == [(0, 0.99), (0, 0.999), (1, 0.99), (1, 0.999)]
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    model = timm.create_model("resnet18", num_classes=10)
    timm.models.load_checkpoint(model, str(tmp_path / "checkpoint.pth.tar"), use_ema=True)
    assert torch.equal(model.fc.weight, saved["state_dict_ema"]["fc.weight"])


# -------------------------------------------------------------- timm's ModelEmaV3 loop, unchanged
def _timm_v3_loop(make_ema, checkpoint):
    """timm's documented ModelEmaV3 use (train.py's): build it beside the model, update it with
    the optimizer step count after every step, validate it as a model (``eval()``, called on
    the images), move it with ``to()``, save ``state_dict_ema`` as timm's CheckpointSaver does
    (``get_state_dict(model_ema, unwrap_model)``). Returns what a user would look at."""
    from timm.utils import get_state_dict, unwrap_model

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    model_ema = make_ema(model, decay=0.9, use_warmup=True, warmup_power=0.75)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 16, 16, generator=gen)
    targets = torch.randint(0, 3, (8,), generator=gen)
    seen = {"decays": [], "outputs": []}
    num_updates = 0
    for epoch in range(2):
        model.train()
        for _ in range(4):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            model_ema.update(model, step=num_updates)
            seen["decays"].append(model_ema.get_decay(num_updates))
        model_ema.eval()
        with torch.no_grad():
            seen["outputs"].append(model_ema(images))
        model_ema = model_ema.to("cpu")
    torch.save({"state_dict": model.state_dict(),
                "state_dict_ema": get_state_dict(model_ema, unwrap_model)}, checkpoint)
    seen["state"] = model_ema.state_dict()
    seen["params"] = sum(p.numel() for p in model_ema.parameters())
    seen["module"] = model_ema.module
    seen["target"] = model_ema.get_decay()
    return seen


def test_timms_model_ema_v3_loop_runs_unchanged_on_ours(tmp_path):
    ours = _timm_v3_loop(ModelEma, tmp_path / "ours.pth.tar")
    theirs = _timm_v3_loop(ModelEmaV3, tmp_path / "theirs.pth.tar")
    assert ours["target"] == theirs["target"] == 0.9
    assert ours["decays"] == pytest.approx(theirs["decays"], rel=1e-12)
    for a, b in zip(ours["outputs"], theirs["outputs"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ours["params"] == theirs["params"] > 0
    assert ours["state"].keys() == theirs["state"].keys()
    assert all(k.startswith("module.") for k in ours["state"])
    for key, value in ours["state"].items():
        torch.testing.assert_close(value, theirs["state"][key], rtol=1e-5, atol=1e-6, msg=key)
    # Each one's state_dict() loads into the other; timm's load_checkpoint reads our EMA.
    model = timm.create_model("test_resnet", num_classes=3)
    ModelEmaV3(model).load_state_dict(ours["state"])
    fresh = ModelEma(model, decay=0.9)
    fresh.load_state_dict(theirs["state"])
    assert torch.equal(fresh.module.fc.weight, theirs["state"]["module.fc.weight"])
    timm.models.load_checkpoint(model, str(tmp_path / "ours.pth.tar"), use_ema=True)
    assert torch.equal(model.fc.weight, ours["module"].fc.weight)
    # ours is an nn.Module whose call runs the first shadow, in the mode eval() set
    assert isinstance(ours["module"], torch.nn.Module) and not ours["module"].training


def test_moving_the_ema_moves_every_shadow_and_it_keeps_averaging():
    model = timm.create_model("test_resnet", num_classes=3)
    ema = ModelEma(model, decay=[0.5, 0.9])
    assert [type(m) for m in ema.shadows] == [type(model)] * 2 and ema.module is ema.shadows[0]
    ema = ema.to(torch.float64)
    assert ema.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in ema.parameters())
    assert len(list(ema.parameters())) == 2 * len(list(model.parameters()))
    before = [m.fc.weight.detach().clone() for m in ema.shadows]
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    ema.update(model)
    for shadow, old, decay in zip(ema.shadows, before, ema.decays):
        expect = decay * old + (1 - decay) * model.fc.weight.double()
        torch.testing.assert_close(shadow.fc.weight, expect, rtol=1e-12, atol=1e-12)
    assert list(ema.state_dict())[0].startswith("module.")
    assert any(k.startswith("module_1.") for k in ema.state_dict())
    full = ema.full_state_dict()
    assert full["steps"] == 1 and len(full["shadows"]) == 2


# ------------------------------------------------------------ what the library refuses, in words
@pytest.mark.parametrize("schedule", ["constant", "timm", "debias", "power"])
@pytest.mark.parametrize("step", [0, -3])
def test_an_update_at_step_zero_or_below_is_refused_and_leaves_the_shadows(schedule, step):
    model = timm.create_model("test_resnet", num_classes=3)
    ema = (ModelEma.power(model, [0.1]) if schedule == "power"
           else ModelEma(model, decay=0.9, schedule=schedule))
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with pytest.raises(ValueError, match=r"the first update is step=1; got -?\d.*pass i \+ 1"):
        ema.update(model, step=step)
    with pytest.raises(ValueError, match="first update is step=1"):
        ema.get_decay(step)
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())
    ema.update(model, step=1)  # a 1-based count works, and keeps the shadows finite
    assert ema.nonfinite_shadows() == []


@pytest.mark.parametrize("make,error,words", [
    (lambda m: ModelEma(torch.nn.Identity()), ValueError, "floating-point weights.*Identity"),
    (lambda m: ModelEma(m, "0.9"), TypeError, "decay must be a number.*'0.9'"),
    (lambda m: ModelEma(m, ["0.9", 0.99]), TypeError, "decay must be a number"),
    (lambda m: ModelEma(m, 1.5), ValueError, r"decay must be in \(0, 1\)"),
    (lambda m: ModelEma(m).update(m, step=2.5), TypeError, "step must be a whole number"),
], ids=["no_weights", "decay_text", "decay_list_text", "decay_range", "step_fraction"])
def test_bad_arguments_are_one_message(make, error, words):
    with pytest.raises(error, match=words):
        make(timm.create_model("test_resnet", num_classes=3))


def test_a_full_state_that_does_not_fit_is_refused_whole():
    model = timm.create_model("test_resnet", num_classes=3)
    ema = ModelEma(model, decay=[0.9, 0.99])
    ema.update(model)
    state = ema.full_state_dict()
    fresh = ModelEma(timm.create_model("test_resnet", num_classes=3), decay=[0.9, 0.99])
    first = fresh.module.fc.weight.detach().clone()
    for missing in ("steps", "shadows"):
        broken = {k: v for k, v in state.items() if k != missing}
        with pytest.raises(ValueError, match=f"lacks '{missing}'"):
            fresh.load_full_state_dict(broken)
    broken = dict(state, shadows=[state["shadows"][0],
                                  {k: v for k, v in state["shadows"][1].items() if k != "fc.bias"}])
    with pytest.raises(ValueError, match="shadow 1 lacks 1 key.*'fc.bias'"):
        fresh.load_full_state_dict(broken)
    assert torch.equal(fresh.module.fc.weight, first) and fresh.steps == 0  # nothing loaded
    fresh.load_state_dict(state)  # a full state given to load_state_dict loads whole
    assert fresh.steps == 1 and torch.equal(fresh.module.fc.weight, ema.module.fc.weight)
