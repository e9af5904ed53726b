"""Reproduce docs/results/adamatch.md: AdaMatch MNIST -> MNIST-M, norms x seeds on Ray.

    python benchmarks/adamatch_digits.py                # the measured CPU budget
    python benchmarks/adamatch_digits.py --steps 5000 --norms batch,context,uan,acn

It is `python -m fedctx.adapt sweep` with the benchmark's settings as defaults: the paper's
optimizer, batch (64 source + 3 x 64 target), threshold and schedule, but an EMA decay of 0.99
and norm momentum 0.01 (PyTorch convention) because a few hundred steps are far shorter than the
paper's horizon for 0.999. Extra flags are passed on to the sweep (later flags win).
"""

from __future__ import annotations

import sys

from fedctx.adamatch.cli import main

DEFAULTS = [
    "--source", "mnist", "--target", "mnistm", "--norms", "batch,context", "--seeds", "0,1",
    "--steps", "300", "--batch-size", "64", "--uratio", "3", "--ema", "0.99",
    "--norm-momentum", "0.01", "--eval-every", "100", "--cpus-per-job", "1", "--num-cpus", "2",
    "--out", "results/adamatch/bench-mnist-mnistm",
]

if __name__ == "__main__":
    raise SystemExit(main(["sweep", *DEFAULTS, *sys.argv[1:]]))
