"""GPU sharing: 8 simulated clients sharing one GPU by fractions vs one process doing the same
training, as samples per second. Writes ``docs/results/gpu_sharing.md``. Needs a CUDA GPU.

    python benchmarks/gpu_sharing.py --clients 8 --rounds 5

fedctx side: ``python -m fedctx.simulate --clients 8 --fraction 1.0 --gpus-per-client 0.125``
(Ray places all 8 workers on the one GPU). Reference: the same local training of the 8 clients,
one after another, in one process on the same GPU. Ratio = fedctx samples/s / reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def reference_samples_per_s(clients: int, seed: int) -> float:
    from fedctx.config import SimConfig
    from fedctx.federated.runtime import build_model, load_data
    from fedctx.federated.training import local_train

    config = SimConfig(clients=clients, fraction=1.0, seed=seed).validate()
    data = load_data(config)
    model = build_model(config, data).cuda()
    best = 0.0
    for r in range(1, 4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for pid, client in enumerate(data.clients):
            local_train(model, client, epochs=config.local_epochs, batch_size=config.batch_size,
                        lr=config.lr, momentum=config.momentum, weight_decay=0.0,
                        generator=torch.Generator().manual_seed(seed + r * 1000 + pid),
                        device="cuda")
        torch.cuda.synchronize()
        best = max(best, sum(len(c) for c in data.clients) / (time.perf_counter() - t0))
    return best


def fedctx_samples_per_s(clients: int, rounds: int, seed: int) -> float:
    out = REPO / "results" / f"bench-gpu-{clients}"
    subprocess.run([sys.executable, "-m", "fedctx.simulate", "--clients", str(clients),
                    "--fraction", "1.0", "--rounds", str(rounds), "--seed", str(seed),
                    "--gpus-per-client", str(1 / clients), "--out", str(out), "--overwrite"],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    from fedctx.config import SimConfig
    from fedctx.federated.runtime import load_data
    from fedctx.results import round_durations

    per_round = round_durations([json.loads(x) for x in
                                 (out / "metrics.jsonl").read_text().splitlines()])[1:-1]
    data = load_data(SimConfig(clients=clients, seed=seed).validate())
    return sum(len(c) for c in data.clients) / statistics.median(per_round)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "gpu_sharing.md")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds: at least 3 (round 1 warms up; the last has no next start)")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_sharing: no CUDA GPU here; run it on a machine with one")
    ref = reference_samples_per_s(args.clients, args.seed)
    sim = fedctx_samples_per_s(args.clients, args.rounds, args.seed)
    lines = [
        "# GPU sharing by fractions", "",
        f"Command: `python benchmarks/gpu_sharing.py --clients {args.clients} --rounds "
        f"{args.rounds}`. GPU: {torch.cuda.get_device_name(0)}; CPU cores: {os.cpu_count()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}.", "",
        "| clients on one GPU | fedctx samples/s (median round, rounds 2 to the one before "
        "last, start to next start) | one process "
        "samples/s | ratio |", "|---|---|---|---|",
        f"| {args.clients} | {sim:.0f} | {ref:.0f} | **{sim / ref:.2f}** |",
        "", "fedctx's rounds include the server's evaluation and the framework's messaging; the "
        "reference is local training only.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
