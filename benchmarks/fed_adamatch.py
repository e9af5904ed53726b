"""Federated domain adaptation (#12 item 3): labelled MNIST clients + unlabelled target clients
training with AdaMatch's unlabelled objective, against centralized AdaMatch and two federated
baselines whose target clients are absent, on MNIST -> USPS and MNIST -> MNIST-M.

    python benchmarks/fed_adamatch.py --data-dir DIR [--pairs mnist-usps,mnist-mnistm]
                                      [--seeds 0,1,2] [--rounds 4] [--rows ROW,...]
                                      [--budget-minutes 0]
    python benchmarks/fed_adamatch.py --page-only

Rows, per pair and seed (same data budget: 2 clients x 743 images per domain, ``--rounds``
rounds of one local epoch, batch 32):

* ``fed-adamatch``: ``python -m fedctx.simulate --scenario mnist-<t> --clients 4
  --unlabelled-domains <t>`` (2 labelled MNIST clients, 2 unlabelled target clients), ``context``
  norm, ``per-context`` bank; every client trains every round.
* ``per-context, target absent``: the same without the target clients (``--clients 2
  --holdout-domain <t>``): supervised on MNIST only, the target evaluated as the held-out domain
  with the default ``--unseen-rule`` (every rule the server evaluates is recorded and listed).
* ``FedAvg, labelled only``: ``--norm batch --norm-policy average``, target absent likewise.
* ``centralized AdaMatch``: ``python -m fedctx.adapt --source mnist --target <t> --norm context``
  on 1,486 images per domain for as many steps of 32 + 32 images as the federated run's
  labelled clients take batches (``2 * ceil(743 / 32) * rounds``), its own optimizer settings
  (lr 0.03, cosine decay, weight decay 1e-3) except ``--norm-momentum 0``: the layers' own
  running-statistics momentum (0.1), as in the federated model (adapt's default 0.001 suits
  its long runs; after a few hundred steps its statistics are still near their initial values);
  the raw model's accuracy (the federated rows have no EMA model; the EMA model's is recorded
  beside it).

Each finished run is kept in ``docs/results/runs/fed_adamatch/`` (``common.run_cell`` for the
federated rows, the same layout for ``adapt``) and skipped later; the page
``docs/results/fed_adamatch.md`` is rewritten from whatever runs exist.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO, Budget, benchmark_parser, machine, run_cell, seeds_and_budget

from fedctx.report import mean_ci, paired_difference, verdict
from fedctx.results import atomic_write_text

RESULTS = REPO / "docs" / "results"
RUNS = RESULTS / "runs" / "fed_adamatch"
PAIRS = {"mnist-usps": "usps", "mnist-mnistm": "mnistm"}
DISPLAY = {"usps": "USPS", "mnistm": "MNIST-M"}
PER_CLIENT, BATCH = 743, 32
ROWS = ("fed-adamatch", "per-context-absent", "fedavg-absent", "centralized")
LABELS = {"fed-adamatch": "fed-AdaMatch (`context`, `per-context`, unlabelled target clients)",
          "per-context-absent": "`context` + `per-context`, target clients absent",
          "fedavg-absent": "FedAvg (`batch`, `average`), target clients absent",
          "centralized": "centralized AdaMatch (`fedctx.adapt`, `context`)"}


def federated_flags(row: str, pair: str, rounds: int) -> list[str]:
    target = PAIRS[pair]
    common = ["--scenario", pair, "--fraction", "1", "--min-clients", "2", "--rounds",
              str(rounds), "--eval-every", str(rounds), "--local-epochs", "1", "--batch-size",
              str(BATCH)]
    if row == "fed-adamatch":
        return [*common, "--clients", "4", "--norm", "context", "--norm-policy", "per-context",
                "--unlabelled-domains", target]
    norm, policy = ("context", "per-context") if row == "per-context-absent" else ("batch",
                                                                                   "average")
    return [*common, "--clients", "2", "--norm", norm, "--norm-policy", policy,
            "--holdout-domain", target]


def adapt_steps(rounds: int) -> int:
    """Steps of the centralized run: the federated run's labelled batches over all rounds."""
    return 2 * math.ceil(PER_CLIENT / BATCH) * rounds


def adapt_flags(pair: str, seed: int, rounds: int) -> list[str]:
    steps = adapt_steps(rounds)
    return ["--source", "mnist", "--target", PAIRS[pair], "--norm", "context", "--steps",
            str(steps), "--batch-size", str(BATCH), "--uratio", "1", "--train-samples",
            str(2 * PER_CLIENT), "--eval-samples", "2000", "--eval-every", str(steps),
            "--embed-samples", "10", "--norm-momentum", "0", "--threads", "1", "--seed",
            str(seed)]


def adapt_record(summary: dict[str, Any], target: str) -> dict[str, Any]:
    """Raw model's accuracies (the federated rows have no EMA model), the EMA model's beside."""
    return {"accuracy_per_context": {"mnist": summary["final_source_acc_raw"],
                                     target: summary["final_target_acc_raw"]},
            "ema_accuracy_per_context": {"mnist": summary["final_source_acc"],
                                         target: summary["final_target_acc"]}}


def holdout_record(summary: dict[str, Any], target: str) -> dict[str, Any]:
    """The trained context's accuracy and the held-out target's, under the default rule and
    every rule the server recorded."""
    held = summary["holdout"]
    return {"accuracy_per_context": {"mnist": summary["accuracy_per_context"]["mnist"],
                                     target: held["accuracy"]},
            "holdout": held}


def run_module(cell: str, seed: int, module: str, shown: list[str], hidden: list[str],
               budget: Budget | None, data_dir: str,
               extract: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any] | None:
    """``common.run_cell``'s contract for a command whose summary it does not read: the record
    of ``python -m MODULE SHOWN`` (``extract(summary)`` plus the command, wall time, machine),
    read from ``RUNS/<cell>-seed<seed>.json`` when it exists, else run now unless ``budget`` is
    ``None`` or spent."""
    path = RUNS / f"{cell}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    if budget is None or not budget.allows(seed):
        return None
    with tempfile.TemporaryDirectory(prefix="fedctx-bench-") as tmp:
        argv = [*shown, *hidden, "--out", str(Path(tmp) / "run")]
        if data_dir:
            argv += ["--data-dir", data_dir]
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cell} seed {seed} failed:\n{proc.stderr[-2000:]}")
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    record = {"cell": cell, "seed": seed,
              "command": f"python -m {module} " + shlex.join(shown)
                         + (" --data-dir DATA" if data_dir else ""),
              **extract(summary), "wall_seconds": time.time() - t0, "machine": machine()}
    RUNS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    print(f"{cell} seed {seed}: accuracy {record['accuracy_per_context']} "
          f"({record['wall_seconds']:.0f} s)", flush=True)
    return record


def run_row(row: str, pair: str, seed: int, rounds: int, budget: Budget | None,
            data_dir: str) -> dict[str, Any] | None:
    target, cell = PAIRS[pair], f"{pair}-{row}-r{rounds}"
    if row == "fed-adamatch":
        return run_cell(RUNS, cell, seed, federated_flags(row, pair, rounds), budget,
                        data_dir=data_dir)
    if row == "centralized":
        return run_module(cell, seed, "fedctx.adapt", adapt_flags(pair, seed, rounds),
                          ["--progress-every", "0"], budget, data_dir,
                          lambda s: adapt_record(s, target))
    return run_module(cell, seed, "fedctx.simulate",
                      [*federated_flags(row, pair, rounds), "--seed", str(seed)],
                      ["--backend", "inprocess"], budget, data_dir,
                      lambda s: holdout_record(s, target))


def accuracy(record: dict[str, Any], domain: str) -> float:
    """Final test accuracy of ``domain`` in a run record (a trained context or the held-out
    domain)."""
    return float(record["accuracy_per_context"][domain])


def write_page(records: dict[tuple[str, str], list[dict[str, Any]]], pairs: list[str],
               seeds: str, rounds: int) -> Path:
    lines = [
        "# Federated domain adaptation: unlabelled target clients (#12 item 3)", "",
        f"Command: `python benchmarks/fed_adamatch.py --data-dir DATA --seeds {seeds} --rounds "
        f"{rounds}` (DATA: a folder with MNIST, USPS and MNIST-M; see docs/data.md). What the "
        "unlabelled clients compute and how it differs from centralized AdaMatch: "
        "[docs/federated_adaptation.md](../federated_adaptation.md). Each row's exact command "
        "is in its run record under `runs/fed_adamatch/`.",
        f"Machine: {machine()}; every run single-threaded, beside other jobs on the two cores.",
        "",
        f"Budget: {rounds} rounds of one local epoch (batch {BATCH}) on 2 labelled MNIST "
        f"clients of {PER_CLIENT} images (+ 2 unlabelled target clients of {PER_CLIENT} images "
        f"for fed-AdaMatch); centralized AdaMatch: {adapt_steps(rounds)} steps of {BATCH} "
        f"MNIST + {BATCH} target images from {2 * PER_CLIENT} images per domain (the same image "
        "visits). **These are short runs, not converged**: they compare methods at one small "
        "budget, not their final accuracy.",
        "", "Final test accuracy (%) on 2,000 test images per domain: mean ± 95% CI (t, n−1 dof) "
        "over seeds; Δ: paired difference to fed-AdaMatch over the same seeds.", "",
    ]
    sentences = []
    for pair in pairs:
        target = PAIRS[pair]
        ours = {r["seed"]: accuracy(r, target) for r in records[(pair, "fed-adamatch")]}
        lines += [f"## MNIST → {DISPLAY[target]}", "",
                  f"| method | n | MNIST | {DISPLAY[target]} (target) | Δ target vs fed-AdaMatch "
                  "| s per run |", "|---|---|---|---|---|---|"]
        for row in ROWS:
            recs = records[(pair, row)]
            if not recs:
                lines.append(f"| {LABELS[row]} | 0 | – | – | – | not run |")
                continue
            tgt = {r["seed"]: accuracy(r, target) for r in recs}
            diff = paired_difference(tgt, ours)
            lines.append(
                f"| {LABELS[row]} | {len(recs)} | "
                f"{mean_ci([accuracy(r, 'mnist') for r in recs]).format(100, 1)} | "
                f"**{mean_ci(list(tgt.values())).format(100, 1)}** | "
                + ("—" if row == "fed-adamatch" else diff.format(100, 1))
                + f" | {sum(r['wall_seconds'] for r in recs) / len(recs):.0f} |")
            if row != "fed-adamatch":
                sentences.append(f"- MNIST → {DISPLAY[target]}: "
                                 + verdict(paired_difference(ours, tgt), "fed-AdaMatch",
                                           LABELS[row]))
        absent = [{r["seed"]: accuracy(r, d) for r in records[(pair, row)]}
                  for row in ("per-context-absent", "fedavg-absent") for d in ("mnist", target)]
        if absent[0] and absent[:2] == absent[2:]:
            lines += ["", "The two target-absent rows are equal on every seed: with the target "
                      "held out one context remains, and a `context` norm over one context "
                      "normalizes as BatchNorm does while a one-entry bank is the average."]
        for row in ("per-context-absent", "fedavg-absent"):
            recs = records[(pair, row)]
            rules = sorted({k for r in recs for k, v in r["holdout"]["accuracy_per_rule"].items()
                            if v is not None})
            if rules:
                lines += ["", f"{LABELS[row]}: the held-out target under each rule of "
                          "`--unseen-rule` (the table shows `" + recs[0]["holdout"]["rule"]
                          + "`): " + "; ".join(
                              f"`{rule}` " + mean_ci([r["holdout"]["accuracy_per_rule"][rule]
                                                      for r in recs]).format(100, 1)
                              for rule in rules) + "."]
        ema = records[(pair, "centralized")]
        if ema:
            lines += ["", "Centralized AdaMatch's EMA model (its usual report) on the target: "
                      + mean_ci([r["ema_accuracy_per_context"][target] for r in ema])
                      .format(100, 1) + "."]
        lines.append("")
    lines += ["What the intervals support (target accuracy):", "", *sentences, ""]
    page = RESULTS / "fed_adamatch.md"
    page.write_text("\n".join(lines))
    return page


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="", help="folder with MNIST, USPS, MNIST-M")
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rows", default=",".join(ROWS), help="rows to run (all by default)")
    args = parser.parse_args()
    pairs = args.pairs.split(",")
    if bad := [p for p in pairs if p not in PAIRS]:
        parser.error(f"--pairs: unknown {bad[0]!r}; valid choices: {', '.join(PAIRS)}")
    rows = args.rows.split(",")
    if bad := [r for r in rows if r not in ROWS]:
        parser.error(f"--rows: unknown {bad[0]!r}; valid choices: {', '.join(ROWS)}")
    seeds, budget = seeds_and_budget(parser, args, RUNS)
    # every pair and row with records stays on the page; runs start for the chosen ones only
    records: dict[tuple[str, str], list[dict[str, Any]]] = {
        (p, r): [] for p in PAIRS for r in ROWS}
    for seed in seeds:
        for pair in PAIRS:
            for row in ROWS:
                chosen = pair in pairs and row in rows
                rec = run_row(row, pair, seed, args.rounds, budget if chosen else None,
                              args.data_dir)
                if rec is not None:
                    records[(pair, row)].append(rec)
    shown = [p for p in PAIRS if p in pairs or any(records[(p, r)] for r in ROWS)]
    print(f"wrote {write_page(records, shown, ','.join(map(str, seeds)), args.rounds)}")


if __name__ == "__main__":
    main()
