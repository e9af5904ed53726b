"""benchmarks/common.py: a benchmark run for some seeds starts runs of those seeds only, and its
page keeps every seed recorded before."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(_BENCH))

import common  # noqa: E402


def test_the_page_keeps_recorded_seeds_and_runs_start_for_the_chosen_ones(tmp_path: Path,
                                                                         monkeypatch) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    for seed in (0, 2):
        (runs / f"cell-seed{seed}.json").write_text(json.dumps({"seed": seed}))
    (runs / "other-seed7-steps300.json").write_text("{}")
    parser = common.benchmark_parser("test")
    seeds, budget = common.seeds_and_budget(parser, parser.parse_args(["--seeds", "1"]), runs)
    assert seeds == [0, 1, 2, 7]
    assert budget is not None and budget.allows(1) and not budget.allows(0)
    started: list[list[str]] = []
    monkeypatch.setattr(common.subprocess, "run",
                        lambda argv, **kw: started.append(argv) or argparse.Namespace(
                            returncode=1, stderr="stopped here"))
    assert common.run_cell(runs, "cell", 0, [], budget) == {"seed": 0}  # read, not run
    assert common.run_cell(runs, "cell", 3, [], budget) is None         # not chosen: not run
    assert not started
    with pytest.raises(RuntimeError, match="stopped here"):
        common.run_cell(runs, "cell", 1, [], budget)                     # chosen: run
    assert len(started) == 1
    _, page_only = common.seeds_and_budget(
        parser, parser.parse_args(["--seeds", "1", "--page-only"]), runs)
    assert page_only is None


def test_reproduce_runs_every_benchmark_that_compares_accuracy_over_seeds() -> None:
    """``benchmarks/reproduce.py`` regenerates every accuracy table: every script that takes
    ``--seeds`` (the accuracy benchmarks; three written after it were missing from it)."""
    import reproduce

    with_seeds = {p.name for p in _BENCH.glob("*.py") if p.name != "common.py" and (
        "benchmark_parser(" in (text := p.read_text()) or '"--seeds"' in text)}
    assert {script for script, _ in reproduce.STEPS} == with_seeds
