"""Forward+backward time of each fedctx norm relative to ``nn.BatchNorm2d`` on the same tensor.

Usage::

    python benchmarks/norm_overhead.py                       # 256x64x32x32, CPU (+ CUDA if any)
    python benchmarks/norm_overhead.py --shape 32 64 16 16   # quick run
    python benchmarks/norm_overhead.py --compile             # also torch.compile'd context/acn/uan
    python benchmarks/norm_overhead.py --layers proxy,adain  # only these norms (and the baseline)

Every layer is timed in the same run, alternating step by step with the BatchNorm baseline
(``--repeats`` pairs per layer); the ratio of the minima (best step of each; robust to other load
on the machine) is reported, with the layer's median time alongside. Writes a markdown table to
``--out`` (default ``docs/results/norm_overhead.md``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fedctx.norm import make_norm, use_context
from fedctx.results import cpu_name

# (label, norm name, options, contexts kind, target ratio or None)
CASES: list[tuple[str, str, dict[str, object], str, float | None]] = [
    ("batch (nn.BatchNorm2d)", "batch", {}, "none", None),
    ("context K=1, int context", "context", {"num_contexts": 1}, "int", 1.05),
    ("context K=4, single int context", "context", {"num_contexts": 4}, "int", 1.05),
    ("context K=4, mixed batch", "context", {"num_contexts": 4}, "mixed", 1.25),
    ("acn K=4, mixed batch", "acn", {"num_contexts": 4}, "mixed", 1.25),
    ("uan K=3", "uan", {"num_components": 3}, "none", 3.0),
    ("uan K=3, moments=learned", "uan", {"num_components": 3, "moments": "learned"}, "none",
     None),
    ("scb K=4, mixed batch", "scb", {"num_contexts": 4}, "mixed", None),
    ("adain K=4, mixed batch", "adain", {"num_contexts": 4}, "mixed", 1.5),
    ("mixture K=2", "mixture", {"num_components": 2}, "none", 5.0),
    ("proxy (GN + ReLU + PN)", "proxy", {}, "none", 2.0),
    ("ghost (virtual batch 32)", "ghost", {}, "none", None),
    ("batchgroup", "batchgroup", {}, "none", None),
    ("crossiter (window 4)", "crossiter", {}, "none", 2.0),
    ("weightstd (GN side)", "weightstd", {}, "none", None),
    ("group", "group", {}, "none", None),
    ("layer", "layer", {}, "none", None),
    ("instance", "instance", {}, "none", None),
]
NOTES = """
## Where the time goes (profiled with torch.profiler on CPU)

- `context`, mixed batch: per-sample moments from two cheap reductions (`mean`, squared L2
  norm), merged per context with `index_add`; one `addcmul` pass out; closed-form backward
  (one `sum`, one `einsum` dot, two `addcmul` passes). Same pass count as native batch norm.
  A single `int` context calls `F.batch_norm` itself. On a 2-core CPU much of every layer's time
  is first-touch page faults of the fresh 64 MiB output/gradient buffers, common to all layers.
- `uan` misses the 2x target. Its default training branch (`moments="batch"`, the authors'
  Mixture-Normalization-style training) evaluates every activation against K=3 Gaussians and
  then takes responsibility-weighted batch moments E_k, V_k, all on a `(N, K, C, S)` tensor (3x
  the input) and through autograd: a profile of forward+backward (torch.profiler, 128x64x16x16)
  shows 35 `aten::mul` calls on that tensor taking 59% of the time, then `neg`, `copy_`, `sum`,
  `div`. A closed-form backward (as `context` has) and a fused kernel (one read of `x`, K exps
  in registers) are what 2x needs; neither is written yet. `torch.compile` (inductor, CPU) cuts
  it by about 5x. The `moments="learned"` option (no batch statistics, closed-form backward) is
  the row below it: about 6 forward and 15 backward passes over `(N, K, C, S)`, where native
  batch norm makes ~5 over `(N, C, S)`.
- `mixture` runs 3 EM iterations per batch on up to 16k values per channel plus posteriors
  over the whole `(N, K, C, S)` tensor; `proxy` and `crossiter` add a GroupNorm/activation or
  extra `E[x^2]` passes that native kernels fuse; `adain` pays `instance_norm` plus a gathered
  per-sample affine pass.
- Measurement noise: on this shared 2-core machine the BatchNorm step itself ranges from about
  30 to 90 ms between runs (allocator/page-fault state, other jobs), so each layer is paired
  step by step with BatchNorm; ratios still vary by roughly +-15% between runs (e.g. the
  `context` K=4 mixed batch measured 1.05x-1.14x, single int context 0.93x-1.14x, on 30-pair
  runs 1.14x and 1.00x).
"""
COMPILED = {"context K=4, mixed batch", "acn K=4, mixed batch", "uan K=3"}


def make_step(
    module: nn.Module, x: torch.Tensor, grad: torch.Tensor, contexts: object
) -> Callable[[], None]:
    def step() -> None:
        xi = x.detach().requires_grad_()
        with use_context(module, contexts):
            y = module(xi)
        y.backward(grad)
        module.zero_grad(set_to_none=True)

    return step


def bench(device: str, shape: tuple[int, ...], repeats: int, warmup: int, compile_: bool,
          layers: set[str] | None = None):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    grad = torch.randn_like(x)
    n, c = shape[:2]
    steps: dict[str, Callable[[], None]] = {}
    targets: dict[str, float | None] = {}
    for label, name, options, kind, target in CASES:
        if layers and label != CASES[0][0] and name not in layers:
            continue
        m = make_norm(name, c, dims=len(shape) - 2, **options).to(device)
        contexts = {"none": None, "int": 0, "mixed": torch.arange(n, device=device) % 4}[kind]
        steps[label] = make_step(m, x, grad, contexts)
        targets[label] = target
        if compile_ and label in COMPILED:
            cm = torch.compile(m)
            steps[label + " [compiled]"] = _compiled_step(m, cm, x, grad, contexts)
            targets[label + " [compiled]"] = target
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    base_label = CASES[0][0]

    def timed(step: Callable[[], None]) -> float:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    rows = []
    for label, step in steps.items():
        for _ in range(warmup):
            step()
            steps[base_label]()
        t_layer, t_base = [], []
        for _ in range(repeats):  # paired with the baseline: robust to load drifting
            t_base.append(timed(steps[base_label]))
            t_layer.append(timed(step))
        rows.append((label, min(t_layer) * 1e3, statistics.median(t_layer) * 1e3,
                     min(t_layer) / min(t_base), targets[label]))
    return rows


def _compiled_step(module: nn.Module, compiled: Callable[..., torch.Tensor], x: torch.Tensor,
                   grad: torch.Tensor, contexts: object) -> Callable[[], None]:
    def step() -> None:
        xi = x.detach().requires_grad_()
        with use_context(module, contexts):
            y = compiled(xi)
        y.backward(grad)
        module.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[256, 64, 32, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--devices", nargs="+", default=None)
    parser.add_argument("--layers", default=None,
                        help="comma-separated norm names to time (default: all); the "
                             "nn.BatchNorm2d baseline is always timed")
    parser.add_argument("--out", default="docs/results/norm_overhead.md")
    args = parser.parse_args(argv)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    shape = tuple(args.shape)
    layers = None
    if args.layers:
        layers = {name.strip() for name in args.layers.split(",") if name.strip()}
        known = {case[1] for case in CASES}
        if layers - known:
            parser.error(f"unknown layer(s) {sorted(layers - known)}; valid choices: "
                         f"{', '.join(sorted(known))}")
    lines = [
        "# Normalization overhead: forward + backward time relative to nn.BatchNorm2d",
        "",
        f"- command: `python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`",
        f"- input: {'x'.join(map(str, shape))} float32, fresh `requires_grad` input each step, "
        f"each layer alternates step by step with nn.BatchNorm2d ({args.repeats} pairs after "
        f"{args.warmup} warm-up pairs); ratio = min(layer) / min(BatchNorm2d) of those pairs",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch.get_num_threads()="
        f"{torch.get_num_threads()}, torch {torch.__version__}, Python "
        f"{platform.python_version()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    for device in devices:
        rows = bench(device, shape, args.repeats, args.warmup, args.compile, layers)
        lines += ["", f"## {device}", "",
                  "| layer | min ms | median ms | ratio to BN | target | met |",
                  "|---|---:|---:|---:|---:|---|"]
        for label, ms, med, ratio, target in rows:
            met = "" if target is None else ("yes" if ratio <= target else "**no**")
            tgt = "" if target is None else f"<= {target:g}x"
            lines.append(f"| {label} | {ms:.1f} | {med:.1f} | {ratio:.2f} | {tgt} | {met} |")
            print(f"{device:5s} {label:40s} {ms:9.1f} ms  {ratio:6.2f}x  {tgt}", flush=True)
    lines.append(NOTES)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
