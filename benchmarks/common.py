"""What the federated benchmarks share: one resumable run of ``python -m fedctx.simulate`` per
(cell, seed), its record kept in a committed folder, the machine's description, and the tables
of mean ± 95% CI built from those records (:mod:`fedctx.report`).

A finished run leaves ``<runs_dir>/<cell>-seed<k>.json`` (config, final and per-round accuracy,
wall time, command); a later invocation skips it, so a benchmark interrupted or stopped by its
time budget resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedctx.report import Estimate, mean_ci
from fedctx.results import atomic_write_text, cpu_name

REPO = Path(__file__).resolve().parent.parent


def machine() -> str:
    """One line naming the hardware and software the figures were measured on."""
    return (f"{cpu_name()}, {os.cpu_count()} cores, no GPU used, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


class Budget:
    """Wall-clock budget for starting new runs (``minutes <= 0``: unlimited), for runs of
    ``seeds`` only (``None``: of any seed)."""

    def __init__(self, minutes: float, seeds: Sequence[int] | None = None) -> None:
        self.deadline = time.time() + minutes * 60 if minutes > 0 else float("inf")
        self.seeds = None if seeds is None else frozenset(seeds)

    def exhausted(self) -> bool:
        return time.time() >= self.deadline

    def allows(self, seed: int) -> bool:
        """Whether a run of ``seed`` may start now."""
        return not self.exhausted() and (self.seeds is None or seed in self.seeds)


def recorded_seeds(runs_dir: Path) -> set[int]:
    """The seeds of the run records under ``runs_dir`` (files ``...-seed<k>[-...].json``)."""
    found = (re.search(r"-seed(\d+)(?:-[^/]*)?\.json$", p.name) for p in runs_dir.rglob("*.json"))
    return {int(m.group(1)) for m in found if m}


def page_seeds(chosen: Sequence[int], runs_dir: Path) -> list[int]:
    """The seeds a page shows: the chosen ones and every seed with a record in ``runs_dir`` (a
    run of some seeds never drops the others from the page)."""
    return sorted(set(chosen) | recorded_seeds(runs_dir))


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark shares: ``--seeds``, ``--page-only`` and
    ``--budget-minutes``; a script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--page-only", action="store_true",
                        help="only rewrite the page from the finished runs")
    parser.add_argument("--budget-minutes", type=float, default=0,
                        help="start no new run after this many minutes (0: no limit)")
    return parser


def seeds_and_budget(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     runs_dir: Path) -> tuple[list[int], Budget | None]:
    """The page's seeds: those of ``--seeds`` (one line and exit 2 for a bad list) and every
    seed with a record in ``runs_dir``, so that running some seeds never drops the others from
    the page; and the run budget, which starts runs of ``--seeds`` only (``None`` with
    ``--page-only``: no run is started)."""
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: invalid value {args.seeds!r}; expected integers like 0,1,2")
    if not seeds:
        parser.error("--seeds: no seed given")
    budget = None if args.page_only else Budget(args.budget_minutes, seeds)
    return page_seeds(seeds, runs_dir), budget


def run_cell(runs_dir: Path, cell: str, seed: int, flags: Sequence[str], budget: Budget | None,
             *, data_dir: str = "", log: bool = True) -> dict[str, Any] | None:
    """The record of ``python -m fedctx.simulate FLAGS --seed SEED``: read from
    ``runs_dir/<cell>-seed<seed>.json`` when it exists, else run now and keep it — unless
    ``budget`` is ``None`` (read only) or spent: then ``None``."""
    path = runs_dir / f"{cell}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    if budget is None or not budget.allows(seed):
        return None
    shown = [*flags, "--seed", str(seed)]
    with tempfile.TemporaryDirectory(prefix="fedctx-bench-") as tmp:
        out = Path(tmp) / "run"
        argv = [*shown, "--backend", "inprocess", "--out", str(out)]
        if data_dir:
            argv += ["--data-dir", data_dir]
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "fedctx.simulate", *argv], cwd=REPO,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cell} seed {seed} failed:\n{proc.stderr[-2000:]}")
        summary = json.loads((out / "summary.json").read_text())
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    record = {
        "cell": cell, "seed": seed,
        "command": "python -m fedctx.simulate " + shlex.join(shown)
                   + (" --data-dir DATA" if data_dir else ""),
        "accuracy": summary["accuracy"], "accuracy_per_context": summary["accuracy_per_context"],
        "accuracy_per_client": summary.get("accuracy_per_client"),
        "real_domains": summary["real_domains"], "missing_domains": summary["missing_domains"],
        "curve": [{k: r[k] for k in ("round", "train_loss", "accuracy", "accuracy_per_context")
                   if k in r} for r in history],
        "wall_seconds": time.time() - t0, "machine": machine(),
        # the run inherits this process's environment (OMP_NUM_THREADS), hence its threads
        "torch_threads": torch.get_num_threads(),
    }
    runs_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    if log:
        print(f"{cell} seed {seed}: accuracy {record['accuracy']:.4f} "
              f"({record['wall_seconds']:.0f} s)", flush=True)
    return record


def by_seed(records: list[dict[str, Any]], key: str | None = None) -> dict[int, float]:
    """``{seed: overall accuracy}`` (or the accuracy of context ``key``)."""
    return {r["seed"]: r["accuracy"] if key is None else r["accuracy_per_context"][key]
            for r in records}


def estimate(records: list[dict[str, Any]], key: str | None = None) -> Estimate:
    return mean_ci(list(by_seed(records, key).values()))


def plot_curves(groups: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Mean overall test accuracy per round of each group of runs (one line per group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, records in groups.items():
        if not records:
            continue
        rounds = [p["round"] for p in records[0]["curve"] if "accuracy" in p]
        curves = [[p["accuracy"] for p in r["curve"] if "accuracy" in p] for r in records]
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(rounds))]
        ax.plot(rounds, mean, label=f"{name} (n={len(records)})")
    ax.set_xlabel("round")
    ax.set_ylabel("overall test accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
