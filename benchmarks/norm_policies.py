"""Final per-context accuracy of the four norm policies on the digits scenario (same seed and
budget), written to docs/results/norm_policies.md.

    python benchmarks/norm_policies.py [--rounds 8] [--seed 0] [--backend ray]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POLICIES = ("average", "local", "stats-local", "per-context")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="ray", choices=("ray", "inprocess"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "norm_policies.md")
    args = parser.parse_args()
    rows, contexts = [], None
    for policy in POLICIES:
        out = REPO / "results" / f"bench-policy-{policy}"
        cmd = [sys.executable, "-m", "fedctx.simulate", "--clients", str(args.clients),
               "--rounds", str(args.rounds), "--seed", str(args.seed), "--norm-policy", policy,
               "--backend", args.backend, "--out", str(out)]
        t0 = time.time()
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((out / "summary.json").read_text())
        contexts = list(summary["accuracy_per_context"])
        rows.append((policy, summary, time.time() - t0))
        print(f"{policy}: {summary['accuracy']:.4f}", flush=True)
    header = "| norm policy | " + " | ".join(contexts) + " | overall | wall s |"
    lines = [
        "# Norm policies on the digits scenario", "",
        f"Command: `python benchmarks/norm_policies.py --rounds {args.rounds} --clients "
        f"{args.clients} --seed {args.seed} --backend {args.backend}` (each row is "
        f"`python -m fedctx.simulate --clients {args.clients} --rounds {args.rounds} --seed "
        f"{args.seed} --norm-policy <policy>`; norm `context`, strategy FedAvg).",
        f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}"
        f", {__import__('os').cpu_count()} cores. Final test accuracy per context (300 test "
        "images each).", "",
        header, "|" + "---|" * (len(contexts) + 3),
    ]
    for policy, s, wall in rows:
        accs = " | ".join(f"{s['accuracy_per_context'][c]:.3f}" for c in contexts)
        lines.append(f"| {policy} | {accs} | **{s['accuracy']:.3f}** | {wall:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
