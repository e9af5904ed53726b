"""Forward+backward time of each fedctx norm relative to ``nn.BatchNorm2d`` on the same tensor.

Usage::

    python benchmarks/norm_overhead.py                       # 256x64x32x32, CPU (+ CUDA if any)
    python benchmarks/norm_overhead.py --shape 32 64 16 16   # quick run
    python benchmarks/norm_overhead.py --compile             # also torch.compile'd context/acn/uan
    python benchmarks/norm_overhead.py --layers proxy,adain  # only these norms (and the baseline)

Every layer is timed in the same run, alternating step by step with the BatchNorm baseline
(``--repeats`` pairs per layer); the ratio of the minima (best step of each; robust to other load
on the machine) is reported, with the layer's median time alongside, and the ratio of an earlier
run (``--before``, a run record). Writes a markdown page to ``--out`` (default
``docs/results/norm_overhead.md``) with a profile of the baseline and of every layer that misses
its target, and this run's JSON record beside the other run records.
"""

from __future__ import annotations

import argparse
import json
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
from fedctx.results import atomic_write_text, cpu_name

#: The run record the page compares with by default: the page before the closed-form kernels.
BEFORE = Path("docs/results/runs/norm_overhead/before-2b6cfc2.json")

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
## How each layer is computed (what its cost is made of)

Every count below is a pass over the `(N, C, S)` tensor; `nn.BatchNorm2d`'s native kernel makes
about two in the forward (statistics, output) and two in the backward (gradient sums, input
gradient). The per-layer profiles under "Where the time goes" are from this run.

- `context` (mixed batch), `ghost`, `adain`, `batchgroup`, and `proxy`'s GroupNorm: one grouped
  batch-norm kernel (`fedctx.norm.functional.grouped_batch_norm`): per-sample moments from two
  reductions (`mean`, squared L2 norm), merged per group with no scatter when each sample is its
  own group (`adain`, `proxy`) or there is one group (`batchgroup`); the affine folded into one
  `addcmul` output pass; closed-form backward: `sum`, one `einsum` dot, two `addcmul` passes.
  A single `int` context calls `F.batch_norm` itself.
- `acn`: one `addcmul` pass; backward one multiply pass and two reductions.
- `crossiter`: the same moments, window statistics by the parallel-variance rule on `(C,)`
  vectors, one output pass; closed-form backward as batch norm's (formerly autograd through
  `square`, `maximum`, `mean`: about a dozen passes).
- `proxy`: GroupNorm output `u` (one pass, kept for the backward), the activation and the proxy
  scaling (two passes); backward: the activation's gradient (one pass), then the GroupNorm
  backward with the proxy scale folded in; for ReLU-like activations the proxy-scale gradient
  comes from the GroupNorm's own sums (no extra pass).
- `uan`, `mixture`: `fedctx/norm/_mixkernel.py` (a fused kernel with a closed-form backward).
- Measurement noise: on this shared 2-core machine the BatchNorm step itself ranges over several
  times between runs (allocator/page-fault state, other jobs: compare the BatchNorm row of the
  two tables); each layer is paired step by step with BatchNorm, and ratios still vary by about
  +-15% between runs.
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
        print(f"{device:5s} {label:40s} {rows[-1][1]:9.1f} ms  {rows[-1][3]:6.2f}x", flush=True)
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


def profile_step(device: str, shape: tuple[int, ...], label: str, top: int = 6) -> list[str]:
    """The ops taking most of one forward+backward of ``label`` (torch.profiler, 2 steps)."""
    from torch.profiler import profile

    _, name, options, kind, _ = next(case for case in CASES if case[0] == label)
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    m = make_norm(name, shape[1], dims=len(shape) - 2, **options).to(device)
    contexts = {"none": None, "int": 0, "mixed": torch.arange(shape[0], device=device) % 4}[kind]
    step = make_step(m, x, torch.randn_like(x), contexts)
    step()
    with profile() as prof:
        for _ in range(2):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [f"`{e.key}` {100 * e.self_cpu_time_total / total:.0f}% ({e.count // 2}/step)"
            for e in events[:top]]


def _verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return ""
    if ratio <= target:
        return f"yes ({100 * (target - ratio) / target:.0f}% under)"
    return f"**no** (+{ratio - target:.2f}x, {100 * (ratio - target) / target:.0f}% over)"


def _before(path: Path | None) -> tuple[dict[str, float], list[str]]:
    """Ratios by label and a markdown section of an earlier run record (``--before``)."""
    if path is None or not path.is_file():
        return {}, []
    record = json.loads(path.read_text())
    ratios = {row["label"]: row["ratio"] for row in record["rows"]}
    lines = ["", f"## Before ({record['device']}, from `{path.as_posix()}`)", "",
             f"- source: {record['source']}"]
    lines += [f"- {key}: {record[key]}" for key in ("note", "command", "input", "machine")
              if record.get(key)]
    lines += ["", "| layer | min ms | median ms | ratio to BN |", "|---|---:|---:|---:|"]
    lines += [f"| {r['label']} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | {r['ratio']:.2f} |"
              for r in record["rows"]]
    return ratios, lines


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
    parser.add_argument("--before", type=Path, default=BEFORE,
                        help="an earlier run record whose ratios are shown beside this run's")
    parser.add_argument("--out", default="docs/results/norm_overhead.md")
    parser.add_argument("--record", type=Path, default=None,
                        help="where this run's JSON record goes (default: "
                             "docs/results/runs/norm_overhead/<out's stem>.json)")
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
    command = f"python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}"
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch.get_num_threads()="
               f"{torch.get_num_threads()}, torch {torch.__version__}, Python "
               f"{platform.python_version()}")
    if torch.cuda.is_available():
        machine += f", GPU: {torch.cuda.get_device_name()}"
    setup = (f"{'x'.join(map(str, shape))} float32, fresh `requires_grad` input each step, "
             f"each layer alternates step by step with nn.BatchNorm2d ({args.repeats} pairs "
             f"after {args.warmup} warm-up pairs); ratio = min(layer) / min(BatchNorm2d) of "
             "those pairs")
    lines = ["# Normalization overhead: forward + backward time relative to nn.BatchNorm2d", "",
             f"- command: `{command}`", f"- input: {setup}", f"- machine: {machine}"]
    before, before_lines = _before(args.before)
    record: dict[str, object] = {"command": command, "input": setup, "machine": machine,
                                 "rows": []}
    for device in devices:
        rows = bench(device, shape, args.repeats, args.warmup, args.compile, layers)
        lines += ["", f"## {device}", "",
                  "| layer | min ms | median ms | ratio to BN | before | target | met |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        profiles = []
        for label, ms, med, ratio, target in rows:
            tgt = "" if target is None else f"<= {target:g}x"
            old = f"{before[label]:.2f}" if device == "cpu" and label in before else ""
            lines.append(f"| {label} | {ms:.1f} | {med:.1f} | {ratio:.2f} | {old} | {tgt} | "
                         f"{_verdict(ratio, target)} |")
            record["rows"].append({"device": device, "label": label, "min_ms": ms,
                                   "median_ms": med, "ratio": ratio, "target": target})
            if (target is not None and ratio > target and "[compiled]" not in label) \
                    or label == CASES[0][0]:
                profiles.append((label, profile_step(device, shape, label)))
        lines += ["", f"### Where the time goes ({device}: the baseline and every missed "
                  "target, torch.profiler self time of 2 steps)", ""]
        lines += [f"- {label}: " + ", ".join(ops) for label, ops in profiles]
    lines.append(NOTES)
    lines += before_lines
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    record_path = args.record or Path("docs/results/runs/norm_overhead") / f"{out.stem}.json"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} and {record_path}")


if __name__ == "__main__":
    main()
