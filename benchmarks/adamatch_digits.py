"""AdaMatch convergence benchmark on digits: pairs x norms x scopes x seeds, resumable.

    python benchmarks/adamatch_digits.py --data-dir DIR                   # the whole grid
    python benchmarks/adamatch_digits.py --pairs mnist-mnistm --norms batch,context --seeds 0,1,2
    python benchmarks/adamatch_digits.py --budget-minutes 60              # what fits, then the page
    python benchmarks/adamatch_digits.py --page-only                      # rewrite the page only
    python benchmarks/adamatch_digits.py --wrn-timing                     # WRN-28-2 s/step here

Every finished run writes one small JSON, ``docs/results/runs/adamatch/<pair>-<norm>-<scope>-
seed<k>.json`` (final/best EMA and raw accuracy, the eval curve, s/step, the command, hardware),
and a run whose JSON exists with the same budget (steps, batch, uratio) is skipped: re-running the
command resumes the grid. Runs start in priority order (pairs, then scope ``all`` before
``input``, then norms, then seeds, each in the order given) and only while the projected end stays
within ``--budget-minutes`` (0: no limit). ``docs/results/adamatch.md`` is then regenerated from
whatever runs exist: per pair and norm the mean and 95% t-interval over seeds, the paired
difference to ``batch``, the curves PNG, the missing cells and the projected time to fill them.

Scope ``input`` is the normalization papers' protocol (``--norm-scope input
--target-eval-context source``: one ``--norm`` layer on the input image, BatchNorm in the CNN,
target evaluated with the source context); its ``batch`` baseline is the scope-``all`` ``batch``
run (BatchNorm everywhere), so ``batch`` is not run twice.

:func:`run_benchmark` is the entry point for ``benchmarks/reproduce.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedctx import report

REPO = Path(__file__).resolve().parent.parent
RUNS_DIR = REPO / "docs" / "results" / "runs" / "adamatch"
PAGE = REPO / "docs" / "results" / "adamatch.md"
CURVES = REPO / "docs" / "results" / "adamatch_curves.png"  # + _<steps> per budget
WORK_DIR = REPO / "results" / "adamatch" / "bench"

PAIRS = {"mnist-mnistm": ("mnist", "mnistm"), "mnist-usps": ("mnist", "usps"),
         "usps-mnist": ("usps", "mnist")}
DISPLAY = {"mnist": "MNIST", "mnistm": "MNIST-M", "usps": "USPS"}
NORMS = ("batch", "context", "acn", "uan")
SCOPES = ("all", "input")
SEEDS = (0, 1, 2)
#: Training steps per pair: where the target curve is flat by the page's criterion (the
#: `batch` runs: USPS->MNIST flat at 3000 steps in 3 seeds; MNIST->MNIST-M still rising at 3000
#: in the calibration run, flat at 8000 in seed 0; MNIST->USPS assumed like USPS->MNIST until
#: its own curves say otherwise). ``--steps N`` gives every pair N instead.
PAIR_STEPS = {"mnist-mnistm": 8000, "mnist-usps": 3000, "usps-mnist": 3000}
BATCH, URATIO = 64, 3
#: Evaluations per run: every ``steps // 20`` steps, so the curve has 20 points and the point at
#: 80% of the budget, which the flatness criterion reads, is one of them. Runs started before
#: 2026-11-25 10:00 UTC evaluated every 100 steps (80 points on MNIST->MNIST-M, where evaluating
#: the full test sets took 12-16% of a run). Evaluating changes no step of training
#: (tests/test_adamatch_run.py): only the curve's resolution and the run's time differ.
EVALS_PER_RUN = 20


def eval_every(steps: int) -> int:
    """Steps between evaluations of a run of ``steps`` steps (:data:`EVALS_PER_RUN`)."""
    return max(1, steps // EVALS_PER_RUN)


#: Steps of the authors' schedule: 8 Mi source images (``train_mimg=8``) / batch 64.
PAPER_STEPS = (8 << 20) // 64


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    pair: str
    norm: str
    scope: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.pair}-{self.norm}-{self.scope}-seed{self.seed}"

    def args(self, steps: int, threads: int, data_dir: str, out: Path) -> list[str]:
        source, target = PAIRS[self.pair]
        args = ["--source", source, "--target", target, "--norm", self.norm, "--seed",
                str(self.seed), "--steps", str(steps), "--batch-size", str(BATCH), "--uratio",
                str(URATIO), "--eval-every", str(eval_every(steps)), "--threads", str(threads),
                "--progress-every", "120", "--out", str(out)]
        if self.scope == "input":
            args += ["--norm-scope", "input", "--target-eval-context", "source"]
        if data_dir:
            args += ["--data-dir", data_dir]
        return args


def grid(pairs: Sequence[str], norms: Sequence[str], scopes: Sequence[str],
         seeds: Sequence[int]) -> list[Cell]:
    """Every cell in priority order: pair, scope (``all`` first), norm, seed. Scope ``input``
    skips ``batch`` (its baseline is the scope-``all`` batch run)."""
    return [Cell(p, n, sc, s) for p in pairs for sc in scopes for n in norms for s in seeds
            if not (sc == "input" and n == "batch")]


# ---------------------------------------------------------------- statistics


def fmt_ci(est: report.Estimate, scale: float = 100.0, signed: bool = False) -> str:
    """``"98.80 ± 0.26"`` (scaled); ``"(n = 1)"`` in place of an interval one value lacks."""
    sign = "+" if signed else ""
    text = f"{scale * est.mean:{sign}.2f}"
    return text + (" (n = 1)" if est.n < 2 else f" ± {scale * est.half_width:.2f}")


def late_change(curve: Sequence[dict[str, Any]], key: str = "target_acc"
                ) -> tuple[float, int, int] | None:
    """:func:`fedctx.report.late_change` of an AdaMatch eval curve (over steps)."""
    return report.late_change(curve, key)


def convergence_line(runs: Sequence[dict[str, Any]]) -> str:
    """Whether every run of ``runs`` is flat (:func:`fedctx.report.flatness`), naming those
    that are not."""
    changes = [(f"{r['norm']}/{r['scope']} seed {r['seed']}", c[0]) for r in runs
               if (c := late_change(r["curve"])) is not None]
    return report.flatness(changes, f"the last {100 * report.LAST_FRACTION:.0f}% of the steps")


# ---------------------------------------------------------------- runs


def run_record(cell: Cell, summary: dict[str, Any], command: list[str], commit: str
               ) -> dict[str, Any]:
    """The small committed JSON of one finished run."""
    cfg = summary["config"]

    def r4(x: float) -> float:
        return round(float(x), 4)

    return {
        "pair": cell.pair, "source": cfg["source"], "target": cfg["target"], "norm": cell.norm,
        "scope": cell.scope, "target_eval_context": cfg["target_eval_context"],
        "seed": cell.seed, "steps": cfg["steps"], "batch_size": cfg["batch_size"],
        "uratio": cfg["uratio"],
        "final_target_acc": r4(summary["final_target_acc"]),
        "final_target_acc_raw": r4(summary["final_target_acc_raw"]),
        "best_target_acc": r4(summary["best_target_acc"]),
        "best_target_acc_raw": r4(summary["best_target_acc_raw"]),
        "final_source_acc": r4(summary["final_source_acc"]),
        "final_source_acc_raw": r4(summary["final_source_acc_raw"]),
        "curve": [{k: (e[k] if k == "step" else r4(e[k])) for k in
                   ("step", "target_acc", "target_acc_raw", "source_acc", "source_acc_raw")}
                  for e in summary["evals"]],
        "seconds_per_step": round(summary["seconds_per_step"], 4),
        "total_seconds": round(summary["total_seconds"], 1),
        "cpu_seconds": (round(summary["cpu_seconds"], 1) if "cpu_seconds" in summary
                        else None),
        "command": " ".join(["python", "-m", "fedctx.adapt", *command]),
        "hardware": summary["hardware"], "data": summary["data"], "commit": commit,
        "config": cfg,
    }


def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*-seed*-steps*.json"))]


def budget_of(pair: str, steps: int | None) -> int:
    """A pair's training steps: ``steps`` when given, else :data:`PAIR_STEPS`."""
    return steps if steps else PAIR_STEPS[pair]


def record_path(runs_dir: Path, cell: Cell, steps: int) -> Path:
    """``<pair>-<norm>-<scope>-seed<k>-steps<N>.json``: budgets never overwrite each other."""
    return runs_dir / f"{cell.name}-steps{steps}.json"


def _same_budget(record: dict[str, Any], steps: int) -> bool:
    return (record.get("steps"), record.get("batch_size"), record.get("uratio")) == (
        steps, BATCH, URATIO)


def done(cell: Cell, runs_dir: Path, steps: int) -> bool:
    path = record_path(runs_dir, cell, steps)
    return path.exists() and _same_budget(json.loads(path.read_text()), steps)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_cell(cell: Cell, *, steps: int, threads: int, data_dir: str, runs_dir: Path,
             work_dir: Path, log: bool = True) -> dict[str, Any]:
    """Train one cell in a subprocess (``python -m fedctx.adapt``); write and return its record."""
    from fedctx.results import clear_results  # imports torch: not for --page-only

    out = work_dir / cell.name
    args = cell.args(steps, threads, data_dir, out)
    out.mkdir(parents=True, exist_ok=True)
    clear_results(out)  # a run of this cell cut short (it has no record): started afresh
    commit = _commit()  # the code the run imports: HEAD may move while it trains
    with (out / "stdout.log").open("w") as logfile:
        proc = subprocess.run([sys.executable, "-m", "fedctx.adapt", *args], cwd=REPO,
                              stdout=logfile, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = (out / "stdout.log").read_text().strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"{cell.name} failed (exit {proc.returncode}): {tail[0]}")
    summary = json.loads((out / "summary.json").read_text())
    shown = [a if a != str(out) else f"results/adamatch/bench/{cell.name}" for a in args]
    shown = [a if a != data_dir else "DATA" for a in shown]
    record = run_record(cell, summary, shown, commit)
    runs_dir.mkdir(parents=True, exist_ok=True)
    record_path(runs_dir, cell, steps).write_text(json.dumps(record, indent=1) + "\n")
    if log:
        print(f"{cell.name}: target {100 * record['final_target_acc']:.2f}% (EMA) "
              f"{100 * record['final_target_acc_raw']:.2f}% (raw), "
              f"{record['seconds_per_step']:.3f} s/step", flush=True)
    return record


def projected_seconds(cell: Cell, runs: list[dict[str, Any]], steps: int,
                      clock: str = "total_seconds") -> float | None:
    """Projected time of ``cell``: ``steps`` x the median seconds per step (eval included) of
    finished runs of the same norm and scope, else of the same norm, else of all runs.
    ``clock``: the runs' wall time (``total_seconds``) or their own CPU time
    (``cpu_seconds``: what a free core would take; runs that did not record it are skipped)."""
    for keep in (lambda r: r["norm"] == cell.norm and r["scope"] == cell.scope,
                 lambda r: r["norm"] == cell.norm, lambda r: True):
        per_step = [r[clock] / r["steps"] for r in runs if keep(r) and r.get(clock)]
        if per_step:
            return steps * statistics.median(per_step)
    return None


def _projection(cell: Cell, runs: list[dict[str, Any]], steps: int
                ) -> tuple[float | None, float | None]:
    """:func:`projected_seconds` of ``cell`` at ``steps``, wall and CPU; ``None`` for a slow norm
    never timed here (another norm's time would mislead)."""
    if cell.norm in SLOW and not any(r["norm"] == cell.norm for r in runs):
        return None, None
    return (projected_seconds(cell, runs, steps, "total_seconds"),
            projected_seconds(cell, runs, steps, "cpu_seconds"))


#: How much longer a budget the page projects for a pair whose runs are not flat at its own.
LONGER_BUDGET = 1.5


def _longer_budget_note(pair: str, runs: list[dict[str, Any]], budget: int,
                        cells: list[Cell], all_runs: list[dict[str, Any]]) -> str | None:
    """For a pair with runs that are not flat at ``budget``: what its whole grid (``cells``)
    would cost at :data:`LONGER_BUDGET` times it (``None`` if every run is flat)."""
    moved = [r for r in runs if (c := late_change(r["curve"])) is not None
             and report.not_flat(c[0])]
    if not moved:
        return None
    steps = round(LONGER_BUDGET * budget)
    cpu = [_projection(c, all_runs, steps)[1] for c in cells]
    unknown = sorted({c.norm for c, x in zip(cells, cpu, strict=True) if x is None})
    return (f"{_title(pair)}: {len(moved)} of its {len(runs)} runs are not flat at "
            f"{budget:,} steps. Its whole grid ({len(cells)} runs) at {LONGER_BUDGET:g}× the "
            f"budget ({steps:,} steps; whether that is flat, only its runs can tell) projects to "
            f"**{sum(x for x in cpu if x is not None) / 3600:.1f} h** of one free core, "
            "projected as above" + (f" (not counted: {', '.join(unknown)})" if unknown else "")
            + ".")


def run_benchmark(*, data_dir: str = "", pairs: Sequence[str] = tuple(PAIRS),
                  norms: Sequence[str] = NORMS, scopes: Sequence[str] = SCOPES,
                  seeds: Sequence[int] = SEEDS, steps: int | None = None,
                  budget_minutes: float = 0.0, jobs: int = 2, threads: int = 1,
                  runs_dir: Path = RUNS_DIR, page: Path = PAGE, work_dir: Path = WORK_DIR,
                  log: bool = True) -> list[dict[str, Any]]:
    """Run the missing cells of the grid (``jobs`` at a time, ``threads`` torch threads each)
    while the projected end stays within ``budget_minutes`` (0: no limit), then regenerate the
    page of the whole grid. ``steps``: of every run (``None``: each pair's :data:`PAIR_STEPS`).
    Returns the records of the runs started here."""
    start = time.monotonic()
    budget = budget_minutes * 60.0
    todo = [c for c in grid(pairs, norms, scopes, seeds)
            if not done(c, runs_dir, budget_of(c.pair, steps))]
    if log:
        print(f"{len(todo)} run(s) missing of {len(grid(pairs, norms, scopes, seeds))}",
              flush=True)
    finished: list[dict[str, Any]] = []
    running: dict[Future, Cell] = {}

    def fits(cell: Cell) -> bool:
        if not budget:
            return True
        need = projected_seconds(cell, load_runs(runs_dir), budget_of(cell.pair, steps)) or 0.0
        return time.monotonic() - start + need <= budget

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while todo or running:
            while todo and len(running) < max(1, jobs):
                cell = todo[0]
                if not fits(cell):
                    if log:
                        print(f"budget: not starting {cell.name} (or later cells)", flush=True)
                    todo = []
                    break
                todo.pop(0)
                if log:
                    print(f"start {cell.name}", flush=True)
                running[pool.submit(run_cell, cell, steps=budget_of(cell.pair, steps),
                                    threads=threads,
                                    data_dir=data_dir, runs_dir=runs_dir, work_dir=work_dir,
                                    log=log)] = cell
            if not running:
                break
            completed, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in completed:
                cell = running.pop(fut)
                try:
                    finished.append(fut.result())
                except RuntimeError as err:
                    print(f"FAILED {err}", file=sys.stderr, flush=True)
    # the whole grid: a run of some cells never drops the others' results from the page
    write_page(runs_dir, page, steps=steps)
    return finished


# ---------------------------------------------------------------- WRN-28-2 timing


def wrn28_2(num_classes: int = 10):
    """WRN-28-2 as in the AdaMatch/FixMatch code (pre-activation blocks, BN + leaky ReLU 0.1,
    widths 32/64/128, 4 blocks per group), for timing only."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1)
            self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1)
            self.act = nn.LeakyReLU(0.1)
            self.skip = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride)

        def forward(self, x):
            o = self.act(self.bn1(x))
            y = self.conv2(self.act(self.bn2(self.conv1(o))))
            return y + (x if self.skip is None else self.skip(o))

    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1)]
    cin = 16
    for width, stride in ((32, 1), (64, 2), (128, 2)):
        for i in range(4):
            layers.append(Block(cin, width, stride if i == 0 else 1))
            cin = width
    layers += [nn.BatchNorm2d(cin), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def time_wrn(threads: int = 1, steps: int = 3) -> dict[str, Any]:
    """Seconds per AdaMatch training step (forward+backward of the joint 512-image batch and of
    the 128-image source-only pass, 32x32) of WRN-28-2 on this CPU, channels-last."""
    import torch

    torch.set_num_threads(threads)
    model = wrn28_2().to(memory_format=torch.channels_last)
    joint = torch.randn(2 * BATCH * (1 + URATIO), 3, 32, 32).contiguous(
        memory_format=torch.channels_last)

    def step() -> None:
        loss = model(joint).logsumexp(1).mean() + model(joint[:2 * BATCH]).logsumexp(1).mean()
        loss.backward()

    step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - t0) / steps
    cpu_per_step = (time.process_time() - c0) / steps
    return {"wrn28_2_seconds_per_step": per_step, "wrn28_2_cpu_seconds_per_step": cpu_per_step,
            "threads": threads, "params": sum(p.numel() for p in model.parameters()),
            "paper_steps": PAPER_STEPS,
            "paper_schedule_cpu_hours": cpu_per_step * PAPER_STEPS / 3600}


# ---------------------------------------------------------------- calibration


def record_calibration(run_dir: Path, runs_dir: Path, command: str) -> dict[str, Any]:
    """Store the eval curve of a long calibration run (finished or still running: the
    ``{"eval": ...}`` lines of its ``metrics.jsonl``) as ``runs_dir/calibration.json``."""
    cfg = json.loads((run_dir / "summary.json").read_text())["config"] if (
        run_dir / "summary.json").exists() else None
    evals = [json.loads(line)["eval"] for line in (run_dir / "metrics.jsonl").read_text()
             .splitlines() if line.startswith('{"eval"')]
    record = {"run": run_dir.name, "command": command, "finished": cfg is not None,
              "curve": [{k: (e[k] if k == "step" else round(e[k], 4)) for k in
                         ("step", "target_acc", "target_acc_raw", "source_acc")} for e in evals],
              "elapsed_s": round(evals[-1]["elapsed_s"], 1) if evals else 0.0}
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "calibration.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _calibration_lines(cal: dict[str, Any]) -> list[str]:
    total = cal["command"].split("--steps ")[1].split()[0]
    state = "finished" if cal["finished"] else (
        f"**not finished** when this page was written (step {cal['curve'][-1]['step']} of "
        f"{total})")
    lines = [f"One long run chooses the budget: `{cal['command']}` ({state}; "
             f"{cal['elapsed_s'] / 60:.0f} min of wall time on the shared machine).", "",
             "| step | target acc. EMA (%) | target acc. raw (%) | source acc. EMA (%) |",
             "|---|---|---|---|"]
    for e in cal["curve"]:
        lines.append(f"| {e['step']} | {100 * e['target_acc']:.2f} | "
                     f"{100 * e['target_acc_raw']:.2f} | {100 * e['source_acc']:.2f} |")
    return lines


CURVES_CAPTION = ("Target test accuracy of the EMA model at every evaluation, one line per seed "
                  "(dashed: scope `input`, evaluated with the source context).")


def _title(pair: str) -> str:
    source, target = PAIRS[pair]
    return f"{DISPLAY[source]} → {DISPLAY[target]}"


def _cpu_per_step(runs: Iterable[dict[str, Any]]) -> list[float]:
    """CPU seconds per step of each of ``runs`` that recorded it (evaluations included)."""
    return [r["cpu_seconds"] / r["steps"] for r in runs if r.get("cpu_seconds")]


def _cpu_line(runs: list[dict[str, Any]]) -> str:
    """The CPU cost per step of the finished runs (what a free core would take)."""
    per_step = _cpu_per_step(runs)
    if not per_step:
        return "No finished run recorded its CPU time yet."
    cpu = statistics.median(per_step)
    return (f"Wall time above is measured with other processes sharing the 2 cores; the runs' "
            f"own CPU time is {cpu:.3f} s per step (median of {len(per_step)}, evaluation "
            f"included), i.e. {cpu * 1000 / 60:.0f} min per 1,000 steps on a free core.")


def _calibration_reading(cal: dict[str, Any]) -> str:
    """What the calibration curve says about the budget, computed from it."""
    curve = cal["curve"]
    target, source = late_change(curve), late_change(curve, "source_acc")
    if target is None or source is None:
        return "The calibration curve is too short to judge its flatness."
    change, first, last = target
    end = curve[-1]["target_acc"]
    flat = not report.not_flat(change)
    verdict = ("**the target curve was flat**" if flat else
               f"**the target curve had not flattened at {last:,} steps**")
    return (f"Reading: {verdict} by the criterion of this page (a change under "
            f"{report.FLAT_POINTS:g} point over the last {100 * report.LAST_FRACTION:.0f}% of the "
            "steps): "
            f"{100 * change:+.2f} points from step {first:,} to {last:,} "
            f"({100 * (end - change):.2f} → {100 * end:.2f}%), while the source "
            f"accuracy moved {100 * source[0]:+.2f} points.")


# ---------------------------------------------------------------- the page


def _hardware_line(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    hw = runs[0]["hardware"]
    return (f"{hw.get('processor', '?')}, {hw.get('cpu_count', '?')} CPUs, no GPU, torch "
            f"{hw.get('torch', '?')}, {hw.get('torch_threads', '?')} torch thread(s) per run")


def plot_curves(runs: list[dict[str, Any]], pairs: Sequence[str], path: Path) -> None:
    """Target accuracy (EMA) against step, one colour per norm and scope, a thin line per seed,
    one panel per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [p for p in pairs if any(r["pair"] == p for r in runs)]
    if not present:
        return
    fig, axes = plt.subplots(1, len(present), figsize=(5.5 * len(present), 4), squeeze=False)
    colours: dict[str, Any] = {}
    for ax, pair in zip(axes[0], present, strict=True):
        for r in sorted((r for r in runs if r["pair"] == pair),
                        key=lambda r: (r["scope"], r["norm"], r["seed"])):
            key = r["norm"] + ("" if r["scope"] == "all" else " (input, src ctx)")
            colour = colours.setdefault(key, f"C{len(colours)}")
            steps = [e["step"] for e in r["curve"]]
            ax.plot(steps, [100 * e["target_acc"] for e in r["curve"]], color=colour, lw=1,
                    ls="-" if r["scope"] == "all" else "--",
                    label=key if r["seed"] == min(x["seed"] for x in runs if x["pair"] == pair
                                                  and x["norm"] == r["norm"]
                                                  and x["scope"] == r["scope"]) else None)
        ax.set(title=pair.replace("-", " → "), xlabel="step", ylabel="target test acc. (EMA, %)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cpu_text(runs: Iterable[dict[str, Any]]) -> str:
    """Mean CPU seconds per step of ``runs``; ``—`` if none recorded it."""
    per_step = _cpu_per_step(runs)
    return f"{statistics.fmean(per_step):.3f}" if per_step else "—"


def _table(runs: list[dict[str, Any]], pair: str, norms: Sequence[str],
           scopes: Sequence[str]) -> list[str]:
    groups: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["norm"], r["scope"]), {})[r["seed"]] = r
    baseline = {s: r["final_target_acc"] for s, r in groups.get(("batch", "all"), {}).items()}
    lines = ["| norm | scope (target eval context) | seeds | target acc. EMA (%) mean ± 95% CI "
             "| target acc. raw (%) | Δ vs batch, paired (points) ± 95% CI | source acc. EMA (%) "
             "| per-seed target EMA (%) | per-seed change over the last "
             f"{100 * report.LAST_FRACTION:.0f}% of steps (points) | CPU s/step (wall) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    sentences = []
    for scope in scopes:
        for norm in norms:
            g = groups.get((norm, scope))
            if not g:
                continue
            seeds = sorted(g)
            tgt = [g[s]["final_target_acc"] for s in seeds]
            raw = [g[s]["final_target_acc_raw"] for s in seeds]
            src = [g[s]["final_source_acc"] for s in seeds]
            if norm == "batch" and scope == "all":
                delta = "—"
            else:
                diff = report.paired_difference(
                    {s: g[s]["final_target_acc"] for s in seeds}, baseline)
                delta = ("no batch run with these seeds" if diff.n == 0 else
                         f"{100 * diff.mean:+.2f} (one pair, no interval)" if diff.n == 1 else
                         f"{fmt_ci(diff, signed=True)} (n = {diff.n})")
                if diff.n > 1:
                    sentences.append("- " + report.verdict(
                        diff, f"`{norm}`, scope {_scope_text(scope)},", "`batch`"))
            lines.append(
                f"| {norm} | {_scope_text(scope)} | {', '.join(map(str, seeds))} | "
                f"{fmt_ci(report.mean_ci(tgt))} | {fmt_ci(report.mean_ci(raw))} | {delta} | "
                f"{fmt_ci(report.mean_ci(src))} | {', '.join(f'{100 * a:.2f}' for a in tgt)} | "
                f"{', '.join(_late_text(g[s]['curve']) for s in seeds)} | "
                f"{_cpu_text(g[s] for s in seeds)} "
                f"({statistics.fmean(g[s]['seconds_per_step'] for s in seeds):.3f}) |")
    if sentences:
        lines += ["", "What the intervals support (target accuracy, paired by seed):", "",
                  *sentences]
    return lines


def _scope_text(scope: str) -> str:
    return "all (target)" if scope == "all" else "input (source)"


def _late_text(curve: Sequence[dict[str, Any]]) -> str:
    change = late_change(curve)
    return "–" if change is None else f"{100 * change[0]:+.2f}"


#: Norms too slow to project from another norm's time (uan: 57x BatchNorm per layer on CPU).
SLOW = frozenset({"uan", "scb", "mixture"})

#: Reading notes written into the page (kept here so the page regenerates with them).
NOTES: dict[str, str] = {
    "calibration": (
        "This run was made with the digits CNN's earlier PyTorch-default initialisation "
        "(before commit 37073a5 made it He-initialised) and a slower step: it stands as "
        "evidence about the budget only. Each pair's budget (`PAIR_STEPS`) comes from the "
        "grid's own `batch` runs, and whether a pair's runs are flat at it is computed from "
        "their curves below (per-seed change column and the convergence line under each "
        "table): MNIST → MNIST-M was given 8,000 steps after this run, the USPS pairs 3,000. "
        "Where a pair is not flat, raise its budget (or run with `--steps`): each budget gets "
        "its own section."),
    "model": (
        "The digits CNN (3 conv 5×5 + 2 FC, a norm after each, width 16, 0.34 CPU-s/step) is "
        "the stand-in: like WRN-28-2 it has a norm layer after every conv at every depth, so a "
        "context-aware norm acts on low- and high-level features as in the paper's network, "
        "and it fits MNIST (99% source accuracy here) so the domain gap, not capacity, limits "
        "the target accuracy. It is 63× cheaper per step. What it does not reproduce: "
        "residual connections, pre-activation ordering, leaky ReLU and 32×32 inputs; absolute "
        "accuracies are therefore not comparable with the paper's."),
    "speed": (
        "Seconds per AdaMatch step of the default digits CNN (width 16) and of width 32, one "
        "torch thread, process CPU time (wall time on this shared machine varied 2–6× with the "
        "other jobs), random data, 64 + 192 images:\n\n"
        "| width | before (8a1c670) | after, NCHW | after, channels-last (default on CPU) |\n"
        "|---|---|---|---|\n"
        "| 16 | 0.463 | 0.490 | **0.338** (1.37× faster) |\n"
        "| 32 | 1.130 | 1.354 | **0.979** (1.15× faster) |\n\n"
        "With the machine idle (load ≈ 2), wall time before: 0.70 s/step with 1 thread, 0.47 "
        "with 2; after: 0.44 with 1 thread. With other jobs running, 2 threads took 2–4 s/step "
        "(threads waiting for a core), hence `--threads 1` per run here. Changes: channels-last "
        "model and batch, one weak and one strong augmentation call on the joint source + "
        "target batch (already vectorized, no per-image loop), `fedctx.optim`'s SGD."),
}

#: What the AdaMatch paper reports for these pairs (Berthelot et al. 2021, ICLR 2022: UDA on
#: DigitFive, WRN-28-2, 32x32 images). No copy of the paper's per-pair tables is reachable in
#: this environment; the figures below are a third party's transcription of its appendix table
#: (the README of github.com/yizhe-ang/AdaMatch-PyTorch, "Table 127 in the paper", rows = source,
#: columns = target), quoted as such and not checked against the paper itself.
PAPER_TRANSCRIBED = {"mnist-mnistm": 99.2, "mnist-usps": 97.8, "usps-mnist": 99.3}


def paper_figure(pair: str, steps: int, runs: Sequence[dict[str, Any]]) -> str:
    """The page's line on the AdaMatch paper's figure for ``pair`` beside this page's ``batch``
    runs of it (``runs``: the pair's runs at ``steps``), and the differences between the two
    settings."""
    source, target = PAIRS[pair]
    paper = PAPER_TRANSCRIBED[pair]
    data = (f"; {DISPLAY[target]}: the first 20,000 training images here"
            if target == "mnistm" else "")
    batch = [100 * r["final_target_acc"] for r in runs
             if r["norm"] == "batch" and r["scope"] == "all"]
    gap = ""
    if len(batch) > 1:
        est = report.mean_ci(batch)
        inside = est.low <= paper <= est.high
        gap = (f" The `batch` runs above (the paper's norm): {est.mean:.2f} ± "
               f"{est.half_width:.2f}%, {abs(paper - est.mean):.2f} points "
               f"{'below' if est.mean < paper else 'above'} it; the paper's figure is "
               f"{'inside' if inside else 'outside'} their 95% interval.")
    return (f"{paper:.1f}% target accuracy for {DISPLAY[source]} → "
            f"{DISPLAY[target]}, as transcribed from the paper's appendix (its \"Table 127\") in "
            "the README of yizhe-ang/AdaMatch-PyTorch (rows: source, columns: target); not "
            "checked against the paper itself, which is not reachable here. Its setting differs "
            f"from the runs above in ways not separated here: WRN-28-2 on 32×32 images "
            f"instead of the digits CNN of width 16 on 28×28; {PAPER_STEPS:,} steps "
            f"of 64 source images instead of {steps:,}; the median of the last ten checkpoints "
            f"instead of the final EMA model{data}.{gap}")


def write_page(runs_dir: Path, page: Path, *, steps: int | None = None,
               pairs: Sequence[str] = tuple(PAIRS), norms: Sequence[str] = NORMS,
               scopes: Sequence[str] = SCOPES, seeds: Sequence[int] = SEEDS,
               calibration: Path | None = None, wrn: dict[str, Any] | None = None) -> str:
    """Regenerate the results page from the run JSONs, each pair at its budget (``steps``, or
    :data:`PAIR_STEPS` when ``None``) and runs of other budgets in their own sections; return
    its text."""
    all_runs = load_runs(runs_dir)
    budgets_of = {pair: budget_of(pair, steps) for pair in pairs}

    def at_budget(r: dict[str, Any]) -> bool:
        return r["pair"] in budgets_of and _same_budget(r, budgets_of[r["pair"]])

    runs = [r for r in all_runs if at_budget(r)]
    others = sorted({r["steps"] for r in all_runs if not at_budget(r)
                     and r["batch_size"] == BATCH and r["uratio"] == URATIO}, reverse=True)
    budget_text = (f"**{steps:,} steps** for every pair (`--steps`)" if steps else
                   "each pair's budget, where its target curve is flat (`PAIR_STEPS`): "
                   + ", ".join(f"{_title(pair)} **{budgets_of[pair]:,} steps**"
                               for pair in pairs))
    cal_path, wrn_path = runs_dir / "calibration.json", runs_dir / "wrn28_2_timing.json"
    cal = json.loads(cal_path.read_text()) if cal_path.exists() else None
    wrn = wrn or (json.loads(wrn_path.read_text()) if wrn_path.exists() else None)
    head = [
        "# AdaMatch on digits: measured results",
        "",
        "Generated by `python benchmarks/adamatch_digits.py` from the run records in "
        "[runs/adamatch/](runs/adamatch/) (one JSON per run; a rerun skips existing runs). Real "
        "data: MNIST (60,000 train / 10,000 test), MNIST-M (the first 20,000 training images, "
        "all 9,001 test images), USPS (7,291 / 2,007), all as 3×28×28.",
        "",
        "## Protocol",
        "",
        f"- Budget per run: {budget_text}; each step takes a batch of {BATCH} source and "
        f"{URATIO}×{BATCH} target images (each weak + strong); {EVALS_PER_RUN} evaluations per "
        "run on the full test sets (every budget/20 steps; runs started before 2026-11-25 10:00 "
        "UTC evaluated every 100 steps, as their records' commands say, so their CPU s/step "
        "include up to 4× more evaluation; evaluating changes no step of training). Runs of "
        "other budgets that exist are shown in their own sections.",
        "- Everything else at `python -m fedctx.adapt`'s defaults, i.e. the authors' settings: SGD "
        "with plain momentum 0.9, lr 0.03·cos(arccos(0.25)·t/T), weight decay 1e-3 on conv and "
        "linear weights only, τ = 0.9, μ(t) warm-up over the first half, EMA 0.999 with "
        "TensorFlow's num_updates warm-up, norm momentum 0.001, weak shift 3 px. Digits CNN "
        "width 16.",
        "- Reported: the final EMA model's target test accuracy (target context 1 in scope "
        "`all`; source context 0 in scope `input`), mean over seeds ± half-width of the 95% "
        "confidence interval (t distribution, n − 1 dof); Δ vs batch: the mean of the per-seed "
        "differences to the `batch` run with the same seed, with its 95% t-interval (a paired "
        "comparison: same seed = same initial weights, batches and augmentations).",
        "- Scope `input` is the normalization papers' protocol (`--norm-scope input "
        "--target-eval-context source`): `--norm` only on the input image, BatchNorm in the "
        "CNN, target evaluated with the source context; its baseline is the same `batch` run.",
        f"- Hardware: {_hardware_line(runs)}. CPU s/step: the run's process CPU time (all its "
        "threads) over its steps, evaluations included; the machine was shared with other jobs "
        "and runs were paused while other work was measured, so wall s/step are upper bounds.",
        "",
        "Command (the whole grid; `--pairs`, `--norms`, `--scopes`, `--seeds`, "
        "`--budget-minutes` select a part):",
        "",
        "```bash",
        "python benchmarks/adamatch_digits.py --data-dir DATA"
        + (f" --steps {steps}" if steps else ""),
        "```",
        "",
        "One run is `python -m fedctx.adapt --source S --target T --norm N --seed K "
        "--steps N --eval-every E --threads 1` (N: the pair's budget, E = N/20; plus "
        "`--norm-scope input "
        "--target-eval-context source` for scope `input`); each run record holds its exact "
        "command.",
        "",
    ]
    body: list[str] = []
    if cal:
        body += ["## Choice of the step budget (calibration run)", ""]
        body += _calibration_lines(cal) + ["", _calibration_reading(cal) + " "
                                           + NOTES.get("calibration", ""), ""]
    body += [f"## Results at {steps:,} steps" if steps else "## Results at each pair's budget",
             ""]
    for pair in pairs:
        pr = [r for r in runs if r["pair"] == pair]
        body += [f"### {_title(pair)} ({budgets_of[pair]:,} steps)", ""]
        body += (_table(pr, pair, norms, scopes) + ["", convergence_line(pr)] if pr
                 else ["No run yet."]) + ["", "AdaMatch paper: "
                                          + paper_figure(pair, budgets_of[pair], pr), ""]
    if runs:
        plot_curves(runs, pairs, page.parent / CURVES.name)
        body += [f"![target accuracy vs step]({CURVES.name})", "", CURVES_CAPTION, ""]
    for budget in others:
        b_runs = [r for r in all_runs if not at_budget(r) and _same_budget(r, budget)]
        body += [f"## Results at {budget:,} steps (not the pair's budget)", ""]
        for pair in [p for p in pairs if any(r["pair"] == p for r in b_runs)]:
            pr = [r for r in b_runs if r["pair"] == pair]
            body += [f"### {_title(pair)}", "", *_table(pr, pair, norms, scopes), "",
                     convergence_line(pr), ""]
        curves = page.parent / CURVES.name.replace(".png", f"_{budget}.png")
        plot_curves(b_runs, pairs, curves)
        body += [f"![target accuracy vs step, {budget}-step runs]({curves.name})", "",
                 CURVES_CAPTION, ""]
    missing = [c for c in grid(pairs, norms, scopes, seeds)
               if not done(c, runs_dir, budgets_of[c.pair])]
    body += ["## Missing cells", ""]
    if missing:
        groups: dict[tuple[str, str, str], list[Cell]] = {}
        for c in missing:
            groups.setdefault((c.pair, c.norm, c.scope), []).append(c)
        total, total_cpu, unknown = 0.0, 0.0, []
        rows = ["| pair | norm | scope | missing seeds | projected CPU time per run (a free "
                "core) | projected wall time per run here |", "|---|---|---|---|---|---|"]
        for (pair, norm, scope), cells in groups.items():
            sec, cpu = _projection(cells[0], all_runs, budgets_of[pair])
            if sec is None:
                unknown.append(norm)
            total += (sec or 0.0) * len(cells)
            total_cpu += (cpu or 0.0) * len(cells)
            rows.append(f"| {pair} | {norm} | {scope} | "
                        f"{', '.join(str(c.seed) for c in cells)} | "
                        f"{'not measured' if cpu is None else f'{cpu / 60:.0f} min'} | "
                        f"{'not measured' if sec is None else f'{sec / 60:.0f} min'} |")
        body += [f"{len(missing)} of {len(grid(pairs, norms, scopes, seeds))} runs are missing. "
                 f"Projected from the runs' own CPU time per step (same norm and scope where "
                 f"measured): **{total_cpu / 3600:.1f} h** of one free core for those with a "
                 f"measured norm; at the wall time measured here {total / 3600:.1f} h (one thread "
                 "per run on a machine shared with other jobs, and runs were paused while other "
                 "benchmarks measured, which wall time counts)"
                 + (f" (not counted: {', '.join(sorted(set(unknown)))}, never timed in an "
                    "AdaMatch run here)" if unknown else "")
                 + ". " + _cpu_line(all_runs), ""] + rows + [""]
    else:
        body += ["None.", ""]
    for pair in pairs:
        note = _longer_budget_note(pair, [r for r in runs if r["pair"] == pair],
                                   budgets_of[pair], [c for c in grid(pairs, norms, scopes, seeds)
                                                      if c.pair == pair], all_runs)
        body += [note, ""] if note else []
    if NOTES.get("speed"):
        body += ["## Speed of one step (CPU)", "", NOTES["speed"], ""]
    if wrn:
        body += ["## Model cost: digits CNN vs WRN-28-2", "",
                 f"WRN-28-2 ({wrn['params']:,} parameters, the paper's model; built in "
                 "`wrn28_2()` here, 32×32 inputs, channels-last) takes "
                 f"**{wrn['wrn28_2_cpu_seconds_per_step']:.1f} CPU-seconds per AdaMatch step** "
                 f"on this CPU with {wrn['threads']} thread (forward + backward of the 512-image "
                 "joint batch and the 128-image source-only pass; "
                 f"{wrn['wrn28_2_seconds_per_step']:.0f} s of wall time on the loaded machine). "
                 f"The authors' schedule, {wrn['paper_steps']:,} steps (8 Mi source images / 64), "
                 f"would take **{wrn['paper_schedule_cpu_hours']:,.0f} CPU-hours** "
                 f"(≈ {wrn['paper_schedule_cpu_hours'] / 24:.0f} days on one core). "
                 "`python benchmarks/adamatch_digits.py --wrn-timing` measures it.", "",
                 NOTES.get("model", ""), ""]
    text = "\n".join(head + body)
    page.write_text(text)
    return text


# ---------------------------------------------------------------- CLI


def _list(text: str, valid: Sequence[str], flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in valid]
    if bad or not items:
        raise SystemExit(f"error: {flag}: invalid value(s) {bad or text!r}; valid choices: "
                         f"{', '.join(valid)}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="", help="data root (default: $FEDCTX_DATA, else "
                        "fedctx's default)")
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--norms", default=",".join(NORMS))
    parser.add_argument("--scopes", default=",".join(SCOPES))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--steps", type=int, default=0,
                        help="steps of every run (0: each pair's budget, PAIR_STEPS)")
    parser.add_argument("--budget-minutes", type=float, default=0.0,
                        help="start no run whose projected end is past this (0: no limit)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument("--page-only", action="store_true", help="only regenerate the page")
    parser.add_argument("--wrn-timing", action="store_true",
                        help="measure WRN-28-2 s/step here, store it for the page, and exit")
    parser.add_argument("--calibration", type=Path, default=None, metavar="RUN_DIR",
                        help="store the eval curve of this long run (its results folder) for "
                        "the page, and exit")
    parser.add_argument("--calibration-command", default="",
                        help="the command of the --calibration run, shown on the page")
    args = parser.parse_args(argv)
    pairs = _list(args.pairs, tuple(PAIRS), "--pairs")
    norms = _list(args.norms, NORMS + ("group", "instance", "layer", "scb"), "--norms")
    scopes = _list(args.scopes, SCOPES, "--scopes")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds: invalid value {args.seeds!r}") from None
    if args.wrn_timing:
        result = time_wrn(args.threads)
        args.runs_dir.mkdir(parents=True, exist_ok=True)
        (args.runs_dir / "wrn28_2_timing.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0
    if args.calibration:
        record_calibration(args.calibration, args.runs_dir, args.calibration_command)
        return 0
    if args.page_only:
        write_page(args.runs_dir, args.page, steps=args.steps, pairs=pairs, norms=norms,
                   scopes=scopes, seeds=seeds)
        return 0
    run_benchmark(data_dir=args.data_dir, pairs=pairs, norms=norms, scopes=scopes, seeds=seeds,
                  steps=args.steps, budget_minutes=args.budget_minutes, jobs=args.jobs,
                  threads=args.threads, runs_dir=args.runs_dir, page=args.page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
