"""The 'Write your own strategy' tutorial of docs/strategies.md, performed step by step."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from fedctx import strategies

REPO = Path(__file__).resolve().parent.parent
TUTORIAL = REPO / "docs" / "strategies.md"


def tutorial_files() -> dict[str, str]:
    """The code blocks of the tutorial whose first line names a file (``# name``)."""
    files = {}
    for block in re.findall(r"```(?:python|toml)\n(.*?)```", TUTORIAL.read_text(), re.S):
        first = block.splitlines()[0]
        files[first.removeprefix("# ").strip()] = block
    return files


def test_tutorial_plugin_installs_and_runs(tmp_path: Path, python: str) -> None:
    files = tutorial_files()
    assert set(files) == {"ctxweighted.py", "pyproject.toml"}
    project = tmp_path / "my-fedctx-plugin"
    project.mkdir()
    for name, text in files.items():
        (project / name).write_text(text)
    site = tmp_path / "site"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(project)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    listing = subprocess.run([python, "-c", "import fedctx.strategies as s; print(s.available())"],
                             env=env, capture_output=True, text=True, check=True)
    assert "ctx-weighted" in listing.stdout
    out = tmp_path / "run"
    proc = subprocess.run(
        [python, "-m", "fedctx.simulate", "--strategy", "ctx-weighted", "--backend", "inprocess",
         "--clients", "4", "--rounds", "1", "--fraction", "1.0", "--width", "4",
         "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "ctx-weighted"
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["clients_ok"] == 4


def test_module_class_on_the_command_line(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "ctxweighted.py").write_text(tutorial_files()["ctxweighted.py"])
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = strategies.resolve_strategy("ctxweighted:ContextWeightedAvg")
    from fedctx.config import SimConfig

    assert type(factory(SimConfig())).__name__ == "ContextWeightedAvg"


def test_unknown_strategy_names_choices() -> None:
    with pytest.raises(ValueError, match="valid choices: .*fedavg"):
        strategies.resolve_strategy("fedmagic")
    with pytest.raises(ValueError, match="cannot load strategy"):
        strategies.resolve_strategy("no_such_module:Thing")
