"""The package's layout: folders that are layers, imports that only go down them, no cycle, no
module over 400 lines (flag tables aside), a library import that changes no torch global, the
module paths of earlier versions still importing, and a README that names every module."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

SRC = REPO_ROOT / "src"
PACKAGE = SRC / "ematrain"
# The layers, bottom first: a module imports from its own folder or from a folder of a lower
# layer, never from a higher one or a sibling of its own layer (ema and data do not know each
# other). The package root (`ematrain/__init__.py`: the version and the library's names,
# imported on use) may be imported from anywhere, and imports only `ROOT_IMPORTS`; `__main__` is
# the top. (Imports by name at run time are outside the graph: the commands' `cli.entry`, the
# packages' lazy name tables, `_moved`'s old paths.)
LAYERS = (
    ("util",),
    ("ema", "data"),
    ("checkpoint", "trackers"),
    ("posthoc",),
    ("settings",),
    ("run",),
    ("export",),
    ("cli",),
)
# Modules over 400 lines, each with the reason it may be.
LONG_MODULES = {
    "ematrain/settings/flags.py": "flag tables: one declaration per flag of timm's train.py and "
                                  "validate.py, in timm's groups",
}
MAX_LINES = 400
ROOT_IMPORTS = {"ematrain._moved", "ematrain.ema"}  # the old paths' finder, the library


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ematrain modules `name` imports, at module level or inside functions (a name taken
    from a package is an import of its submodule when there is one)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = base[:len(base) - node.level + 1]
                module = ".".join(prefix + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                       for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] == "ematrain" and t != name}
    return found


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer, folder) of a module; None for the package root and `__main__`."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in ("__main__", "_moved"):
        return None
    for index, folders in enumerate(LAYERS):
        if parts[1] in folders:
            return index, parts[1]
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS (and the README)")


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) & known for name, path in found.items()}


def test_every_module_is_in_a_layer_and_imports_only_go_down():
    wrong = []
    for module, targets in import_graph().items():
        here = layer_of(module)
        for target in targets:
            there = layer_of(target)
            if target == "ematrain":
                continue  # the package root: the version, the library's lazy names
            if module == "ematrain" and target in ROOT_IMPORTS:
                continue
            if module in ("ematrain", "ematrain._moved") or there is None:
                wrong.append(f"{module} -> {target} (the root imports {ROOT_IMPORTS} only)")
            elif here is not None and here[1] != there[1] and here[0] <= there[0]:
                wrong.append(f"{module} (layer {here[0]}) -> {target} (layer {there[0]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                walk(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert len(state) == len(graph) > 40


def test_no_module_of_the_package_is_ignored_by_git():
    """A module git ignores would be missing from every commit (a root-level pattern such as
    ``data/`` once matched ``src/ematrain/data/``)."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [str(p.relative_to(REPO_ROOT)) for p in modules().values()]
    r = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO_ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and not r.stdout, r.stdout  # 1: none is ignored


def test_no_module_is_over_400_lines_but_the_flag_tables():
    lengths = {str(path.relative_to(SRC)): len(path.read_text().splitlines())
               for path in modules().values()}
    too_long = {p: n for p, n in lengths.items() if n > MAX_LINES and p not in LONG_MODULES}
    assert not too_long, too_long
    for path, reason in LONG_MODULES.items():  # each exception is still one, and says why
        assert lengths[path] > MAX_LINES and reason, path


# What importing may not change: torch's process-wide hooks and switches.
_TORCH_GLOBALS = """
import torch
def torch_globals():
    hooks = {k: sorted(v) for k, v in vars(torch.nn.modules.module).items()
             if k.startswith("_global_") and isinstance(v, dict)}
    return {"hooks": hooks, "dtype": torch.get_default_dtype(), "grad": torch.is_grad_enabled(),
            "threads": torch.get_num_threads(), "deterministic":
            torch.are_deterministic_algorithms_enabled(), "matmul":
            torch.get_float32_matmul_precision(), "cudnn": (torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic), "rng": torch.get_rng_state().sum().item(),
            "safe": len(torch.serialization.get_safe_globals())}
"""


def _python(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(SRC)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_importing_ematrain_changes_no_torch_global_until_a_model_ema_is_built():
    """`import ematrain` and the whole library part (`ematrain.ema`, every module of it) leave
    torch's global hooks and switches as they were; the first `ModelEma` installs its three
    registration hooks, and no other one does."""
    out = _python(_TORCH_GLOBALS + """
import importlib, pkgutil
before = torch_globals()
import ematrain, ematrain.ema
from ematrain import ModelEma, WeightSwapper, decay_from_half_life, half_life_from_decay
for m in pkgutil.walk_packages(ematrain.ema.__path__, "ematrain.ema."):
    importlib.import_module(m.name)
assert torch_globals() == before, (before, torch_globals())
model = torch.nn.Linear(3, 2)
ModelEma(model, 0.9)
after = torch_globals()
grown = {k: len(v) - len(before["hooks"][k]) for k, v in after["hooks"].items()}
assert {k: n for k, n in grown.items() if n} == {
    "_global_parameter_registration_hooks": 1, "_global_buffer_registration_hooks": 1,
    "_global_module_registration_hooks": 1}, grown
ModelEma(model, [0.5, 0.9])
assert torch_globals()["hooks"] == after["hooks"]
print("ok")
""")
    assert out.split() == ["ok"]


def test_importing_every_module_installs_no_torch_hook():
    """None of ematrain's modules registers a torch hook when it is imported (what timm and
    torchvision do on import is theirs)."""
    out = _python(_TORCH_GLOBALS + """
import importlib, pkgutil
import timm, torchvision  # their own import-time state, before ours is measured
before = torch_globals()["hooks"]
import ematrain
names = [m.name for m in pkgutil.walk_packages(ematrain.__path__, "ematrain.")
         if m.name != "ematrain.__main__"]
for name in names:
    importlib.import_module(name)
assert torch_globals()["hooks"] == before
print(len(names))
""")
    assert int(out) > 40


def test_old_module_paths_import_as_the_new_modules_and_warn_naming_them():
    """Every module path of the flat layout still imports (`ematrain._moved`): a module that
    moved whole is the new module itself, a split one holds every name of its parts; each
    warns once, naming where to import from. The old paths that are packages now offer the old
    names on use."""
    out = _python("""
import importlib, warnings
from ematrain._moved import MOVED
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"ematrain.{old}")
    targets = [importlib.import_module(f"ematrain.{n}") for n in new]
    assert [w.category for w in caught] == [DeprecationWarning], (old, caught)
    assert all(f"ematrain.{n}" in str(caught[0].message) for n in new), caught[0].message
    if len(new) == 1:
        assert module is targets[0], old
    for target in targets:
        public = [k for k in vars(target) if not k.startswith("_")]
        assert all(hasattr(module, k) for k in public), (old, target.__name__)
warnings.simplefilter("ignore")
from ematrain.engine import train_step, EpochLoop, validate
from ematrain.run.step import train_step as new_step
assert train_step is new_step
import ematrain.keeper, ematrain.run.keeper
assert ematrain.keeper is ematrain.run.keeper
for package in ("ema", "checkpoint", "data", "posthoc", "settings", "cli"):
    module = importlib.import_module(f"ematrain.{package}")
    assert module.__all__ and all(getattr(module, n) is not None for n in module.__all__)
from ematrain.checkpoint import SCHEMA, load_file, select_weights
from ematrain.ema_schedules import sigma_rel_to_gamma, parse_half_life, effective_half_lives
print("ok")
""")
    assert out.split() == ["ok"]


def test_an_old_module_path_runs_as_a_command():
    """``python -m ematrain.demo_data`` (as earlier READMEs wrote it) runs the module that
    holds it now."""
    r = subprocess.run([sys.executable, "-m", "ematrain.demo_data", "--help"],
                       capture_output=True, text=True, env={"PYTHONPATH": str(SRC)}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: ") and "--label-noise" in r.stdout


README = (REPO_ROOT / "README.md").read_text()


def _layout_section() -> str:
    return README.split("\n## Layout\n", 1)[1]


def test_the_readme_layout_names_every_folder_and_module():
    """Each folder has its table in the README's Layout section, and each table names every
    module of its folder (and none that does not exist)."""
    section = _layout_section()
    for folder in sorted({p.parent for p in modules().values()}):
        rel = folder.relative_to(SRC).as_posix()
        if rel == "ematrain":
            continue
        heading = f"`src/{rel}/`"
        assert heading in section, f"no table for {heading}"
        table = section.split(heading, 1)[1].split("\n\n", 2)[1]
        named = set(re.findall(r"^\| `([\w.]+)`", table, re.M))
        present = {p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
        assert named == present, (rel, named ^ present)


def test_every_module_path_the_readme_mentions_exists():
    paths = set(re.findall(r"src/ematrain/[\w/]+\.py", README))
    assert paths, "the README names no module path"
    for path in paths:
        assert (REPO_ROOT / path).is_file(), path


def test_the_readme_diagram_lists_the_layers_in_order():
    """The text diagram shows the folders top layer first, as `LAYERS` orders them."""
    diagram = _layout_section().split("```text\n", 1)[1].split("```", 1)[0]
    rows = [re.findall(r"\b(" + "|".join(f for layer in LAYERS for f in layer) + r")/", line)
            for line in diagram.splitlines()]
    rows = [tuple(r) for r in rows if r]
    assert rows == [tuple(layer) for layer in reversed(LAYERS)], rows


def test_no_test_helper_is_declared_twice():
    """The tiny run's flags and the data fixtures live in conftest: no test file re-aliases a
    conftest fixture or spells out test_resnet's tiny flag list on its own."""
    for path in sorted((REPO_ROOT / "tests").glob("test_*.py")):
        text = path.read_text()
        assert not re.search(r"def \w+\((small_data|tiny_data)\):\n    return \1\n", text), path
        assert not re.search(r'^\w+ = \["--model", "test_resnet", "--img-size"', text, re.M), path


@pytest.mark.parametrize("name", sorted(LONG_MODULES))
def test_long_modules_are_flag_tables(name):
    """The one long module holds declarations only: flags added to argparse parsers."""
    text = (SRC / name).read_text()
    assert text.count("add_argument(") > 100
