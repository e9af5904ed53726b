"""docs/flower.md's plain Flower app, run as written: per-context normalization by wrapping the
strategy."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import torch

from fedctx.federated.local import InProcessGrid

PAGE = Path(__file__).resolve().parent.parent / "docs" / "flower.md"


def page_files() -> dict[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    return {b.splitlines()[0].removeprefix("# ").strip(): b for b in blocks}


def test_page_app_runs_and_keeps_one_norm_entry_per_context(tmp_path: Path, monkeypatch
                                                            ) -> None:
    files = page_files()
    assert set(files) == {"task.py", "client_app.py", "server_app.py"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in ("task", "client_app", "server_app"):
        sys.modules.pop(name, None)
    client_app = importlib.import_module("client_app").app
    server_app = importlib.import_module("server_app").app
    from flwr.app import Context, RecordDict

    grid = InProcessGrid(client_app, 4)
    server_app(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                             run_config={"num-server-rounds": 3}))
    final = torch.load(tmp_path / "final_model.pt")
    banks = torch.load(tmp_path / "norm_per_context.pt")
    key = "body.1.running_var"
    assert key in final
    # the two domains' statistics stay apart (domain 1's inputs are scaled by 5)
    assert float(banks[1][key].mean()) > 2 * float(banks[0][key].mean())
    for name in ("task", "client_app", "server_app"):
        sys.modules.pop(name, None)
