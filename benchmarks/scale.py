"""Scale: many registered clients, a few sampled per round; memory per round must stay flat.

Runs ``python -m fedctx.simulate --clients N --fraction F --rounds R`` and samples, at the end of
every round, the resident memory (RSS) of the driver and of all Ray processes of this run (read
from /proc). Writes ``docs/results/scale.md``.

    python benchmarks/scale.py --clients 1000 --sampled 20 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(root: int) -> list[int]:
    """All processes whose parent chain reaches ``root``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    out, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        frontier += kids
    return out


def ray_workers(pids: list[int]) -> list[int]:
    workers = []
    for p in pids:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "default_worker.py" in cmd or cmd.startswith("ray::"):
            workers.append(p)
    return workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--sampled", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "scale.md")
    args = parser.parse_args()
    run_dir = REPO / "results" / f"bench-scale-{args.clients}"
    cmd = [sys.executable, "-m", "fedctx.simulate", "--clients", str(args.clients),
           "--fraction", str(args.sampled / args.clients), "--min-clients", str(args.sampled),
           "--rounds", str(args.rounds), "--out", str(run_dir), "--overwrite"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
    samples: list[tuple[int, float, float, int]] = []
    metrics = run_dir / "metrics.jsonl"
    seen = 0
    while proc.poll() is None:
        done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if done > seen:
            seen = done
            tree = descendants(proc.pid)
            workers = ray_workers(tree)
            samples.append((done, rss_mb(proc.pid), sum(rss_mb(p) for p in workers),
                            len(workers)))
        time.sleep(0.05)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"simulation failed with exit code {proc.returncode}")
    rounds = [json.loads(x) for x in metrics.read_text().splitlines()]
    per_round = sorted(r["seconds"] for r in rounds[1:])
    median = per_round[len(per_round) // 2]
    first, mid, last = samples[0], samples[len(samples) // 2], samples[-1]
    lines = [
        "# Scale: memory and time per round", "",
        f"Command: `python benchmarks/scale.py --clients {args.clients} --sampled {args.sampled}"
        f" --rounds {args.rounds}` (runs `python -m fedctx.simulate --clients {args.clients} "
        f"--fraction {args.sampled / args.clients:g} --min-clients {args.sampled} --rounds "
        f"{args.rounds}`, scenario `digits`).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU,"
        f" Python {platform.python_version()}. Wall time {wall:.0f} s; median round "
        f"{median:.2f} s.", "",
        f"RSS at the end of round 1: driver {first[1]:.0f} MB, Ray workers {first[2]:.0f} MB "
        f"({first[3]} processes); at the end of round {last[0]}: driver {last[1]:.0f} MB, "
        f"workers {last[2]:.0f} MB. Change: driver {last[1] - first[1]:+.0f} MB, workers "
        f"{last[2] - first[2]:+.0f} MB. Over the second half of the run (round "
        f"{mid[0]} to {last[0]}): driver {last[1] - mid[1]:+.0f} MB, workers "
        f"{last[2] - mid[2]:+.0f} MB.", "",
        "| round | driver RSS MB | Ray workers RSS MB | workers | round s |",
        "|---|---|---|---|---|",
        *(f"| {r} | {d:.0f} | {w:.0f} | {n} | {rounds[r - 1]['seconds']:.2f} |"
          for r, d, w, n in samples),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6]))


if __name__ == "__main__":
    main()
