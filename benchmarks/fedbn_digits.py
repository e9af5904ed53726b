"""FedBN's digits protocol (Li et al. 2021, the paper and the authors' code) on every digits
domain on disk, written to docs/results/fedbn_digits.md.

One client per domain holding 743 training images (FedBN's 10% share), FedBN's CNN (the digits
CNN at ``--width 64``: convs 64, 64, 128 and FC 2048, 512, a norm after each), batch 32, SGD lr
1e-2 without momentum, one local epoch, 100 rounds, every client every round, equal client
weights (equal sizes). Rows: FedAvg, FedProx (mu = 1e-2), FedBN (``local``), SiloBN
(``stats-local``) and the per-context bank, each with ``batch`` and ``context`` norms; seeds
0, 1, 2. Each run is ``python -m fedctx.simulate --scenario digits5 ...`` and is kept in
``docs/results/runs/fedbn_digits/``; finished runs are skipped (resume), and ``--budget-minutes``
stops starting new ones.

    python benchmarks/fedbn_digits.py --data-dir DATA [--seeds 0,1,2] [--budget-minutes 60]
"""

from __future__ import annotations

from pathlib import Path

from common import (
    REPO,
    benchmark_parser,
    by_seed,
    estimate,
    machine,
    plot_curves,
    run_cell,
    seeds_and_budget,
)

from fedctx.report import LAST_FRACTION, flatness, late_change, paired_difference, verdict

RESULTS = REPO / "docs" / "results"
RUNS = RESULTS / "runs" / "fedbn_digits"
ROWS = {  # name: (strategy, norm policy)
    "FedAvg": ("fedavg", "average"),
    "FedProx (mu=1e-2)": ("fedprox", "average"),
    "FedBN (local)": ("fedavg", "local"),
    "SiloBN (stats-local)": ("fedavg", "stats-local"),
    "per-context bank": ("fedavg", "per-context"),
}
NORMS = ("batch", "context")
# With one client per domain and every client every round, the per-context bank's entry k is
# client k's own norm state: the bank computes exactly FedBN's run (bit for bit; pinned by
# tests/test_federation.py::test_per_context_bank_equals_fedbn_with_one_client_per_context), so
# its rows are FedBN's runs, not recomputed.
SAME_RUN = {"per-context bank": "FedBN (local)"}
# Cells in the order they are filled, seeds 0-2 of a group before the next group: the headline
# comparison first.
PRIORITY = (
    (("FedAvg", "batch"), ("FedBN (local)", "batch")),
    (("SiloBN (stats-local)", "batch"), ("FedProx (mu=1e-2)", "batch")),
    (("FedAvg", "context"), ("FedBN (local)", "context")),
    (("SiloBN (stats-local)", "context"), ("FedProx (mu=1e-2)", "context")),
)
DOMAINS = ("mnist", "svhn", "usps", "synthdigits", "mnistm")


def domains_on_disk(data_dir: str) -> list[str]:
    """The digits5 domains whose files the library can read under ``data_dir``."""
    from fedctx.data.sources import MissingDataError, read_cached

    present = []
    for name in DOMAINS:
        try:
            read_cached(name, data_dir, False, False)
            present.append(name)
        except MissingDataError:
            pass
    return present


def flags(strategy: str, policy: str, norm: str, clients: int, rounds: int,
          eval_every: int) -> list[str]:
    return ["--scenario", "digits5", "--allow-missing-domains", "--clients", str(clients),
            "--min-clients", str(clients), "--width", "64", "--rounds", str(rounds),
            "--eval-every", str(eval_every), "--strategy", strategy, "--norm-policy", policy,
            "--norm", norm]


def cell_name(row: str, norm: str, rounds: int) -> str:
    strategy, policy = ROWS[row]
    return f"{strategy}-{policy}-{norm}-r{rounds}"


def _cost_line(records: dict[tuple[str, str], list[dict]], missing: int) -> str:
    walls = [r["wall_seconds"] for group in PRIORITY for c in group for r in records[c]]
    if not walls:
        return "No run has finished yet."
    per_run = sum(walls) / len(walls)
    text = (f"Wall time per run on this machine: {per_run / 60:.0f} min (mean of {len(walls)}; "
            "measured while other jobs shared the two cores).")
    if missing:
        text += (f" {missing} runs are missing: about {missing * per_run / 3600:.1f} h more of "
                 "this machine (one run at a time); rerunning the command resumes.")
    return text


def _convergence(records: dict[tuple[str, str], list[dict]], rounds: int) -> str:
    """Whether every run's mean test accuracy was flat over its last rounds."""
    changes = [(f"{row} / {norm} seed {r['seed']}", c[0])
               for (row, norm), recs in records.items() if row not in SAME_RUN for r in recs
               if (c := late_change(r["curve"], "accuracy", x="round")) is not None]
    return flatness(changes, f"the last {LAST_FRACTION * rounds:.0f} rounds")


def write_page(present: list[str], seeds: list[int], rounds: int, args_line: str,
               records: dict[tuple[str, str], list[dict]]) -> Path:
    page = RESULTS / "fedbn_digits.md"
    done = sum(len(records[c]) for group in PRIORITY for c in group)
    total = sum(len(group) for group in PRIORITY) * len(seeds)
    lines = [
        "# FedBN's digits protocol", "",
        f"Command: `{args_line}` (each cell: `python -m fedctx.simulate "
        f"{' '.join(flags('<strategy>', '<policy>', '<norm>', len(present), rounds, 10))} "
        "--seed <k> --data-dir DATA`).",
        f"Machine: {machine()}.",
        f"Domains (real data, read from disk): {', '.join(present)}; not on this machine: "
        f"{', '.join(d for d in DOMAINS if d not in present) or 'none'} (FedBN used all five).",
        f"Protocol: one client per domain, 743 training images each, FedBN's CNN (width 64), "
        f"batch 32, SGD lr 1e-2, no momentum, 1 local epoch, {rounds} rounds, all clients every "
        "round; test: 2,000 images of each domain's official test split (all of USPS's 2,007 "
        "minus 7). FedBN/SiloBN: each client evaluates with its own norm state. One deviation "
        "from FedBN's code: fedctx's digits CNN is He-initialised (FedBN's uses PyTorch's "
        "default init; see fedctx/models/digits.py for why).",
        "The per-context bank's rows are FedBN's runs: with one client per domain the two compute "
        "the same run, bit for bit (a test pins it).",
        f"Runs finished: {done} of {total}. Cells: mean ± 95% CI (t, n−1 dof) over seeds of "
        "the final test accuracy (%); `n` = seeds finished.", "",
        "| method | norm | n | " + " | ".join(present) + " | mean over domains | Δ vs FedAvg "
        "(same norm, paired) |",
        "|---|---|---|" + "---|" * (len(present) + 2),
    ]
    sentences = []
    for row in ROWS:
        for norm in NORMS:
            recs = records[(row, norm)]
            cells = [estimate(recs, d).format(100, 1) if recs else "–" for d in present]
            overall = estimate(recs).format(100, 1) if recs else "–"
            base = records[("FedAvg", norm)]
            diff = paired_difference(by_seed(recs), by_seed(base))
            delta = "—" if row == "FedAvg" else (diff.format(100, 1) if diff.n else "–")
            lines.append(f"| {row} | `{norm}` | {len(recs)} | " + " | ".join(cells)
                         + f" | {overall} | {delta} |")
            if row != "FedAvg" and diff.n:
                sentences.append(f"- `{norm}`: " + verdict(diff, row, "FedAvg"))
    for row in ROWS:  # the project's question: a context's own norm, same method and seeds
        ctx, bn = (records[(row, norm)] for norm in ("context", "batch"))
        diff = paired_difference(by_seed(ctx), by_seed(bn))
        if row in SAME_RUN or not diff.n:
            continue
        per_domain = [(by_seed(ctx, d), by_seed(bn, d)) for d in present]
        if all(c[k] == b[k] for c, b in per_domain for k in set(c) & set(b)):
            sentences.append(
                f"- {row}: `context` and `batch` end at the same accuracy on every domain in "
                f"each of {diff.n} paired seeds (with one domain per client and a local "
                "norm, each client's `ContextNorm` is its `BatchNorm`).")
        else:
            sentences.append(f"- {row}: " + verdict(diff, "`context`", "`batch`"))
    lines += ["", "The mean over domains is the mean of the per-domain accuracies (the domains' "
              "test sets have equal size). What the intervals support (each method against "
              "FedAvg with the same norm, then `context` against `batch` within each method; "
              "paired by seed):", "", *sentences, "", _convergence(records, rounds), ""]
    curves = RESULTS / "fedbn_digits_curves.png"
    plot_curves({f"{row} / {norm}": records[(row, norm)] for row in ROWS for norm in NORMS},
                curves, f"FedBN digits protocol ({', '.join(present)})")
    lines += [f"![mean test accuracy per round]({curves.name})", "",
              _cost_line(records, total - done), ""]
    lines += [Path(__file__).with_name("fedbn_published.md").read_text()]
    page.write_text("\n".join(lines))
    return page


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="root holding MNIST/, USPS/, mnist_m/")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--norms", default=",".join(NORMS))
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    args = parser.parse_args()
    seeds, budget = seeds_and_budget(parser, args, RUNS)
    norms = args.norms.split(",")
    rows = [r for r in ROWS if not args.rows or r in args.rows.split(",")]
    present = domains_on_disk(args.data_dir)
    if not present:
        raise SystemExit(f"error: no digits domain found under {args.data_dir}")
    records: dict[tuple[str, str], list[dict]] = {(r, n): [] for r in ROWS for n in NORMS}
    for group in PRIORITY:
        for seed in seeds:
            for row, norm in group:
                strategy, policy = ROWS[row]
                selected = row in rows and norm in norms
                rec = run_cell(RUNS, cell_name(row, norm, args.rounds), seed,
                               flags(strategy, policy, norm, len(present), args.rounds, 10),
                               budget if selected else None, data_dir=args.data_dir)
                if rec is not None:
                    records[(row, norm)].append(rec)
    for row, same in SAME_RUN.items():
        for norm in NORMS:
            records[(row, norm)] = records[(same, norm)]
    shown = ",".join(map(str, seeds))
    line = (f"python benchmarks/fedbn_digits.py --data-dir DATA --seeds {shown} "
            f"--rounds {args.rounds}")
    print(f"wrote {write_page(present, seeds, args.rounds, line, records)}")


if __name__ == "__main__":
    main()
