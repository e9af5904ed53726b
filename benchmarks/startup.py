"""Start-up of ``python -m fedctx.simulate --clients 20`` (Ray): from the command to every client
registered, and where the time goes.

Each run is the real command (``--rounds 1``, a fresh ``--out``) with ``$FEDCTX_STARTUP_TRACE``
set: the driver and every client worker append their phase timestamps
(:mod:`fedctx.federated.startup`), read here with the run's ``startup_seconds`` (summary.json:
registration finished, from the command's start in ``fedctx.simulate``). ``--code LABEL=DIR``
(repeatable) runs the code checked out in ``DIR`` (e.g. an older commit, ``git archive``) under
``LABEL``; runs of the versions alternate, so that a change in the machine's load hits them
alike. Code without the marks gives the totals only. Each run's record is kept in
``results/startup/`` (a later invocation skips it); writes ``docs/results/startup.md``.

    python benchmarks/startup.py --runs 3 --code before=/tmp/fedctx-44c334f --code after=.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine  # noqa: E402

from fedctx.federated.engine import WORKER_PRELOAD  # noqa: E402
from fedctx.federated.startup import STARTUP_TRACE_ENV, read_trace  # noqa: E402
from fedctx.results import atomic_write_text  # noqa: E402

TARGET_S = 8.0  # issue #13 item 2
RUNS_DIR = REPO / "results" / "startup"
PAGE = REPO / "docs" / "results" / "startup.md"

#: (row, start, end): the phases of a run, each from one mark to another. A mark is a driver
#: mark, ``launch`` (the benchmark started the process), ``registered`` (summary.json), or a
#: worker mark: ``first:``/``last:`` the earliest/latest of the client workers' marks.
PHASES = [
    ("interpreter, `import fedctx.simulate`, flags parsed", "launch", "main"),
    ("options resolved, driver imports (torch, Flower, fedctx's apps)", "main", "imports"),
    ("driver data + model build", "runtime-build", "runtime-built"),
    ("driver ready for the engine (data, model, strategy; and Ray up where it starts beside)",
     "main", "driver-ready"),
    ("Ray start (`import ray`, `ray.init`, driver's main thread)", "ray-init", "ray-ready"),
    ("Flower engine called", "launch", "engine"),
    ("workers: process start -> torch and fedctx imported", "first:process",
     "last:runtime-imported"),
    ("workers: process start -> first message (runtime build starts)", "first:process",
     "last:runtime-build"),
    ("workers: data + model build (each)", "first:runtime-build", "last:runtime-built"),
    ("registration: last worker ready -> every client registered (query round)",
     "last:runtime-built", "registered"),
    ("**command -> every client registered**", "launch", "registered"),
]


def one_run(label: str, code: Path, index: int, clients: int) -> dict:
    """Run the command once with ``code``; its record (times in seconds from launch)."""
    path = RUNS_DIR / f"{label}-run{index}.json"
    if path.exists():
        return json.loads(path.read_text())
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    out = RUNS_DIR / f"{label}-run{index}"
    trace = RUNS_DIR / f"{label}-run{index}.trace.jsonl"
    trace.unlink(missing_ok=True)
    flags = ["--clients", str(clients), "--rounds", "1", "--out", str(out), "--overwrite"]
    env = {**os.environ, STARTUP_TRACE_ENV: str(trace), "PYTHONPATH": str(code)}
    load = os.getloadavg()[0]
    launch = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "fedctx.simulate", *flags], cwd=code, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    cpu_series = []  # (seconds from launch, CPU seconds of the run's processes so far)
    per_pid: dict[int, float] = {}
    while proc.poll() is None:
        per_pid.update(group_cpu(proc.pid))
        cpu_series.append((time.time() - launch, sum(per_pid.values())))
        time.sleep(SAMPLE_S)
    err = proc.stderr.read()
    wall = time.time() - launch
    if proc.returncode != 0:
        raise RuntimeError(f"{label} run {index} failed:\n{err[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    marks = read_trace(trace) if trace.exists() else []
    record = {"label": label, "code": str(code), "run": index, "load_1min": load,
              "wall_seconds": wall, "startup_seconds": summary["startup_seconds"],
              "accuracy": summary["accuracy"],
              "command": "python -m fedctx.simulate " + shlex.join(flags[:4]),
              "times": phase_times(marks, proc.pid, launch, summary["startup_seconds"]),
              "machine": machine()}
    if "registered" in record["times"]:
        at = record["times"]["registered"]
        record["cpu_to_registered"] = max((c for t, c in cpu_series if t <= at), default=0.0)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return record


SAMPLE_S = 0.2  # how often the run's processes' CPU time is read
TICK = os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of each live process of process group ``pgid`` (the
    command, Ray's processes and workers: they stay in the command's group)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            found[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / TICK
    return found


#: name -> (what, Python code run alone): the CPU cost of each piece of start-up work, in a
#: fresh process.
PIECES = {
    "torch": ("`import torch`", "import torch"),
    "worker": ("a client worker's imports: `" + ", ".join(WORKER_PRELOAD) + "` (torch, Flower, "
               "fedctx; what it preloads)", "import " + ", ".join(WORKER_PRELOAD)),
    "driver": ("the driver's imports: `fedctx.simulate`, `fedctx.federated.server`, Flower's "
               "simulation engine",
               "import fedctx.simulate, fedctx.federated.server, flwr.simulation.run_simulation"),
    "ray": ("Ray's processes after `ray.init(num_cpus=2)` (GCS, raylet, dashboard, agents, "
            "monitors, 2 idle workers; not the driver)",
            "import logging, time, ray; ray.init(num_cpus=2, include_dashboard=False, "
            "logging_level=logging.ERROR); time.sleep(5)"),
}


def piece_costs(repeats: int = 3) -> dict[str, float]:
    """CPU seconds of each of :data:`PIECES`, by name (the least of ``repeats`` runs; for Ray,
    the CPU of every process of the group but the one that called ``ray.init``). Kept in
    ``pieces.json`` and read from it while it holds the same pieces."""
    path = RUNS_DIR / "pieces.json"
    if path.exists() and set(kept := json.loads(path.read_text())) == set(PIECES):
        return kept
    costs = {}
    for name, (_, code) in PIECES.items():
        best = float("inf")
        for _ in range(repeats):
            proc = subprocess.Popen([sys.executable, "-W", "ignore", "-c", code], cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            per_pid: dict[int, float] = {}
            while proc.poll() is None:
                per_pid.update(group_cpu(proc.pid))
                time.sleep(SAMPLE_S)
            own = per_pid.pop(proc.pid, 0.0)
            best = min(best, sum(per_pid.values()) if "ray.init" in code else own)
        costs[name] = best
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(costs, indent=1) + "\n")
    return costs


def phase_times(marks: list[dict], driver: int, launch: float, startup: float
                ) -> dict[str, float]:
    """Each mark's time from launch: the driver's by name, the workers' as ``first:``/``last:``
    over the worker processes (``registered``: the command's start + ``startup_seconds``)."""
    times: dict[str, float] = {"launch": 0.0}
    workers: dict[str, list[float]] = {}
    for m in marks:
        t = float(m["t"]) - launch
        if m["pid"] == driver:
            times.setdefault(str(m["phase"]), t)
        else:
            workers.setdefault(str(m["phase"]), []).append(t)
    for phase, ts in workers.items():
        times[f"first:{phase}"], times[f"last:{phase}"] = min(ts), max(ts)
    if "main" in times:
        times["registered"] = times["main"] + startup
    return times


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def page(records: dict[str, list[dict]], argv: list[str], costs: dict[str, float],
         notes: list[str]) -> str:
    """The results page from every label's run records, the pieces' CPU costs and ``notes``."""
    all_runs = [r for rs in records.values() for r in rs]
    loads = ", ".join(f"{r['load_1min']:.2f}" for r in all_runs)
    lines = ["# Start-up: command to every client registered", "",
             f"Command: `python benchmarks/startup.py {shlex.join(argv)}`, each run "
             f"`{all_runs[0]['command']}` (Ray backend, scenario `digits`) with a fresh `--out`; "
             "runs of the versions alternate.",
             f"Machine: {all_runs[0]['machine']}. 1-minute load average before each run: "
             f"{loads}.", "", *(f"- {note}" for note in notes), *([""] if notes else []),
             "`startup_seconds` is the figure each run records in `summary.json` (from the "
             "command's start in `fedctx.simulate` to the last client's `query` reply); "
             "\"command\" adds the interpreter's start and `import fedctx.simulate`. "
             f"Target (issue #13 item 2): ≤ {TARGET_S:.0f} s.", "",
             "How the current version starts (fedctx/simulate.py, fedctx/federated/engine.py, "
             "fedctx/federated/actor.py): once the flags are parsed, the main thread starts the "
             "local Ray instance (on the command line, when the flags and `--config` file ask for "
             "one) while a second thread resolves the options (this imports torch), imports "
             "Flower and fedctx's apps and builds the driver's data, model and strategy. A flag "
             "whose value alone is wrong (type, bounds, fixed choices) ends the command before "
             "Ray starts (`check_flags`, well under a millisecond); any other bad option is "
             "reported by that thread at once, and the command ends as soon as Ray's start "
             "returns, Ray's processes killed. Ray's workers get the driver's `sys.path` by "
             "inheriting `PYTHONPATH` rather than as a job runtime env, so the two workers the "
             "raylet starts with Ray become the client actors, and they import fedctx's "
             "ClientApp and fedctx's client actor class as they start (Ray's "
             "`preload_python_modules`), not on their first message. The actor class is "
             "fedctx's own (Flower's contract, `run` and `terminate`): Flower's lives in "
             "`flwr.simulation`, whose import brings in Flower's SuperLink (SQLAlchemy, Alembic, "
             "FastAPI) in every worker. `fedctx.norm` no longer imports `torch._dynamo`. "
             "Metrics are unchanged (same round-1 accuracy below).", "",
             "CPU seconds: used by every process of the run (the command, Ray's processes, the "
             "client workers) from launch to registration, read from `/proc` every "
             f"{SAMPLE_S} s; divided by the {os.cpu_count()} cores it is the least wall time "
             "that work can take here, however well it overlaps.", "",
             "| version | runs | startup_seconds (median, min–max) | command → registered "
             "(median) | CPU s to registered (median) | CPU s ÷ cores | round-1 accuracy | "
             "target |", "|---|---|---|---|---|---|---|---|"]
    cores = os.cpu_count() or 1
    for label, rs in records.items():
        su = [r["startup_seconds"] for r in rs]
        full = [r["times"]["registered"] for r in rs if "registered" in r["times"]]
        cpu = median([r["cpu_to_registered"] for r in rs if "cpu_to_registered" in r])
        acc = sorted({f"{r['accuracy']:.4f}" for r in rs})
        m = median(su)
        verdict = ("met" if m <= TARGET_S else f"missed by {m - TARGET_S:.1f} s")
        lines.append(f"| {label} | {len(rs)} | **{m:.2f}** ({min(su):.2f}–{max(su):.2f}) | "
                     f"{fmt(median(full))} | {fmt(cpu)} | "
                     f"{fmt(None if cpu is None else cpu / cores)} | {', '.join(acc)} | "
                     f"{verdict} |")
    lines += ["", "Phases, seconds from the command's launch (median over runs; phases "
              "overlap where processes run side by side; — : that version has no such mark):",
              "", "| phase | " + " | ".join(f"{label} start → end (duration)"
                                            for label in records) + " |",
              "|---|" + "---|" * len(records)]
    for row, start, end in PHASES:
        cells = []
        for rs in records.values():
            s = median([r["times"][start] for r in rs if start in r["times"]])
            e = median([r["times"][end] for r in rs if end in r["times"]])
            d = median([r["times"][end] - r["times"][start] for r in rs
                        if start in r["times"] and end in r["times"]])
            cells.append("—" if s is None or e is None else f"{s:.2f} → {e:.2f} ({d:.2f})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if costs:
        lines += ["", "## What bounds it", "",
                  "CPU seconds of the pieces of start-up work, each alone in a fresh process "
                  "(least of 3; the last sample before the process ends, so slightly low):", "",
                  "| piece | CPU s |", "|---|---|",
                  *(f"| {PIECES[name][0]} | {cpu:.2f} |" for name, cpu in costs.items()), ""]
        need = costs["driver"] + 2 * costs["worker"] + costs["ray"]
        bound = need / cores
        lines.append(
            f"Before every client is registered, the driver's imports, two workers' imports and "
            f"Ray's processes take about {need:.1f} CPU s measured apart (the CPU column above "
            f"measures the runs themselves, to registration): about {bound:.1f} s of wall time on "
            f"{cores} cores before any data is built, with every piece overlapped and the "
            "machine otherwise idle. " + (
                f"The {TARGET_S:.0f} s target is below that: overlapping alone cannot meet it "
                "here; the work itself must shrink." if bound >= TARGET_S else
                f"The {TARGET_S:.0f} s target is above that: better overlap could still meet it."))
    lines += ["", "Per run (startup_seconds, load):", ""]
    for label, rs in records.items():
        lines.append(f"- {label}: " + "; ".join(
            f"{r['startup_seconds']:.2f} s (load {r['load_1min']:.2f})" for r in rs))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per version")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--code", action="append", default=[], metavar="LABEL=DIR",
                        help="a version to run: its label and checkout (default: this=.)")
    parser.add_argument("--page-only", action="store_true",
                        help="only rewrite the page from the kept run records")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT",
                        help="a line for the page, e.g. how a --code folder was made")
    parser.add_argument("--out", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    codes: dict[str, Path] = {}
    for item in args.code or ["this=."]:
        label, sep, folder = item.partition("=")
        if not sep or not label or not (Path(folder) / "fedctx" / "simulate.py").is_file():
            parser.error(f"--code {item!r}: expected LABEL=DIR, DIR a fedctx checkout")
        codes[label] = Path(folder).resolve()
    records: dict[str, list[dict]] = {label: [] for label in codes}
    for index in range(args.runs):
        for label, code in codes.items():
            path = RUNS_DIR / f"{label}-run{index}.json"
            if args.page_only and not path.exists():
                continue
            record = one_run(label, code, index, args.clients)
            records[label].append(record)
            print(f"{label} run {index}: startup {record['startup_seconds']:.2f} s, "
                  f"load {record['load_1min']:.2f}", flush=True)
    if not any(records.values()):
        parser.error("no run records to write a page from")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    costs = piece_costs() if not args.page_only or (RUNS_DIR / "pieces.json").exists() else {}
    # the command that measured the records (notes are the page's text, shown on it)
    shown = [a for i, a in enumerate(argv) if a not in ("--page-only", "--note")
             and (i == 0 or argv[i - 1] != "--note")]
    atomic_write_text(args.out, page({k: v for k, v in records.items() if v}, shown, costs,
                                     args.note))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
