"""docs/api.md, run as written: every ```python block, in order, in one namespace, in an empty
folder; what each prints must match the ```text block under it (``...`` matches anything)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def snippets() -> list[tuple[str, str | None]]:
    """``(code, expected output or None)`` for every python block of the page."""
    blocks = re.findall(r"```(python|text)\n(.*?)```", PAGE.read_text(), re.S)
    pairs = []
    for i, (kind, body) in enumerate(blocks):
        if kind == "python":
            follows = blocks[i + 1] if i + 1 < len(blocks) else None
            pairs.append((body, follows[1] if follows and follows[0] == "text" else None))
    return pairs


def matches(expected: str, printed: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in expected.strip().split("..."))
    return re.fullmatch(pattern, printed.strip(), re.S) is not None


def test_every_snippet_has_its_output_shown() -> None:
    pairs = snippets()
    assert len(pairs) >= 6
    assert all(expected for _, expected in pairs)
    assert matches("a ... c", "a b b c") and not matches("a ... c", "a b d")


def test_every_snippet_runs_and_prints_what_the_page_shows(tmp_path: Path, monkeypatch
                                                           ) -> None:
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    namespace: dict = {}
    try:
        for n, (code, expected) in enumerate(snippets(), 1):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(code, f"docs/api.md block {n}", "exec"), namespace)  # noqa: S102
            if not matches(expected, printed.getvalue()):
                pytest.fail(f"block {n} printed:\n{printed.getvalue()}\nthe page shows:\n"
                            f"{expected}")
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "my-run" / "tensorboard").is_dir()
