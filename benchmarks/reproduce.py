"""Regenerate every accuracy table of docs/results/ on this machine, resuming finished runs.

    python benchmarks/reproduce.py --data-dir DATA [--budget-minutes 0]

Runs, in this order, each benchmark with what is left of the budget (0: no limit):

1. ``norm_policies.py``: the four norm policies on the default scenario (README table);
2. ``norm_accuracy.py``: every norm of ``fedctx.norm.available()`` on the default scenario;
3. ``domain_mix.py``: clients holding several domains, per ``--domain-alpha``;
4. ``robustness.py``: one attacking client against each robust strategy;
5. ``fed_adamatch.py``: federated domain adaptation with unlabelled target clients;
6. ``fedbn_digits.py``: FedBN's digits protocol on the domains on disk;
7. ``adamatch_digits.py``: AdaMatch on MNIST→MNIST-M, MNIST→USPS, USPS→MNIST at each pair's
   budget.

The short benchmarks come first, the two long grids last: FedBN's protocol is 24 runs of about
24 minutes each here, the AdaMatch grid 63 runs of 3,000-8,000 steps; each page projects the
time of the runs it still misses.

Every run keeps its record under ``docs/results/runs/``; a rerun skips what exists and each
page is rewritten from all records, so interrupting this command (or reaching the budget) loses
at most the runs in progress. Each page states how many runs it holds and the projected time of
the missing ones on this machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = (  # script, whether it reads --data-dir
    ("norm_policies.py", False),
    ("norm_accuracy.py", False),
    ("domain_mix.py", False),
    ("robustness.py", True),
    ("fed_adamatch.py", True),
    ("fedbn_digits.py", True),
    ("adamatch_digits.py", True),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True,
                        help="root holding the real data sets (MNIST/, USPS/, mnist_m/, ...)")
    parser.add_argument("--budget-minutes", type=float, default=0,
                        help="stop starting new runs after this long (0: no limit)")
    parser.add_argument("--only", default="", help="comma-separated script names to run")
    args = parser.parse_args()
    deadline = time.time() + args.budget_minutes * 60 if args.budget_minutes > 0 else None
    failed = []
    for script, reads_data in STEPS:
        if args.only and script not in args.only.split(","):
            continue
        cmd = [sys.executable, str(HERE / script)]
        if reads_data:
            cmd += ["--data-dir", args.data_dir]
        if deadline is not None:  # a spent budget still rewrites the page from finished runs
            left = (deadline - time.time()) / 60
            cmd += ["--budget-minutes", f"{left:.2f}"] if left > 0 else ["--page-only"]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, cwd=HERE.parent).returncode != 0:
            failed.append(script)
    if failed:
        print(f"error: {', '.join(failed)} failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
