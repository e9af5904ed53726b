"""Clients that hold several domains (issue #12 item 5): accuracy per context against
``--domain-alpha`` in {one domain per client, 10, 1, 0.1} for FedAvg, FedBN, SiloBN and
per-context norms on the ``digits`` scenario, seeds 0, 1, 2, written to
docs/results/domain_mix.md (mean ± 95% CI, paired difference to FedAvg); and the same
per-context runs with contexts discovered by k-means (issue #12 item 4), and the held-out-domain
table (MNIST-M held out, every rule of ``fedctx.federated.unseen`` per policy; item 2).

    python benchmarks/domain_mix.py [--seeds 0,1,2] [--budget-minutes 0] [--page-only]

Each run is ``python -m fedctx.simulate --scenario digits --rounds 4 --clients 10
--eval-every 4 --domain-alpha A <policy flags> --seed k`` in-process (a short budget: the whole
grid, 48 runs, takes about 40 minutes on 2 idle cores); finished runs are kept in
``docs/results/runs/domain_mix/`` and skipped, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    REPO,
    Budget,
    benchmark_parser,
    by_seed,
    estimate,
    machine,
    run_cell,
    seeds_and_budget,
)

from fedctx.report import mean_ci, paired_difference, verdict
from fedctx.results import atomic_write_text

RESULTS = REPO / "docs" / "results"
RUNS = RESULTS / "runs" / "domain_mix"
BASE = ["--scenario", "digits", "--rounds", "4", "--clients", "10", "--eval-every", "4"]
#: ``--domain-alpha`` values, from mostly one domain per client (0.1) to near-equal mixes (10),
#: and 0: exactly one domain per client. In the order the grid runs them.
ALPHAS = {"0.1": 0.1, "one domain per client": 0.0, "1": 1.0, "10": 10.0}
#: Row -> (norm, norm policy).
ROWS = {
    "FedAvg (`batch`, `average`)": ("batch", "average"),
    "FedBN (`batch`, `local`)": ("batch", "local"),
    "SiloBN (`batch`, `stats-local`)": ("batch", "stats-local"),
    "per-context (`context`, `per-context`)": ("context", "per-context"),
}
BASELINE = next(iter(ROWS))
#: The held-out-domain table (issue #12 item 2): one domain per client, MNIST-M held out.
HOLDOUT = "mnistm"
#: Discovered contexts (issue #12 item 4): the per-context row, one domain per client, with
#: contexts from federated k-means (K = 4) instead of the domains.
KMEANS = ("context", "per-context")


def cell(alpha: float, norm: str, policy: str) -> str:
    return f"digits-a{alpha:g}-{norm}-{policy}"


def flags(alpha: float, norm: str, policy: str) -> list[str]:
    return [*BASE, "--domain-alpha", f"{alpha:g}", "--norm", norm, "--norm-policy", policy]


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    seeds, budget = seeds_and_budget(parser, args)
    records: dict[tuple[str, str], list[dict]] = {}
    kmeans: list[dict] = []
    for i, (label, alpha) in enumerate(ALPHAS.items()):  # an interrupted grid has whole alphas
        for seed in seeds:
            for row, (norm, policy) in ROWS.items():
                rec = run_cell(RUNS, cell(alpha, norm, policy), seed, flags(alpha, norm, policy),
                               budget)
                if rec is not None:
                    records.setdefault((label, row), []).append(rec)
        if i == 1:  # after the one-domain-per-client cells it is compared with
            for seed in seeds:
                rec = run_cell(RUNS, cell(0.0, *KMEANS) + "-kmeans", seed,
                               [*flags(0.0, *KMEANS), "--contexts", "kmeans"], budget)
                if rec is not None:
                    kmeans.append({**rec, "context_ari": context_ari(seed)})
    held: dict[str, list[dict]] = {}
    for seed in seeds:
        for row, (norm, policy) in ROWS.items():
            rec = run_holdout(f"digits-holdout-{HOLDOUT}-{norm}-{policy}", seed,
                              [*flags(0.0, norm, policy), "--holdout-domain", HOLDOUT], budget)
            if rec is not None:
                held.setdefault(row, []).append(rec)
    page = RESULTS / "domain_mix.md"
    page.write_text("\n".join([render(records, args.seeds), render_kmeans(kmeans, records),
                               render_holdout(held)]))
    print(f"wrote {page}")


def run_holdout(cell: str, seed: int, shown: list[str], budget: Budget | None
                ) -> dict[str, Any] | None:
    """``common.run_cell``'s contract (read the record if kept, else run unless the budget is
    spent) for a run whose summary's ``holdout`` it keeps (``run_cell`` keeps the trained
    contexts' accuracy only)."""
    path = RUNS / f"{cell}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    if budget is None or budget.exhausted():
        return None
    argv = [*shown, "--seed", str(seed)]
    with tempfile.TemporaryDirectory(prefix="fedctx-bench-") as tmp:
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "fedctx.simulate", *argv, "--backend",
                               "inprocess", "--out", f"{tmp}/run"], cwd=REPO,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cell} seed {seed} failed:\n{proc.stderr[-2000:]}")
        summary = json.loads(Path(f"{tmp}/run/summary.json").read_text())
    record = {"cell": cell, "seed": seed, "command": "python -m fedctx.simulate "
              + shlex.join(argv), "accuracy": summary["accuracy"],
              "accuracy_per_context": summary["accuracy_per_context"],
              "holdout": summary["holdout"], "wall_seconds": time.time() - t0,
              "machine": machine()}
    RUNS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    print(f"{cell} seed {seed}: held out {record['holdout']['accuracy_per_rule']}", flush=True)
    return record


def render_holdout(held: dict[str, list[dict]]) -> str:
    from fedctx.config import UNSEEN_RULES

    lines = [
        f"## Held-out domain: {HOLDOUT}", "",
        f"One domain per client, `--holdout-domain {HOLDOUT}`: no client holds {HOLDOUT}; the "
        "other three domains train (same flags as above). The server evaluates the held-out "
        "test set (300 images) under each rule of `fedctx.federated.unseen`: `bank-mean` (mean "
        "of the server's per-context entries), `batch-stats` (each test batch of 256 "
        "normalized with its own statistics), `nearest` (per batch, the entry whose running "
        "statistics at the first norm layer are nearest in KL). Held-out accuracy (%), mean ± "
        "95% CI over seeds; – : a rule the policy cannot follow (FedBN keeps every norm tensor "
        "on its clients; SiloBN keeps their statistics there). With `batch` norm, FedAvg and "
        "SiloBN train identically (running statistics never enter training; both average the "
        "affine parameters), so their `batch-stats` columns coincide.", "",
        "| norm policy | n | " + " | ".join(f"`{r}`" for r in UNSEEN_RULES)
        + " | trained contexts (overall) |", "|---|---|" + "---|" * (len(UNSEEN_RULES) + 1)]
    for row in ROWS:
        recs = held.get(row, [])
        cells = [mean_ci([r["holdout"]["accuracy_per_rule"][rule] for r in recs
                          if rule in r["holdout"]["accuracy_per_rule"]]).format(100, 1)
                 for rule in UNSEEN_RULES]
        lines.append(f"| {row} | {len(recs)} | " + " | ".join(cells)
                     + f" | {estimate(recs).format(100, 1)} |")
    return "\n".join([*lines, ""])


def context_ari(seed: int) -> float:
    """The adjusted Rand index of the k-means contexts of the run with ``seed`` (the data are
    rebuilt: the partition and the clustering depend on the options and the seed only)."""
    from fedctx.config import SimConfig
    from fedctx.scenarios import get_scenario

    config = SimConfig(clients=10, contexts="kmeans", seed=seed)
    return float(get_scenario("digits").build(config).context_ari)


def render_kmeans(kmeans: list[dict], records: dict[tuple[str, str], list[dict]]) -> str:
    row = next(r for r, v in ROWS.items() if v == KMEANS)
    domain = records.get(("one domain per client", row), [])
    diff = paired_difference(by_seed(kmeans), by_seed(domain))
    lines = [
        "## Discovered contexts", "",
        "The per-context row with one domain per client, its contexts discovered by federated "
        "k-means (`--contexts kmeans`, K = 4; the feature and the algorithm are in "
        "`fedctx.data.contexts`) instead of given by the domains. ARI: adjusted Rand index of "
        "the training images' clusters against their domains (1: the domains recovered "
        "exactly). Accuracy: overall test accuracy (%), each test image evaluated under its "
        "nearest cluster.", "",
        "| contexts | n | ARI | overall | Δ overall vs domain contexts |", "|---|---|---|---|---|",
        f"| domains | {len(domain)} | 1 | {estimate(domain).format(100, 1)} | — |",
        f"| k-means | {len(kmeans)} | "
        + (mean_ci([r["context_ari"] for r in kmeans]).format(1, 2) if kmeans else "–")
        + f" | {estimate(kmeans).format(100, 1)} | {diff.format(100, 1)} |", "",
    ]
    if diff.n:
        lines += ["- " + verdict(diff, "k-means contexts", "domain contexts"), ""]
    return "\n".join(lines)


def render(records: dict[tuple[str, str], list[dict]], seeds: str) -> str:
    done = [r for rs in records.values() for r in rs]
    contexts = list(done[0]["accuracy_per_context"]) if done else []
    total = len(ALPHAS) * len(ROWS) * len(seeds.split(","))
    lines = [
        "# Clients that hold several domains: accuracy vs `--domain-alpha`", "",
        f"Command: `python benchmarks/domain_mix.py --seeds {seeds}`; each run is "
        f"`python -m fedctx.simulate {' '.join(BASE)} --domain-alpha A --norm N --norm-policy P "
        "--seed k --backend inprocess`: the embedded `digits` scenario (4 domains, 1,000 "
        "training images each, all dealt out whatever A), 10 clients, half of them a round, "
        "4 rounds, FedAvg for the shared weights. `--domain-alpha 0` is one domain per client "
        "(round-robin); A > 0 draws each client's mix of domains from Dirichlet(A) "
        "(`fedctx.data.partition.domain_mix_split`): 0.1 mostly one domain, 10 near-equal mixes.",
        f"Budget: 4 rounds (short: accuracies are far from converged; the comparison is at equal "
        f"budget). Runs finished: {len(done)} of {total} (the grid runs alpha by alpha, in the "
        "order of the sections below, and starts no run once `--budget-minutes` is spent; "
        "a cell without runs shows –; `python benchmarks/domain_mix.py` again completes it).",
        f"Machine: {machine()}.",
        "Final test accuracy (%) per context (300 test images each): mean ± 95% CI (t, n−1 dof) "
        "over seeds; Δ: paired difference of the overall accuracy to FedAvg over the same "
        "seeds. FedAvg and per-context are evaluated by the server on every context's test set; "
        "FedBN and SiloBN, as in FedBN, by each client that trained, with its own norm state on "
        "the test set of its main context (its most frequent domain); a context's accuracy is "
        "the mean over those clients, so with mixed clients it covers only the clients whose "
        "main context it is.", "",
    ]
    sentences = []
    for label in ALPHAS:
        lines += [f"## `--domain-alpha` {label}", "",
                  "| norm policy | n | " + " | ".join(contexts) + " | overall | Δ overall vs "
                  "FedAvg |", "|---|---|" + "---|" * (len(contexts) + 2)]
        base = records.get((label, BASELINE), [])
        for row in ROWS:
            recs = records.get((label, row), [])
            if not recs:
                lines.append(f"| {row} | 0 | " + " | ".join("–" for _ in contexts)
                             + " | – | – |")
                continue
            diff = paired_difference(by_seed(recs), by_seed(base))
            per_ctx = [estimate([r for r in recs if c in r["accuracy_per_context"]], c)
                       .format(100, 1) for c in contexts]
            lines.append(f"| {row} | {len(recs)} | " + " | ".join(per_ctx)
                         + f" | **{estimate(recs).format(100, 1)}** | "
                         + ("—" if row == BASELINE else diff.format(100, 1)) + " |")
            if row != BASELINE and diff.n:
                sentences.append(f"- `--domain-alpha` {label}: " + verdict(diff, row, "FedAvg"))
        lines.append("")
    lines += ["## What the intervals support", "", *sentences, ""]
    context_row = next(r for r, v in ROWS.items() if v == KMEANS)
    spread = [f"{label}: " + ", ".join(
        f"seed {r['seed']} {100 * r['accuracy']:.1f}% (loss {r['curve'][-1]['train_loss']:.2f})"
        for r in sorted(recs, key=lambda r: r["seed"]))
        for label in ALPHAS if (recs := records.get((label, context_row)))]
    if spread:
        lines += ["Per-seed overall accuracy of the per-context row (and its last round's mean "
                  "training loss), the spread behind its intervals: " + "; ".join(spread) + ".",
                  ""]
    if done:
        lines += ["Mean seconds per run (measured while other jobs shared the two cores): "
                  f"{sum(r['wall_seconds'] for r in done) / len(done):.0f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
