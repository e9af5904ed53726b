"""Where a run's start-up time goes: phase timestamps from every process of the run.

With ``$FEDCTX_STARTUP_TRACE`` naming a file, the driver (``python -m fedctx.simulate``) and
each simulated-client worker append one JSON line per phase they reach: ``{"phase", "pid",
"t"}`` (``t``: wall-clock seconds, :func:`time.time`, comparable across the processes of one
machine). ``benchmarks/startup.py`` sets it and turns the lines into the breakdown of
``docs/results/startup.md``. Unset (the default), :func:`mark` only keeps the time in memory
(:func:`phases`). Standard library only, so that marking costs no import.
"""

from __future__ import annotations

import json
import os
import sys
import time

STARTUP_TRACE_ENV = "FEDCTX_STARTUP_TRACE"
_MARKED: dict[str, float] = {}  # this process's phases: wall-clock time first reached


def mark(phase: str, t: float | None = None) -> None:
    """Record that this process reached ``phase`` at ``t`` (default: now): kept for
    :func:`phases` and, when tracing, appended to the trace file.

    A phase is recorded once per process (the first time). One ``O_APPEND`` write of a short
    line: lines of concurrent processes do not interleave. A trace file that cannot be written
    turns tracing off in this process (and the processes it starts) with one line on stderr:
    a diagnostic never stops a run.
    """
    if phase in _MARKED:
        return
    _MARKED[phase] = time.time() if t is None else t
    path = os.environ.get(STARTUP_TRACE_ENV)
    if path:
        line = json.dumps({"phase": phase, "pid": os.getpid(), "t": _MARKED[phase]})
        try:
            with open(path, "a") as trace:
                trace.write(line + "\n")
        except OSError as err:
            os.environ.pop(STARTUP_TRACE_ENV, None)
            print(f"fedctx: warning: ${STARTUP_TRACE_ENV} {path}: {err.strerror or err}; "
                  "start-up tracing is off", file=sys.stderr)


def phases(since: float) -> dict[str, float]:
    """This process's phases so far, in seconds after ``since`` (e.g. the command's start), in
    the order they were marked: in the driver of ``python -m fedctx.simulate`` on a local Ray,
    ``main``, ``ray-init``, ``runtime-imported``, ``imports``, ``runtime-build``,
    ``runtime-built``, ``ray-ready``, ``driver-ready``, ``engine``, and ``ray-stopped`` where
    that Ray was stopped again (the resolved options ask for another, or the run cannot start);
    the client workers' phases are in the trace only."""
    return {phase: round(t - since, 3) for phase, t in _MARKED.items()}


def mark_process() -> None:
    """Record, when tracing, the time this process was created (``phase`` ``"process"``; from
    Linux's ``/proc``: its start after boot, in clock ticks, against the uptime; nothing
    elsewhere)."""
    if not os.environ.get(STARTUP_TRACE_ENV):
        return
    try:
        now = time.time()
        with open("/proc/uptime") as uptime:
            up = float(uptime.read().split()[0])
        with open(f"/proc/{os.getpid()}/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return
    mark("process", now - up + ticks / os.sysconf("SC_CLK_TCK"))


def read_trace(path: str | os.PathLike[str]) -> list[dict[str, float | int | str]]:
    """The marks written to ``path``, in file order."""
    with open(path) as trace:
        return [json.loads(line) for line in trace if line.strip()]
