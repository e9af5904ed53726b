"""Clients that hold several domains (issue #12 item 5): accuracy per context against
``--domain-alpha`` in {one domain per client, 10, 1, 0.1} for FedAvg, FedBN, SiloBN and
per-context norms on the ``digits`` scenario, seeds 0, 1, 2, written to
docs/results/domain_mix.md (mean ± 95% CI, paired difference to FedAvg).

    python benchmarks/domain_mix.py [--seeds 0,1,2] [--budget-minutes 0] [--page-only]

Each run is ``python -m fedctx.simulate --scenario digits --rounds 4 --clients 10
--domain-alpha A <policy flags> --seed k`` in-process (a short budget: the whole grid, 48 runs,
takes about 40 minutes on 2 cores); finished runs are kept in
``docs/results/runs/domain_mix/`` and skipped, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse

from common import REPO, Budget, by_seed, estimate, machine, run_cell

from fedctx.report import paired_difference, verdict

RESULTS = REPO / "docs" / "results"
RUNS = RESULTS / "runs" / "domain_mix"
BASE = ["--scenario", "digits", "--rounds", "4", "--clients", "10"]
#: ``--domain-alpha`` values, from one domain per client (0) to near-equal mixes (10).
ALPHAS = {"one domain per client": 0.0, "0.1": 0.1, "1": 1.0, "10": 10.0}
#: Row -> (norm, norm policy).
ROWS = {
    "FedAvg (`batch`, `average`)": ("batch", "average"),
    "FedBN (`batch`, `local`)": ("batch", "local"),
    "SiloBN (`batch`, `stats-local`)": ("batch", "stats-local"),
    "per-context (`context`, `per-context`)": ("context", "per-context"),
}
BASELINE = next(iter(ROWS))


def cell(alpha: float, norm: str, policy: str) -> str:
    return f"digits-a{alpha:g}-{norm}-{policy}"


def flags(alpha: float, norm: str, policy: str) -> list[str]:
    return [*BASE, "--domain-alpha", f"{alpha:g}", "--norm", norm, "--norm-policy", policy]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--page-only", action="store_true",
                        help="only rewrite the page from the finished runs")
    parser.add_argument("--budget-minutes", type=float, default=0)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    budget = None if args.page_only else Budget(args.budget_minutes)
    records: dict[tuple[str, str], list[dict]] = {}
    for seed in seeds:  # seed-major: an interrupted grid still has whole seeds
        for label, alpha in ALPHAS.items():
            for row, (norm, policy) in ROWS.items():
                rec = run_cell(RUNS, cell(alpha, norm, policy), seed, flags(alpha, norm, policy),
                               budget)
                if rec is not None:
                    records.setdefault((label, row), []).append(rec)
    page = RESULTS / "domain_mix.md"
    page.write_text(render(records, args.seeds))
    print(f"wrote {page}")


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
        f"budget). Runs finished: {len(done)} of {total}.",
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
    if done:
        lines += ["Mean seconds per run (measured while other jobs shared the two cores): "
                  f"{sum(r['wall_seconds'] for r in done) / len(done):.0f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
