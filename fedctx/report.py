"""Comparing runs as researchers compare them: mean ± 95% confidence interval over seeds, the
paired difference of two methods run with the same seeds, and ``python -m fedctx.report
RUN_DIR...``, which pools finished runs (of ``fedctx.simulate`` or of ``fedctx.adapt``) that
differ only in their seed and prints (and plots) them side by side.

Intervals use Student's t distribution with ``n - 1`` degrees of freedom (seeds are few); with
one value the interval is undefined (``nan``) and printed as such, never as ``± 0``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values with the half-width of its 95% confidence interval."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below zero (for a difference)."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def format(self, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
        """``"0.837 ± 0.012"`` (values multiplied by ``scale``, e.g. 100 for percent; ``signed``:
        ``"+1.2 ± 0.4"``, for a difference)."""
        if self.n == 0:
            return "–"
        hw = "n/a" if math.isnan(self.half_width) else f"{self.half_width * scale:.{digits}f}"
        return f"{self.mean * scale:{'+' if signed else ''}.{digits}f} ± {hw}"


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean and the t-interval half-width ``t_{(1+c)/2, n-1} * s / sqrt(n)`` of ``values``."""
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = float(stats.t.ppf((1 + confidence) / 2, n - 1))
    return Estimate(mean, t * sd / math.sqrt(n), n)


def paired_difference(a: dict[int, float], b: dict[int, float],
                      confidence: float = 0.95) -> Estimate:
    """Mean ± CI of ``a[seed] - b[seed]`` over the seeds both have (a paired comparison)."""
    seeds = sorted(set(a) & set(b))
    return mean_ci([a[s] - b[s] for s in seeds], confidence)


#: Fewest paired seeds behind a stated comparison (the project's rule: an accuracy comparison
#: carries at least 3 seeds; with 2 the t-interval is too wide to mean much).
MIN_PAIRED_SEEDS = 3


def verdict(diff: Estimate, name: str, baseline: str) -> str:
    """A sentence that claims only what the interval of ``diff`` supports; no comparison from
    fewer than :data:`MIN_PAIRED_SEEDS` paired seeds."""
    if diff.n < MIN_PAIRED_SEEDS:
        return (f"{name} vs {baseline}: {diff.n} paired seed{'s' if diff.n != 1 else ''}, "
                f"too few to compare (a comparison needs {MIN_PAIRED_SEEDS}).")
    if not diff.excludes_zero():
        return (f"{name} and {baseline} are not distinguishable at this budget (paired "
                f"difference {diff.format(100, 1)} points, 95% CI contains 0).")
    word = "higher" if diff.mean > 0 else "lower"
    return (f"{name} is {word} than {baseline} by {abs(diff.mean) * 100:.1f} points (95% CI "
            f"{diff.low * 100:+.1f} to {diff.high * 100:+.1f}, {diff.n} paired seeds).")


#: A curve counts as flat (the run converged at its budget) when its value moved by less than
#: ``FLAT_POINTS`` points (accuracy in percent) over the last ``LAST_FRACTION`` of its length.
FLAT_POINTS = 1.0
LAST_FRACTION = 0.2


def late_change(curve: Sequence[dict[str, Any]], key: str, *, x: str = "step",
                fraction: float = LAST_FRACTION) -> tuple[float, int, int] | None:
    """``(change, from_x, to_x)``: how much ``curve``'s ``key`` (an accuracy in [0, 1]) moved from
    its last point at or before ``(1 - fraction) * X`` to its last point (at ``X``); points without
    ``key`` are skipped. ``None`` when no point lies that early."""
    points = [p for p in curve if key in p]
    if not points:
        return None
    last = points[-1]
    earlier = [p for p in points if p[x] <= (1 - fraction) * last[x]]
    if not earlier:
        return None
    return last[key] - earlier[-1][key], earlier[-1][x], last[x]


def not_flat(change: float, flat_points: float = FLAT_POINTS) -> bool:
    """Whether a run whose :func:`late_change` is ``change`` (accuracy in [0, 1]) is not flat."""
    return abs(100 * change) >= flat_points


def flatness(changes: Sequence[tuple[str, float]], span: str,
             flat_points: float = FLAT_POINTS) -> str:
    """A sentence on whether every run is flat: ``changes`` holds each run's name and its
    :func:`late_change` (accuracy in [0, 1]); ``span`` says over what, e.g. "the last 20 rounds"."""
    if not changes:
        return "Convergence: no run has points early enough to tell."
    moved = [(name, c) for name, c in changes if not_flat(c, flat_points)]
    if not moved:
        worst = max(abs(100 * c) for _, c in changes)
        return (f"Convergence: **flat** in all {len(changes)} runs (accuracy moved at most "
                f"{worst:.2f} points over {span}; criterion: under {flat_points:g}).")
    listed = ", ".join(f"{name} {100 * c:+.2f}" for name, c in moved)
    return (f"Convergence: **not flat** in {len(moved)} of {len(changes)} runs (accuracy moved "
            f"{flat_points:g} point or more over {span}: {listed}); these numbers compare the "
            "methods at this budget, not at convergence.")


# ----------------------------------------------------------------------------- run folders
# Options that never change a run's results: runs that differ only in these (and the seed) are
# repeats of one experiment.
NOT_RESULTS = frozenset({"seed", "out", "resume", "verbose", "backend", "ray_address",
                         "num_cpus", "cpus_per_client", "gpus_per_client", "data_dir",
                         "download", "eval_every"})
#: What an AdaMatch run's ``summary.json`` must hold for :meth:`Run.final` and :meth:`Run.curve`.
ADAPT_SUMMARY_KEYS = frozenset({"config", "evals", "final_target_acc", "final_target_acc_raw",
                                "final_source_acc"})
#: The options that change no result for ``python -m fedctx.adapt`` (evaluating changes no
#: step of training; ``device`` and the layout change float order only).
ADAPT_NOT_RESULTS = frozenset({"seed", "out", "threads", "progress_every", "malloc", "data_dir",
                               "download", "eval_every", "embed_samples", "device"})


@dataclass
class Run:
    """A finished run folder of ``python -m fedctx.simulate`` (``kind`` ``"simulate"``: test
    accuracy per context and overall, per round) or of ``python -m fedctx.adapt`` (``"adapt"``:
    target and source accuracy of the EMA model, target accuracy of the raw model, per step)."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    kind: str = "simulate"

    @classmethod
    def load(cls, path: Path) -> Run:
        """Read ``config.json``, ``summary.json`` and ``metrics.jsonl`` (an AdaMatch run: its
        ``summary.json``, which holds its options and evaluations); ``ValueError`` (one line)
        if ``path`` is not a finished run."""
        adapt = (path / "summary.json").is_file() and not (path / "config.json").exists()
        names = ("summary.json",) if adapt else ("config.json", "summary.json", "metrics.jsonl")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            what = "not a folder" if not path.is_dir() else f"lacks {', '.join(missing)}"
            raise ValueError(f"{path}: {what} (not a finished fedctx run)")
        try:
            summary = json.loads((path / "summary.json").read_text())
            if adapt:
                if not ADAPT_SUMMARY_KEYS <= set(summary):
                    raise ValueError(f"{path}: lacks config.json, and its summary.json is not an "
                                     "AdaMatch run's (not a finished fedctx run)")
                return cls(path, summary["config"], summary, summary["evals"], kind="adapt")
            return cls(path, json.loads((path / "config.json").read_text()), summary,
                       [json.loads(line) for line in
                        (path / "metrics.jsonl").read_text().splitlines() if line.strip()])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: unreadable results ({err})") from None

    @property
    def experiment(self) -> tuple[tuple[str, Any], ...]:
        """The options that determine results, seed excluded."""
        ignored = ADAPT_NOT_RESULTS if self.kind == "adapt" else NOT_RESULTS
        return tuple(sorted((k, v) for k, v in self.config.items() if k not in ignored))

    @property
    def x(self) -> str:
        """What the curve is indexed by: ``"round"`` or ``"step"``."""
        return "step" if self.kind == "adapt" else "round"

    @property
    def headline(self) -> str:
        """The column a plot draws: ``"overall"`` or ``"target (EMA)"``."""
        return "target (EMA)" if self.kind == "adapt" else "overall"

    def final(self) -> dict[str, float]:
        """The final accuracies, by column name."""
        s = self.summary
        if self.kind == "adapt":
            return {"target (EMA)": s["final_target_acc"],
                    "target (raw)": s["final_target_acc_raw"],
                    "source (EMA)": s["final_source_acc"]}
        return {**s["accuracy_per_context"], "overall": s["accuracy"]}

    def curve(self) -> list[tuple[int, dict[str, float]]]:
        """``(round or step, accuracies by column name)`` at each evaluation."""
        if self.kind == "adapt":
            return [(e["step"], {"target (EMA)": e["target_acc"],
                                 "target (raw)": e["target_acc_raw"],
                                 "source (EMA)": e["source_acc"]}) for e in self.history]
        return [(r["round"], {**r["accuracy_per_context"], "overall": r["accuracy"]})
                for r in self.history if "accuracy" in r]


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders ``paths`` name: the output folder of ``python -m fedctx.simulate --seeds``
    stands for its ``seed-<s>`` runs (in seed order), that of ``python -m fedctx.adapt sweep``
    for its finished ``<norm>-seed<s>`` runs; any other path for itself."""
    def seed_of(folder: Path) -> int:
        return int(folder.name.removeprefix("seed-"))

    folders: list[Path] = []
    for path in paths:
        if (path / "summary.json").exists():
            folders.append(path)
        elif (path / "sweep.json").exists():
            folders.extend(sorted(f.parent for f in path.glob("*/summary.json")))
        else:
            seeds = [f for f in path.glob("seed-*") if f.is_dir() and f.name[5:].isdigit()]
            folders.extend(sorted(seeds, key=seed_of) or [path])
    return folders


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by experiment (seeds pooled), labelled by the options that differ."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.experiment, []).append(run)
    keys = [dict(k) for k in groups]
    differing = sorted({k for d in keys for k in d if any(e.get(k) != d[k] for e in keys)})
    return {(" ".join(f"{k}={d[k]}" for k in differing) or "all runs"): group
            for d, group in zip(keys, groups.values(), strict=True)}


def _cells(records: list[dict[str, float]], columns: list[str]) -> list[str]:
    """Per column, mean ± 95% CI (%) over the records that have it."""
    return [mean_ci([r[c] for r in records if c in r]).format(100, 1) for c in columns]


def _columns(records: list[dict[str, float]]) -> list[str]:
    return list(dict.fromkeys(c for r in records for c in r))


def comparison_table(groups: dict[str, list[Run]]) -> str:
    """Markdown table: final accuracy (%) per column (each context and overall; an AdaMatch
    run's target and source accuracy) per experiment, mean ± 95% CI over its seeds."""
    from fedctx.results import format_table

    columns = _columns([r.final() for runs in groups.values() for r in runs])
    rows = [(label, ",".join(str(r.config.get("seed")) for r in runs),
             *_cells([r.final() for r in runs], columns)) for label, runs in groups.items()]
    return format_table(rows, ("experiment", "seeds", *columns))


def find_baseline(groups: dict[str, list[Run]], spec: str) -> str:
    """The label of the one experiment whose options include every ``key=value`` of ``spec``
    (e.g. ``norm=batch``); ``ValueError`` (one line) when none or several do."""
    wanted = [(k.replace("-", "_"), v) for k, _, v in (w.partition("=") for w in spec.split())]
    found = [label for label, runs in groups.items()
             if all(k in runs[0].config and str(runs[0].config[k]) == v for k, v in wanted)]
    if len(found) != 1:
        raise ValueError(f"--baseline {spec!r} matches {len(found) or 'no'} of the experiments "
                         f"({'; '.join(groups)}); give options that name one")
    return found[0]


def difference_table(groups: dict[str, list[Run]], baseline: str) -> tuple[str, list[str]]:
    """Markdown table of each experiment's paired difference to ``baseline`` in the headline
    accuracy (points; the per-seed differences' mean ± 95% CI, over the seeds both ran), and
    one sentence per experiment claiming only what its interval supports."""
    from fedctx.results import format_table

    def by_seed(runs: list[Run]) -> dict[int, float]:
        return {r.config.get("seed"): r.final()[r.headline] for r in runs}

    base = by_seed(groups[baseline])
    rows, sentences = [], []
    for label, runs in groups.items():
        if label == baseline:
            continue
        diff = paired_difference(by_seed(runs), base)
        rows.append((label, str(diff.n), diff.format(100, 1, signed=True)))
        sentences.append(verdict(diff, label, baseline))
    return format_table(rows, ("experiment", "paired seeds", "Δ (points) ± 95% CI")), sentences


def round_table(runs: list[Run]) -> str:
    """Markdown table: accuracy (%) per evaluated round or step (rows) per column, mean ± 95% CI
    over ``runs`` (the seeds of one experiment)."""
    from fedctx.results import format_table

    by_x: dict[int, list[dict[str, float]]] = {}
    for run in runs:
        for x, values in run.curve():
            by_x.setdefault(x, []).append(values)
    columns = _columns([v for values in by_x.values() for v in values])
    rows = [(str(x), *_cells(by_x[x], columns)) for x in sorted(by_x)]
    return format_table(rows, (runs[0].x, *columns))


def plot_rounds(groups: dict[str, list[Run]], path: Path) -> None:
    """The headline accuracy (overall; an AdaMatch run's target accuracy of the EMA model) per
    round or step, mean over each group's seeds with its 95% CI band (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedctx.results import save_figure

    first = next(iter(groups.values()))[0]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, runs in groups.items():
        per_x: dict[int, list[float]] = {}
        for run in runs:
            for x, values in run.curve():
                per_x.setdefault(x, []).append(values[run.headline])
        xs = sorted(per_x)
        est = [mean_ci(per_x[x]) for x in xs]
        line, = ax.plot(xs, [e.mean for e in est], marker="o", label=label)
        if all(e.n > 1 for e in est):
            ax.fill_between(xs, [e.low for e in est], [e.high for e in est],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel(first.x)
    ax.set_ylabel(f"{first.headline} test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m fedctx.report RUN_DIR... [--plot FILE]``: compare finished runs: final
    accuracy per context (an AdaMatch run: target and source), then accuracy per round (step)
    of each experiment."""
    import sys

    from fedctx.config import OneLineParser
    from fedctx.results import check_results_folder

    parser = OneLineParser(
        prog="python -m fedctx.report",
        description="Compare finished runs side by side: runs that differ only in their seed "
                    "are pooled (mean ± 95% CI per context, or of an AdaMatch run's target and "
                    "source accuracy); --plot draws accuracy per round or step.")
    parser.add_argument("runs", nargs="+", type=Path, help="results folders of fedctx.simulate "
                        "or of fedctx.adapt (a --seeds output folder stands for its seed-<s> "
                        "runs, a sweep's for its runs)")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of accuracy per "
                        "round or step (mean and 95%% CI band per experiment)")
    parser.add_argument("--baseline", default="", metavar="OPTIONS",
                        help="the experiment the others are compared with, seed by seed, e.g. "
                             "'norm=batch' (options as the tables label experiments): the paired "
                             "difference in overall (AdaMatch: target) accuracy with its 95%% CI")
    args = parser.parse_args(argv)
    try:
        if args.plot:  # before the tables: a plot that cannot be written is told at once
            if args.plot.is_dir():
                raise ValueError(f"--plot {args.plot} is a folder; give a file name (.png)")
            check_results_folder(args.plot.parent, ValueError, flag=f"--plot {args.plot}: folder")
        runs = [Run.load(p) for p in run_folders(args.runs)]
        if len({r.kind for r in runs}) > 1:
            raise ValueError("runs of fedctx.simulate and of fedctx.adapt measure different "
                             "things; compare each kind on its own")
        groups = group_runs(runs)
        baseline = find_baseline(groups, args.baseline) if args.baseline else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Final test accuracy (%), mean ± 95% CI over seeds ({len(runs)} runs):\n")
    print(comparison_table(groups))
    if baseline is not None:
        table, sentences = difference_table(groups, baseline)
        print(f"\nPaired difference to {baseline} in final {runs[0].headline} accuracy, seed "
              f"by seed:\n\n{table}\n")
        print("\n".join(f"- {s}" for s in sentences))
    for label, group in groups.items():
        print(f"\nTest accuracy (%) per {group[0].x}, {label} (mean ± 95% CI over "
              f"{len(group)} runs):\n")
        print(round_table(group))
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_rounds(groups, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
