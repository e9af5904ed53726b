"""Clients that hold several domains (issue #12 item 5): accuracy per context against
``--domain-alpha`` in {one domain per client, 10, 1, 0.1} for FedAvg, FedBN, SiloBN and
per-context norms on the ``digits`` scenario, seeds 0, 1, 2, written to
docs/results/domain_mix.md (mean ± 95% CI, paired difference to FedAvg); and the same
per-context runs with contexts discovered by k-means (issue #12 item 4), and the held-out-domain
table (MNIST-M held out, every rule of ``fedctx.federated.unseen`` per policy; item 2); and why
``context`` trains badly on mixed batches: one model trained centrally (no federation, no
subprocess) with fixed per-context compositions of each mini-batch.

    python benchmarks/domain_mix.py [--seeds 0,1,2] [--budget-minutes 0] [--page-only]

Each run is ``python -m fedctx.simulate --scenario digits --rounds 4 --clients 10
--eval-every 4 --domain-alpha A <policy flags> --seed k`` in-process (a short budget: the whole
grid, 48 runs, takes about 40 minutes on 2 idle cores; the 27 central sub-batch runs about 12 s
each, one thread, on a loaded machine); finished runs are kept in
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
#: The per-context row under the paper's rule for few-sample contexts (``ContextNorm``'s
#: ``min_batch_values=2``, fedctx's default before 8; docs/norms.md), on mixed clients only:
#: with one domain per client every batch holds one context and the two rules coincide.
PAPER_RULE_ROW = "per-context, the paper's rule (`--norm-options min_batch_values=2`)"
PAPER_RULE_FLAGS = ["--norm-options", "min_batch_values=2"]
#: The held-out-domain table (issue #12 item 2): one domain per client, MNIST-M held out.
HOLDOUT = "mnistm"
#: Discovered contexts (issue #12 item 4): the per-context row, one domain per client, with
#: contexts from federated k-means (K = 4) instead of the domains.
KMEANS = ("context", "per-context")
#: The sub-batch experiment: the pooled digits training images, each mini-batch of 32 split over
#: the contexts in a fixed composition (which context gets which share is drawn per batch);
#: ``(32,)``: one context a batch.
SUB_BATCHES = ((32,), (8, 8, 8, 8), (20, 4, 4, 4), (23, 3, 3, 3), (26, 2, 2, 2))
#: SGD steps per sub-batch run (lr, momentum: ``fedctx.simulate``'s defaults).
SUB_BATCH_STEPS = 300
#: Row -> (norm, layer options, compositions).
SUB_BATCH_ROWS: dict[str, tuple[str, dict[str, int], tuple[tuple[int, ...], ...]]] = {
    "`batch` (control)": ("batch", {}, ((8, 8, 8, 8),)),
    "`context`, `min_batch_values=2` (the paper's rule)": ("context", {"min_batch_values": 2},
                                                           SUB_BATCHES),
    "`context`, `min_batch_values=8` (fedctx's default)": ("context", {"min_batch_values": 8},
                                                           SUB_BATCHES[2:]),
}


def cell(alpha: float, norm: str, policy: str) -> str:
    return f"digits-a{alpha:g}-{norm}-{policy}"


def flags(alpha: float, norm: str, policy: str) -> list[str]:
    return [*BASE, "--domain-alpha", f"{alpha:g}", "--norm", norm, "--norm-policy", policy]


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    seeds, budget = seeds_and_budget(parser, args, RUNS)
    records: dict[tuple[str, str], list[dict]] = {}
    kmeans: list[dict] = []
    for i, (label, alpha) in enumerate(ALPHAS.items()):  # an interrupted grid has whole alphas
        for seed in seeds:
            for row, (norm, policy) in ROWS.items():
                rec = run_cell(RUNS, cell(alpha, norm, policy), seed, flags(alpha, norm, policy),
                               budget)
                if rec is not None:
                    records.setdefault((label, row), []).append(rec)
            if alpha > 0:
                rec = run_cell(RUNS, cell(alpha, *KMEANS) + "-minbatchvalues2", seed,
                               [*flags(alpha, *KMEANS), *PAPER_RULE_FLAGS], budget)
                if rec is not None:
                    records.setdefault((label, PAPER_RULE_ROW), []).append(rec)
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
    sub: dict[tuple[str, tuple[int, ...]], list[dict]] = {}
    for seed in seeds:
        for row, (norm, options, comps) in SUB_BATCH_ROWS.items():
            for comp in comps:
                rec = run_sub_batches(norm, options, comp, seed, budget)
                if rec is not None:
                    sub.setdefault((row, comp), []).append(rec)
    page = RESULTS / "domain_mix.md"
    page.write_text("\n".join([render(records, ",".join(map(str, seeds))), render_sub_batches(sub),
                               render_kmeans(kmeans, records), render_holdout(held)]))
    print(f"wrote {page}")


def run_holdout(cell: str, seed: int, shown: list[str], budget: Budget | None
                ) -> dict[str, Any] | None:
    """``common.run_cell``'s contract (read the record if kept, else run unless the budget is
    spent) for a run whose summary's ``holdout`` it keeps (``run_cell`` keeps the trained
    contexts' accuracy only)."""
    path = RUNS / f"{cell}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    if budget is None or not budget.allows(seed):
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


def run_sub_batches(norm: str, options: dict[str, int], comp: tuple[int, ...], seed: int,
                    budget: Budget | None) -> dict[str, Any] | None:
    """One sub-batch run (``run_cell``'s contract: the kept record, else run unless the budget is
    spent): ``DigitsCNN(norm, **options)`` trained for :data:`SUB_BATCH_STEPS` SGD steps on
    mini-batches of composition ``comp`` from the pooled training images of the ``digits``
    scenario (seed ``seed``). Records the train-mode loss (mean of the last 50 steps), the 99th
    percentile and maximum of the gradient norm over the steps, the growth of the first conv's
    weight norm, and the test accuracy (mean over contexts, each under its own context)."""
    import torch
    import torch.nn.functional as F

    from fedctx.config import SimConfig
    from fedctx.federated.training import evaluate
    from fedctx.models.digits import DigitsCNN
    from fedctx.norm import use_context
    from fedctx.optim import SGD
    from fedctx.scenarios import get_scenario

    tag = "".join(f"-{k.replace('_', '')}{v}" for k, v in options.items())
    path = RUNS / f"subbatch-{norm}{tag}-{'-'.join(map(str, comp))}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    if budget is None or not budget.allows(seed):
        return None
    torch.set_num_threads(1)  # as a simulated client (``--cpus-per-client 1``)
    t0 = time.time()
    config = SimConfig(clients=10, seed=seed)
    data = get_scenario("digits").build(config)
    x = torch.cat([c.x for c in data.clients])
    y = torch.cat([c.y for c in data.clients])
    contexts = torch.cat([c.contexts for c in data.clients])
    pools = [torch.nonzero(contexts == k).squeeze(1) for k in range(data.num_contexts)]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsCNN(data.num_classes, norm=norm, num_contexts=data.num_contexts, **options)
    optimizer = SGD(model, lr=config.lr, momentum=config.momentum, weight_decay=0.0)
    conv1 = model.features[0].weight
    start_norm = float(conv1.norm())
    losses, grad_norms = [], []
    model.train()
    for _ in range(SUB_BATCH_STEPS):
        owners = torch.randperm(data.num_contexts, generator=gen)[:len(comp)]
        idx = torch.cat([pools[k][torch.randint(len(pools[k]), (n,), generator=gen)]
                         for k, n in zip(owners.tolist(), comp, strict=True)])
        with use_context(model, contexts[idx]):
            loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        grad_norms.append(float(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))))
        optimizer.step()
        losses.append(float(loss.detach()))
    accuracy = sum(evaluate(model, *data.test[k], k)[0] for k in data.test) / len(data.test)
    grads = torch.tensor(grad_norms)
    record = {
        "cell": path.stem.rsplit("-seed", 1)[0], "seed": seed, "norm": norm, "options": options,
        "composition": list(comp), "steps": SUB_BATCH_STEPS,
        "train_loss": sum(losses[-50:]) / 50, "grad_norm_p99": float(grads.quantile(0.99)),
        "grad_norm_max": float(grads.max()), "conv1_growth": float(conv1.norm()) / start_norm,
        "accuracy": accuracy, "wall_seconds": time.time() - t0, "machine": machine(),
    }
    RUNS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    print(f"{record['cell']} seed {seed}: loss {record['train_loss']:.2f}, accuracy "
          f"{accuracy:.4f}", flush=True)
    return record


def render_sub_batches(sub: dict[tuple[str, tuple[int, ...]], list[dict]]) -> str:
    """The sub-batch table and what it shows (``docs/norms.md`` cites it)."""
    def cell(recs: list[dict], key: str, scale: float, digits: int) -> str:
        return mean_ci([r[key] for r in recs]).format(scale, digits) if recs else "–"

    def per_seed(recs: list[dict], key: str) -> str:  # heavy-tailed: each seed's value
        return " / ".join(f"{r[key]:.3g}" for r in sorted(recs, key=lambda r: r["seed"])) or "–"

    lines = [
        "## Why `context` trains badly on mixed batches", "",
        "Under the paper's rule (`min_batch_values=2`, the rows so named above) the "
        "per-context rows train badly whenever clients hold several domains (their last-round "
        "training loss is higher than FedAvg's, not only their test accuracy lower), while with "
        "one domain per client they match FedAvg. The layer is not at fault: on "
        "mixed batches its outputs, input gradients and running statistics equal those of one "
        "`nn.BatchNorm` per context fed only that context's samples (`tests/test_norm_context.py`,"
        " `tests/test_domain_mix.py`). The cause is the size of the per-context sub-batches. "
        "A client's batch of 32 holds only a few samples of its rarer contexts, and the two "
        "fully connected layers of the digits CNN have no spatial positions, so their "
        "statistics for such a context are over those few values per channel. With 2 values "
        "the normalized pair is (+1, −1) per channel whatever the inputs (only a sign is "
        "left) and the input gradient vanishes except on channels where the two values "
        "nearly coincide, where the variance is near ε and the gradient is multiplied by up to "
        "1/√ε (`tests/test_context_mixed.py`); with 3 values the spikes are smaller, with 4 "
        "they are mostly gone (table below). "
        "Those gradient spikes grow the weights (conv1 growth below), and both the training "
        "loss and the test accuracy suffer. The norms after the convolutions are not "
        "concerned: there each sample brings 28×28, 14×14 or 7×7 values per channel.", "",
        f"Measured without federation: `python benchmarks/domain_mix.py` also trains the digits "
        f"CNN centrally for {SUB_BATCH_STEPS} SGD steps (lr 0.05, momentum 0.9) on the pooled "
        "training images of the `digits` scenario, each mini-batch of 32 split over the "
        "contexts in a fixed composition (which context gets which share is drawn per batch; "
        "(32): one context a batch). Train loss: train mode, mean of the last 50 steps. "
        "Gradient norm: over all parameters, per step, 99th percentile and maximum over the "
        "steps. Conv1 growth: final / initial norm of the first conv's weight. These three are "
        "heavy-tailed and given per seed (seeds in order); train loss and accuracy (test "
        "accuracy, %, mean over the 4 contexts, each under its own context) as mean ± 95% CI "
        "over seeds.", "",
        "| norm | per-context sub-batches | n | train loss | gradient norm p99 | gradient "
        "norm max | conv1 growth | accuracy |", "|---|---|---|---|---|---|---|---|",
    ]
    for row, (_, _, comps) in SUB_BATCH_ROWS.items():
        for comp in comps:
            recs = sub.get((row, comp), [])
            lines.append(
                f"| {row} | {', '.join(map(str, comp))} | {len(recs)} | "
                f"{cell(recs, 'train_loss', 1, 2)} | {per_seed(recs, 'grad_norm_p99')} | "
                f"{per_seed(recs, 'grad_norm_max')} | {per_seed(recs, 'conv1_growth')} | "
                f"{cell(recs, 'accuracy', 100, 1)} |")
    lines += [
        "",
        "`min_batch_values=8` (`ContextNorm`'s default since this measurement; "
        "`--norm-options min_batch_values=2` in `fedctx.simulate` restores the paper's rule) "
        "normalizes a context with fewer than 8 values per channel in the batch by its running "
        "statistics instead, and leaves those statistics unchanged; at the convolutions every "
        "context present has at least 49 values, so only the fully connected layers change. "
        "The federated tables above are of the default (8), except where a row says otherwise.",
        "",
    ]
    return "\n".join(lines)


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
    mixed = sum(alpha > 0 for alpha in ALPHAS.values())
    total = (len(ALPHAS) * len(ROWS) + mixed) * len(seeds.split(","))
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
        for row in [*ROWS, PAPER_RULE_ROW]:
            recs = records.get((label, row), [])
            if not recs and row == PAPER_RULE_ROW:
                continue
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
