"""Process-wide switches (`ematrain.runtime`): --fast-norm builds timm's fast norm layers and
leaves the process as it found it; --device-modules imports each module before the run, with one
line for a module that is not there; --torchcompile-mode is one of torch's modes and needs
--torchcompile; --synchronize-step waits for an accelerator after each step, not for the CPU."""
from __future__ import annotations

import sys

import pytest
import timm
import torch
from timm.layers import is_fast_norm

from ematrain.util.errors import UserError
from ematrain.util.runtime import (
    check_compile_mode,
    fast_norm,
    import_device_modules,
    step_synchronizer,
)


def _fast_layers(model) -> int:
    return sum(1 for m in model.modules() if getattr(m, "_fast_norm", False))


def test_fast_norm_builds_fast_layers_and_is_put_back():
    assert not is_fast_norm()
    with fast_norm(True):
        model = timm.create_model("test_vit")
        assert is_fast_norm()
    assert not is_fast_norm()
    assert _fast_layers(model) == 13  # every LayerNorm of test_vit
    with fast_norm(False):
        assert _fast_layers(timm.create_model("test_vit")) == 0
    with pytest.raises(RuntimeError), fast_norm(True):
        raise RuntimeError("a failed run")
    assert not is_fast_norm()


def test_device_modules_are_imported_before_the_run(tmp_path, monkeypatch):
    (tmp_path / "my_backend.py").write_text("import builtins\nbuiltins._my_backend_loaded = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_backend", raising=False)
    import builtins
    import_device_modules(["my_backend"])
    assert getattr(builtins, "_my_backend_loaded", 0) == 1
    del builtins._my_backend_loaded
    with pytest.raises(UserError, match="--device-modules torch_npu_nope: cannot import it"):
        import_device_modules(["torch_npu_nope"])
    (tmp_path / "broken_backend.py").write_text("raise RuntimeError('no device found')\n")
    with pytest.raises(UserError, match="its import failed: RuntimeError: no device found"):
        import_device_modules(["broken_backend"])


def test_compile_mode_is_torchs_and_needs_torchcompile():
    check_compile_mode(None, None)
    check_compile_mode("max-autotune", "inductor")
    with pytest.raises(UserError, match="give --torchcompile too"):
        check_compile_mode("max-autotune", None)
    with pytest.raises(UserError, match="reduce-overhead"):
        check_compile_mode("fastest", "inductor")


def test_synchronize_step_waits_for_an_accelerator_only(monkeypatch):
    assert step_synchronizer(torch.device("cpu"), True) is None
    assert step_synchronizer(torch.device("cuda", 0), False) is None
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    sync = step_synchronizer(torch.device("cuda", 0), True)
    sync()
    assert calls == [torch.device("cuda", 0)]
