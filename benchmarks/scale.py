"""Scale (#13 item 3): 1,000 vs 10,000 registered clients, 100 sampled per round, on Ray.

For each ``--clients`` N it runs ``python -m fedctx.simulate`` with N clients and ``--fraction
100/N`` and samples, at the end of every round, the resident memory (RSS, from /proc) of the
driver and of the run's Ray worker processes; the start-up trace (``$FEDCTX_STARTUP_TRACE``,
:mod:`fedctx.federated.startup`) gives the registration time (the strategy's first ``query``
message to every client registered). One record per N in ``docs/results/runs/scale/``; the page
``docs/results/scale.md`` is written from the records.

The default scenario holds 4,000 training images (at most 124 clients), so the runs use the
largest data set here, ``cifar10-dirichlet`` (20,000 images; ``--partition iid``): at 10,000
clients a client holds 2 images. Every client trains one local step on its whole share
(``--batch-size`` = images per client: 20 at 1,000 clients, 2 at 10,000) of a small ResNet-20
(``--width 8``; at width 4 its backward pass segfaults in this torch build), so that client
compute differs little between the two N; the page gives that difference, timed here (one SGD
step per batch size), beside the round times. The server
evaluates only after the last round (``--eval-every`` = rounds), which the round-time statistics
leave out (as round 1, the warm-up).

    python benchmarks/scale.py --data-dir DATA                   # 1,000 and 10,000 clients
    python benchmarks/scale.py --clients 1000 --rounds 3 --data-dir DATA   # a short check
    python benchmarks/scale.py --page-only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, machine

from fedctx.federated.startup import STARTUP_TRACE_ENV, read_trace
from fedctx.report import mean_ci
from fedctx.results import atomic_write_text, round_durations

RUNS = REPO / "docs" / "results" / "runs" / "scale"
PAGE = REPO / "docs" / "results" / "scale.md"
TRAIN_IMAGES = 20_000  # CIFAR-10 training images in the data root here (a subset of the 50,000)


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


def flags(clients: int, sampled: int, rounds: int, width: int, images: int) -> list[str]:
    """The simulate flags of one run (see the module docstring for the choices)."""
    return ["--scenario", "cifar10-dirichlet", "--partition", "iid", "--norm-policy",
            "per-context", "--clients", str(clients), "--fraction", f"{sampled / clients:g}",
            "--min-clients", str(sampled), "--rounds", str(rounds), "--eval-every", str(rounds),
            "--batch-size", str(images // clients), "--width", str(width)]


def step_seconds(batch: int, width: int, repeats: int = 20) -> float:
    """The fastest of ``repeats`` SGD steps (forward, backward, update) of the runs' model on a
    ``(batch, 3, 32, 32)`` batch, one thread: the client compute of one sampled client."""
    import torch

    from fedctx.models import make_model

    torch.set_num_threads(1)
    model = make_model("resnet20", norm="batch", num_contexts=1, num_classes=10, width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(clients: int, sampled: int, rounds: int, width: int, images: int, data_dir: str
        ) -> dict[str, Any]:
    """One simulation with ``clients`` registered; its record (per-round RSS and times)."""
    argv = flags(clients, sampled, rounds, width, images)
    with tempfile.TemporaryDirectory(prefix="fedctx-scale-") as tmp:
        out, trace = Path(tmp) / "run", Path(tmp) / "trace.jsonl"
        cmd = [sys.executable, "-m", "fedctx.simulate", *argv, "--out", str(out)]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        load = os.getloadavg()[0]
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, STARTUP_TRACE_ENV: str(trace)})
        samples: list[dict[str, Any]] = []
        metrics = out / "metrics.jsonl"
        while proc.poll() is None:
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if done > len(samples):
                workers = ray_workers(descendants(proc.pid))
                samples.append({"round": done, "driver_mb": rss_mb(proc.pid),
                                "workers_mb": sum(rss_mb(p) for p in workers),
                                "workers": len(workers)})
            time.sleep(0.05)
        wall = time.time() - t0
        if proc.returncode:
            raise SystemExit(f"--clients {clients}: simulation failed (exit {proc.returncode}):"
                             f"\n{proc.stderr.read()[-2000:]}")
        history = [json.loads(x) for x in metrics.read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        marks: dict[str, float] = {}
        for m in read_trace(trace):
            if m["pid"] == proc.pid:
                marks.setdefault(str(m["phase"]), float(m["t"]))
    durations = round_durations(history)  # start to next start: the recording included
    for s in samples:  # a sample read at round r's line: that round's time
        s["seconds"] = durations[s["round"] - 1]
    registered = marks["main"] + summary["startup_seconds"]
    return {
        "clients": clients, "sampled": sampled, "rounds": rounds,
        "command": "python -m fedctx.simulate " + shlex.join(argv)
                   + (" --data-dir DATA" if data_dir else ""),
        "machine": machine(), "load_before": load, "load_after": os.getloadavg()[0],
        "wall_seconds": wall, "startup_seconds": summary["startup_seconds"],
        "engine_to_registration": marks["registration"] - marks["engine"],
        "registration_seconds": registered - marks["registration"],
        "round_seconds": durations,
        "recording_seconds": [r.get("between_seconds") for r in history[1:]],
        "clients_ok": [r["clients_ok"] for r in history],
        "width": width, "batch": images // clients,
        "step_seconds": step_seconds(images // clients, width),
        "worker_slots": os.cpu_count(), "samples": samples,
    }


def at(record: dict[str, Any], r: int) -> dict[str, Any]:
    """The RSS sample of round ``r`` (else the last one before it)."""
    return [s for s in record["samples"] if s["round"] <= r][-1]


def steady(record: dict[str, Any]) -> list[float]:
    """Round times without round 1 (warm-up) and the last round (it evaluates)."""
    return record["round_seconds"][1:-1]


def outside(record: dict[str, Any]) -> float:
    """Wall time not in start-up nor in any round."""
    return (record["wall_seconds"] - record["startup_seconds"]
            - sum(record["round_seconds"]))


def page(records: list[dict[str, Any]], workers: int) -> str:
    """The results page from the records (one per N, smallest first)."""
    rounds = records[0]["rounds"]
    mid = (rounds + 1) // 2
    lines = [
        "# Scale: " + " vs ".join(f"{r['clients']:,}" for r in records)
        + " registered clients", "",
        "Issue #13 item 3 asks: with 10,000 registered clients, 100 sampled per round and 30 "
        "rounds, driver and worker memory flat and the time per round independent of the number "
        f"of registered clients (compared with 1,000). Here: {records[0]['sampled']} sampled per "
        f"round, {rounds} rounds.", "",
        f"Command: `python benchmarks/scale.py --clients "
        f"{','.join(str(r['clients']) for r in records)} --rounds {rounds} --data-dir DATA` "
        "(DATA: the real data sets' root). It runs, one after the other:", "",
        *(f"- `{r['command']}`" for r in records), "",
        f"Machine: {records[0]['machine']}; Ray on this one machine ({workers} client "
        "worker slots: the default cohort mode sends one message per worker slot per round). "
        "1-minute load average at the start and end of each run: "
        + "; ".join(f"{r['clients']:,} clients {r['load_before']:.2f} / {r['load_after']:.2f}"
                    for r in records) + "."
        + (" Other work ran on the machine during these runs (a load above 1.5 on 2 cores): "
           "their round times carry that noise, and the runs compared were not under the same "
           "load." if max(max(r["load_before"], r["load_after"]) for r in records) > 1.5
           else ""), "",
        "Why this scenario: the default `digits` scenario holds 4,000 training images (at most "
        "124 clients); `cifar10-dirichlet` holds 20,000 here, 2 per client at 10,000 clients. "
        "Each client trains one local step on its whole share (`--batch-size` = its number of "
        f"images) of ResNet-20 at `--width {records[0]['width']}`; the one-step compute still "
        "differs with the "
        "batch, so the table gives it (one SGD step timed in the benchmark's process, one "
        f"thread; per round: 100 clients over {workers} workers). The server evaluates after "
        "the last round only; a round's time runs from its start to the next round's start "
        "(its checkpoint and metrics files included); round statistics are over rounds 2 to "
        f"{rounds - 1} (round 1 warms up, round {rounds} evaluates).", "",
        "| registered clients | start-up s (command → all registered) | registration s "
        "(first query → all registered) | engine start → first query s | round s, median "
        "| round s, mean ± 95% CI | client step ms (its batch) | compute per round s | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        est = mean_ci(steady(r))
        lines.append(
            f"| {r['clients']:,} | {r['startup_seconds']:.1f} | {r['registration_seconds']:.1f}"
            f" | {r['engine_to_registration']:.1f} | {statistics.median(steady(r)):.2f} | "
            f"{est.mean:.2f} ± {est.half_width:.2f} | {r['step_seconds'] * 1e3:.1f} "
            f"({r['batch']}) | {r['sampled'] * r['step_seconds'] / workers:.2f} | "
            f"{r['wall_seconds']:.0f} |")
    last = rounds - 1  # the last round without the server's evaluation
    lines += ["", f"| registered clients | driver RSS MB, round 1 / {mid} / {last} / {rounds} | "
              f"Ray workers RSS MB, round 1 / {mid} / {last} / {rounds} | driver change, rounds "
              f"{mid}→{last} | workers change, rounds {mid}→{last} |", "|---|---|---|---|---|"]
    for r in records:
        a, b, c, e = at(r, 1), at(r, mid), at(r, last), at(r, rounds)
        lines.append(
            f"| {r['clients']:,} | {a['driver_mb']:.0f} / {b['driver_mb']:.0f} / "
            f"{c['driver_mb']:.0f} / {e['driver_mb']:.0f} | {a['workers_mb']:.0f} / "
            f"{b['workers_mb']:.0f} / {c['workers_mb']:.0f} / {e['workers_mb']:.0f} "
            f"({c['workers']} processes) | "
            f"{c['driver_mb'] - b['driver_mb']:+.0f} MB "
            f"({(c['driver_mb'] - b['driver_mb']) / b['driver_mb']:+.1%}) | "
            f"{c['workers_mb'] - b['workers_mb']:+.0f} MB "
            f"({(c['workers_mb'] - b['workers_mb']) / b['workers_mb']:+.1%}) |")
    lines += ["", *verdicts(records, workers), ""]
    for r in records:
        lines += [f"## {r['clients']:,} registered clients, per round", "",
                  "| round | driver RSS MB | Ray workers RSS MB | workers | round s |",
                  "|---|---|---|---|---|",
                  *(f"| {s['round']} | {s['driver_mb']:.0f} | {s['workers_mb']:.0f} | "
                    f"{s['workers']} | {s['seconds']:.2f} |" for s in r["samples"]), ""]
    return "\n".join(lines)


def verdicts(records: list[dict[str, Any]], workers: int) -> list[str]:
    """What the numbers say about the two targets (memory flat: under 2% change over the second
    half; time independent of N: median round time, with and without the client compute, at
    most 10% longer at the largest N than at the smallest)."""
    rounds = records[0]["rounds"]
    mid, last = (rounds + 1) // 2, rounds - 1
    out = [f"**Memory.** Flat means here: under 2% change over the second half of the training "
           f"rounds ({mid}→{last}); round {rounds} adds the server's one evaluation of the "
           "10,000 test images (its buffers in the driver), not a growth over rounds."]
    for r in records:
        b, c = at(r, mid), at(r, last)
        growth = max(abs(c[k] - b[k]) / b[k] for k in ("driver_mb", "workers_mb"))
        out.append(f"{r['clients']:,} clients: {'flat' if growth < 0.02 else 'NOT flat'} "
                   f"(largest change over rounds {mid}→{last}: {growth:.1%}).")
    if len(records) < 2:
        return out
    small, large = records[0], records[-1]
    ms, ml = statistics.median(steady(small)), statistics.median(steady(large))
    compute = [r["sampled"] * r["step_seconds"] / workers for r in (small, large)]
    overhead = (ml - compute[1]) / (ms - compute[0])
    holds = ml / ms <= 1.1 and overhead <= 1.1
    out += ["", f"**Time per round.** Median round {ml:.2f} s at {large['clients']:,} registered"
            f" clients vs {ms:.2f} s at {small['clients']:,}: ratio **{ml / ms:.2f}**; without "
            f"the client compute of the table (round − compute per round) **{overhead:.2f}**. "
            + ("Not longer with 10x the registered clients (both ratios at most 1.10)."
               if holds else "Longer with 10x the registered clients (a ratio above 1.10).")
            + ("" if not all(r.get("recording_seconds") for r in (small, large)) else
               " Of a round, its recording (checkpoint, metrics files: the next round's "
               "`between_seconds`), median: " + "; ".join(
                   f"{r['clients']:,} clients {statistics.median(r['recording_seconds']):.3f} s"
                   for r in (small, large)) + "."),
            "", f"**Start-up.** Registration (one `query` message per client, "
            "64 in flight at a time) took "
            f"{large['registration_seconds'] / small['registration_seconds']:.1f}x longer at "
            f"{large['clients']:,} clients than at {small['clients']:,}: it grows with the "
            "number of clients by design (each client says its partition, context, size and "
            "label counts once); the round times above do not include it. Outside start-up "
            "and rounds (wall time − start-up − the sum of round times: the last round's "
            "recording, model saving, teardown): "
            + "; ".join(f"{r['clients']:,} clients {outside(r):.0f} s" for r in records)
            + "."]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1000,10000",
                        help="comma-separated numbers of registered clients")
    parser.add_argument("--sampled", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--data-dir", default="", help="data root (default: $FEDCTX_DATA, else "
                        "fedctx's default)")
    parser.add_argument("--train-images", type=int, default=TRAIN_IMAGES,
                        help="CIFAR-10 training images in the data root (each client's batch "
                        "is its share)")
    parser.add_argument("--page-only", action="store_true",
                        help="only rewrite the page from the records")
    args = parser.parse_args()
    try:
        counts = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--clients: invalid value {args.clients!r}; expected integers like "
                     "1000,10000")
    if not counts or any(not 1 <= c <= args.train_images // 2 for c in counts):
        parser.error(f"--clients: give 1 to {args.train_images // 2} clients per run (each "
                     f"needs 2 of the {args.train_images} training images)")
    if args.rounds < 3:
        parser.error("--rounds: at least 3 (round 1 warms up, the last one evaluates)")
    if not args.page_only:
        for n in counts:
            record = run(n, args.sampled, args.rounds, args.width, args.train_images,
                         args.data_dir)
            RUNS.mkdir(parents=True, exist_ok=True)
            atomic_write_text(RUNS / f"clients-{n}.json", json.dumps(record, indent=1) + "\n")
            print(f"{n} clients: start-up {record['startup_seconds']:.1f} s, registration "
                  f"{record['registration_seconds']:.1f} s, median round "
                  f"{statistics.median(steady(record)):.2f} s", flush=True)
    records = [json.loads((RUNS / f"clients-{n}.json").read_text()) for n in sorted(counts)
               if (RUNS / f"clients-{n}.json").exists()]
    if not records:
        raise SystemExit(f"no records in {RUNS.relative_to(REPO)}; run without --page-only")
    atomic_write_text(PAGE, page(records, records[0]["worker_slots"]) + "\n")
    print(f"wrote {PAGE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
