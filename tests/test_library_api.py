"""The library: `from ematrain import ModelEma` (without importing torch for `import ematrain`),
and a timm ModelEmaV3 user's arguments giving V3's arithmetic."""
from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from timm.utils import ModelEmaV3

from conftest import REPO_ROOT
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
    assert r.stdout.split() == ["ematrain.ema", "1.0"]
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
