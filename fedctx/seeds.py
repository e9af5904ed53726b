"""``python -m fedctx.simulate --seeds 0,1,2 ...``: one experiment, once per seed, compared as
researchers compare runs: final test accuracy, mean ± 95% confidence interval (Student's t,
:func:`fedctx.report.mean_ci`) per context and overall, and per round.

Each seed is a normal run of ``python -m fedctx.simulate`` (a child process) in
``OUT/seed-<s>``, with its own checkpoint: ``--resume`` continues the seeds that did not finish
(and starts those that never began), ``--overwrite`` replaces them. What each child printed is
in ``OUT/seed-<s>.log``. Then ``OUT/seeds.json`` and ``OUT/seeds.md`` hold the comparison,
which is printed too; ``python -m fedctx.report OUT`` reads the same runs.

Concurrency. Unless ``--backend`` or ``--ray-address`` is given, the seeds run as concurrent
child processes with ``--backend inprocess`` (same seed, same metrics as on Ray), as many at a
time as the cores hold clients (``cores // --cpus-per-client``; cores = ``--num-cpus``, else
this machine's). Measured on this project's 2-core machine, shared with other jobs (load
average about 10, so wall times are loose), for 3 seeds of the default experiment with
``--rounds 2``: ``--seeds 0,1,2 --rounds 2`` (in-process children, 2 at a time) took 117 s,
``--seeds 0,1,2 --rounds 2 --backend ray`` (Ray runs one after another) 164 s, with identical
accuracies per seed; by hand, three Ray runs in sequence took 335 s, three in-process runs at
once 177 s and one after another 162 s. Each Ray run spends most of its time starting Ray,
and a second Ray instance beside the first only competes for the same cores, so with
``--backend ray`` (or ``--ray-address``) the seeds run one after another, each with every
core (or the cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedctx.config import ConfigError, SimConfig, flag_of, load_config_file

SEEDS_FILES = ("seeds.json", "seeds.md")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; :class:`ConfigError` (one line) for anything else."""
    meta = SimConfig.__dataclass_fields__["seed"].metadata
    low, high = meta["min"], meta["lt"] - 1
    problem = f"--seeds: invalid value {text!r}; expected distinct comma-separated seeds in " \
              f"[{low}, {high}], e.g. 0,1,2"
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(problem) from None
    if not seeds or len(set(seeds)) < len(seeds) or not all(low <= s <= high for s in seeds):
        raise ConfigError(problem)
    return seeds


def seeds_out(config: SimConfig, seeds: list[int]) -> Path:
    """The default folder: the first seed's run folder name, ``seed<k>`` -> ``seeds<k_l_m>``."""
    from fedctx.federated.run_config import default_out

    first = default_out(config)
    return Path(first.replace(f"-seed{config.seed}-", f"-seeds{'_'.join(map(str, seeds))}-", 1))


def check_seeds_out(out: Path, resume: bool, overwrite: bool) -> None:
    """One-line :class:`ConfigError` for an ``--out`` that cannot hold this seed set."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if resume and not any(n.startswith("seed-") for n in names):
        raise ConfigError(f"--resume: no seed runs in {out}; run without --resume first")
    if names and not (resume or overwrite):
        raise ConfigError(f"--out {out} holds files ({', '.join(names[:3])}"
                          f"{', ...' if len(names) > 3 else ''}); give a new --out, --resume to "
                          "continue these seeds, or --overwrite to replace their results")


def child_argv(args: argparse.Namespace, seed: int, out: Path, backend: str | None) -> list[str]:
    """The command line of one seed's run: every option given, with its ``--seed`` and
    ``--out``. With ``--resume``, a seed with a checkpoint resumes and one without starts again
    (``--overwrite``: what a run stopped before its first round left is replaced)."""
    from fedctx.results import CHECKPOINT, PREVIOUS_CHECKPOINT

    argv = ["--config", str(args.config)] if args.config else []
    for f in fields(SimConfig):
        value = getattr(args, f.name)
        if f.name in ("seed", "out", "resume", "overwrite") or value is None:
            continue
        argv += [flag_of(f.name)] if value is True else [flag_of(f.name), value]
    if backend:
        argv += ["--backend", backend]
    argv += ["--seed", str(seed), "--out", str(out)]
    if args.resume and any((out / n).exists() for n in (CHECKPOINT, PREVIOUS_CHECKPOINT)):
        return [*argv, "--resume"]
    return [*argv, "--overwrite"] if args.overwrite or (args.resume and out.exists()) else argv


def plan(args: argparse.Namespace, config: SimConfig) -> tuple[str | None, int]:
    """The children's backend (``inprocess`` unless the user chose one) and how many run at
    once (see the module's docstring for the measurement behind it)."""
    runtime = ("backend", "ray_address")
    file_values = load_config_file(args.config) if args.config else {}
    if any(getattr(args, k) is not None or k in file_values for k in runtime):
        return None, 1
    cores = config.num_cpus or os.cpu_count() or 1
    return "inprocess", max(1, int(cores // config.cpus_per_client))


def run_children(commands: dict[int, list[str]], out: Path, jobs: int) -> dict[int, int]:
    """Run every seed's command, ``jobs`` at a time, output to ``OUT/seed-<s>.log``; print a
    line as each ends; the exit status of each seed."""
    waiting, running, status = list(commands), {}, {}
    started: dict[int, float] = {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                seed = waiting.pop(0)
                with (out / f"seed-{seed}.log").open("w") as log:
                    running[seed] = subprocess.Popen(
                        [sys.executable, "-m", "fedctx.simulate", *commands[seed]],
                        stdout=log, stderr=subprocess.STDOUT)
                started[seed] = time.time()
            time.sleep(0.2)
            for seed, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[seed]
                status[seed] = proc.returncode
                what = "finished" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"seed {seed}: {what} in {time.time() - started[seed]:.0f}s "
                      f"({out / f'seed-{seed}.log'})", flush=True)
    finally:
        for proc in running.values():  # Ctrl-C or an error: no child outlives the driver
            proc.terminate()
            proc.wait()
    return status


def last_error(log: Path) -> str:
    """The child's one-line ``error:`` message (the last one in its log), else ``""``."""
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.startswith("error:")]
    return lines[-1].removeprefix("error: ") if lines else ""


def comparison(runs: dict[int, Any]) -> dict[str, Any]:
    """``seeds.json``'s numbers: final accuracy per context and overall, mean ± 95% CI."""
    from fedctx.report import mean_ci

    def interval(values: dict[int, float]) -> dict[str, Any]:
        est = mean_ci(list(values.values()))
        return {"mean": est.mean, "half_width": est.half_width, "n": est.n,
                "values": {str(s): v for s, v in values.items()}}

    contexts = list(dict.fromkeys(c for r in runs.values()
                                  for c in r.summary["accuracy_per_context"]))
    return {
        "rounds": sorted({r.summary.get("rounds") for r in runs.values()}),
        "accuracy": interval({s: r.summary["accuracy"] for s, r in runs.items()}),
        "accuracy_per_context": {
            c: interval({s: r.summary["accuracy_per_context"][c] for s, r in runs.items()
                         if c in r.summary["accuracy_per_context"]}) for c in contexts},
    }


def final_table(numbers: dict[str, Any]) -> str:
    """Markdown: one row per context and overall, mean ± 95% CI (%) and each seed's value."""
    from fedctx.report import Estimate
    from fedctx.results import format_table

    seeds = list(numbers["accuracy"]["values"])
    rows = []
    for name, cell in [*numbers["accuracy_per_context"].items(), ("overall", numbers["accuracy"])]:
        est = Estimate(cell["mean"], cell["half_width"], cell["n"])
        rows.append((name, est.format(100, 1),
                     *(f"{100 * cell['values'][s]:.1f}" if s in cell["values"] else "–"
                       for s in seeds)))
    return format_table(rows, ("context", "mean ± 95% CI", *(f"seed {s}" for s in seeds)))


def write_comparison(out: Path, seeds: list[int], runs: dict[int, Any], failed: dict[int, int],
                     command: str) -> str:
    """Write ``seeds.json`` and ``seeds.md``; return the text to print."""
    from fedctx.report import round_table
    from fedctx.results import atomic_write_text

    numbers = comparison(runs)
    rounds = "/".join(map(str, numbers["rounds"]))
    atomic_write_text(out / "seeds.json", json.dumps(
        {"command": command, "seeds": seeds, "finished": list(runs),
         "failed": {str(s): rc for s, rc in failed.items()},
         "runs": {str(s): f"seed-{s}" for s in runs}, **numbers}, indent=2) + "\n")
    text = (f"Final test accuracy (%) after round {rounds}, mean ± 95% CI (Student's t) over "
            f"{len(runs)} seeds:\n\n{final_table(numbers)}\n\nTest accuracy (%) per round, "
            f"mean ± 95% CI over the seeds:\n\n{round_table(list(runs.values()))}\n")
    missing = f"\nSeeds that failed (left out): {', '.join(map(str, failed))}.\n" if failed else ""
    atomic_write_text(out / "seeds.md", f"# Seeds {', '.join(map(str, runs))}\n\n`{command}`\n\n"
                      f"{text}{missing}\nEach seed's run: `seed-<s>/`; compare with other runs: "
                      f"`python -m fedctx.report {out}`.\n")
    return text + missing


def run_seeds(args: argparse.Namespace, argv: list[str]) -> int:
    """The ``--seeds`` driver: check, run every seed, compare; the exit status (0; 1 when a
    seed's run failed; 2 bad input, also when every seed reported bad input)."""
    from fedctx.report import Run
    from fedctx.simulate import config_from_args

    seeds = parse_seeds(args.seeds)
    if args.seed is not None:
        raise ConfigError(f"--seed {args.seed} and --seeds {args.seeds}: --seeds runs each of "
                          "its seeds; give one of them")
    first = argparse.Namespace(**{**vars(args), "seed": str(seeds[0]), "resume": None,
                                  "overwrite": None, "out": None})
    config = config_from_args(first)  # every option checked once, before any run starts
    out = Path(args.out) if args.out else seeds_out(config, seeds)
    check_seeds_out(out, bool(args.resume), bool(args.overwrite))
    backend, jobs = plan(args, config)
    out.mkdir(parents=True, exist_ok=True)
    for name in SEEDS_FILES:
        (out / name).unlink(missing_ok=True)  # written again from the runs below
    commands = {s: child_argv(args, s, out / f"seed-{s}", backend) for s in seeds}
    command = "python -m fedctx.simulate " + shlex.join(argv)
    print(f"fedctx: seeds {', '.join(map(str, seeds))} of one experiment in {out}/seed-<s> "
          f"({jobs} at a time{', backend inprocess' if backend else ''})", flush=True)
    status = run_children(commands, out, min(jobs, len(seeds)))
    failed = {s: rc for s, rc in status.items() if rc != 0}
    if failed and all(rc == 2 for rc in failed.values()) and len(failed) == len(seeds):
        print(f"error: {last_error(out / f'seed-{seeds[0]}.log') or 'bad input'}",
              file=sys.stderr)
        return 2
    runs = {s: Run.load(out / f"seed-{s}") for s in seeds if s not in failed}
    if runs:
        print("\n" + write_comparison(out, seeds, runs, failed, command), end="", flush=True)
        print(f"Results in {out}/ (seeds.json, seeds.md, seed-<s>/)")
    if failed:
        reasons = "; ".join(f"seed {s}: {last_error(out / f'seed-{s}.log') or f'exit {rc}'}"
                            for s, rc in failed.items())
        print(f"error: {len(failed)} of {len(seeds)} seeds failed ({reasons}); their output is "
              f"in {out}/seed-<s>.log; --resume --out {out} continues them", file=sys.stderr)
        return 1
    return 0
