"""The README's data commands run as written: each reader of `--dataset` on a small tree written
in its format (`data_writers`), with a tiny model appended to each command."""
from __future__ import annotations

import shlex

import pytest
from conftest import REPO_ROOT, run_in_process, tiny_args
from data_writers import write_mnist

from ematrain.cli.train import main as train_main
from ematrain.cli.validate import main as validate_main

pytestmark = pytest.mark.usefixtures("one_thread_no_plots")
MARK = "<!-- data-commands -->"


def readme_commands() -> list[list[str]]:
    text = (REPO_ROOT / "README.md").read_text()
    block = text.split(MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_readme_names_every_reader():
    datasets = {c[c.index("--dataset") + 1].split("/")[0] if "--dataset" in c else ""
                for c in readme_commands()}
    assert datasets == {"", "torch", "hfds", "hfids", "wds"}


def test_every_readme_data_command_runs(same_data, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("folder", "tars", "hf_saved", "parquet", "shards"):
        (data / name).symlink_to(same_data[name])
    (data / "classes.txt").symlink_to(same_data["class_map"])
    write_mnist(data / "torch")
    monkeypatch.chdir(tmp_path)
    for command in readme_commands():
        assert command[0] == ".venv/bin/python" and command[1] in ("train.py", "validate.py")
        if command[1] == "train.py":
            r = run_in_process(train_main, "train.py", *command[2:], *tiny_args(epochs=1))
        else:
            r = run_in_process(validate_main, "validate.py", *command[2:], "-b", "4", "-j", "0")
        assert r.returncode == 0, (command, r.stderr[-2000:])
        if command[1] == "validate.py":
            assert "images 15" in r.stdout
