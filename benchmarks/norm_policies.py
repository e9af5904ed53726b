"""The four norm policies on the default ``digits`` scenario (same budget, seeds 0, 1, 2), written
to docs/results/norm_policies.md with mean ± 95% CI per context and the paired difference of each
policy to FedAvg's ``average``.

    python benchmarks/norm_policies.py [--seeds 0,1,2] [--budget-minutes 0]

Each run is ``python -m fedctx.simulate --clients 20 --norm-policy <policy> --seed <k>`` (the
quick start's command, in-process) and is kept in ``docs/results/runs/norm_policies/``; finished
runs are skipped.
"""

from __future__ import annotations

from common import (
    REPO,
    benchmark_parser,
    by_seed,
    estimate,
    machine,
    run_cell,
    seeds_and_budget,
)

from fedctx.report import paired_difference, verdict

RESULTS = REPO / "docs" / "results"
RUNS = RESULTS / "runs" / "norm_policies"
POLICIES = ("average", "local", "stats-local", "per-context")
LABELS = {"average": "`average` (FedAvg)", "local": "`local` (FedBN)",
          "stats-local": "`stats-local` (SiloBN)", "per-context": "`per-context` (bank)"}


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    seeds, budget = seeds_and_budget(parser, args, RUNS)
    records: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for seed in seeds:
        for policy in POLICIES:
            rec = run_cell(RUNS, f"digits-context-{policy}", seed,
                           ["--clients", "20", "--norm-policy", policy], budget)
            if rec is not None:
                records[policy].append(rec)
    contexts = list(next(r for rs in records.values() for r in rs)["accuracy_per_context"])
    lines = [
        "# Norm policies on the digits scenario", "",
        f"Command: `python benchmarks/norm_policies.py --seeds {','.join(map(str, seeds))}`; "
        "each run is "
        "`python -m fedctx.simulate --clients 20 --norm-policy <policy> --seed <k> --backend "
        "inprocess` (the default scenario: 20 clients, 4 real-image digit domains, one domain per "
        "client, 8 rounds, half the clients a round, `context` norm, FedAvg for the shared "
        "weights; identical metrics on Ray).",
        f"Machine: {machine()}.",
        "Final test accuracy (%) per context (300 test images each): mean ± 95% CI (t, n−1 dof) "
        "over seeds; Δ: the paired difference to `average` over the same seeds. `local` and "
        "`stats-local` are evaluated as in FedBN: every client that trained evaluates with its "
        "own norm state; a context's accuracy is the mean over its clients.", "",
        "| norm policy | n | " + " | ".join(contexts) + " | overall | Δ overall vs `average` |",
        "|---|---|" + "---|" * (len(contexts) + 2),
    ]
    sentences = []
    for policy in POLICIES:
        recs = records[policy]
        diff = paired_difference(by_seed(recs), by_seed(records["average"]))
        lines.append(
            f"| {LABELS[policy]} | {len(recs)} | "
            + " | ".join(estimate(recs, c).format(100, 1) for c in contexts)
            + f" | **{estimate(recs).format(100, 1)}** | "
            + ("—" if policy == "average" else diff.format(100, 1)) + " |")
        if policy != "average":
            sentences.append("- " + verdict(diff, f"`{policy}`", "`average`"))
    bank_vs_fedbn = paired_difference(by_seed(records["per-context"]), by_seed(records["local"]))
    sentences.append("- " + verdict(bank_vs_fedbn, "`per-context`", "`local` (FedBN)"))
    spread = [max(r["accuracy"] for r in records[p]) - min(r["accuracy"] for r in records[p])
              for p in POLICIES if records[p]]
    lines += ["", "What the intervals support:", "", *sentences, "",
              f"Between seeds the overall accuracy of one policy varies by up to "
              f"{max(spread) * 100:.1f} points (largest max − min over seeds). With the same seed, "
              "a run reproduces its metrics exactly on this machine (tests/test_simulate_cli.py); "
              "other machines and torch builds may differ in the last float bits.", "",
              "Seconds per run (measured while other jobs shared the two cores): " + ", ".join(
                  f"{p} {sum(r['wall_seconds'] for r in records[p]) / len(records[p]):.0f}"
                  for p in POLICIES if records[p]) + ".", ""]
    page = RESULTS / "norm_policies.md"
    page.write_text("\n".join(lines))
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
