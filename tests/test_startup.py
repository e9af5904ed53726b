"""Start-up (#13 item 2): the phase trace of ``$FEDCTX_STARTUP_TRACE`` and the early Ray start
of ``python -m fedctx.simulate`` (a run that cannot start shuts Ray down again)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_interrupts import _group_alive

from fedctx.federated import startup

REPO = Path(__file__).resolve().parent.parent


def test_marks_are_written_once_per_phase_only_when_tracing(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setattr(startup, "_MARKED", {})
    monkeypatch.delenv(startup.STARTUP_TRACE_ENV, raising=False)
    startup.mark("a")
    assert not trace.exists()
    monkeypatch.setenv(startup.STARTUP_TRACE_ENV, str(trace))
    before = time.time()
    startup.mark("b")
    startup.mark("b")
    startup.mark("c", 12.5)
    startup.mark_process()
    marks = startup.read_trace(trace)
    assert [m["phase"] for m in marks] == ["b", "c", "process"]
    assert {m["pid"] for m in marks} == {os.getpid()}
    assert before <= marks[0]["t"] <= time.time() and marks[1]["t"] == 12.5
    # this process started before the test did, and not long before (a pytest run)
    assert before - 3600 < marks[2]["t"] < before
    # every phase is kept in memory, traced or not, once, in the order reached
    assert list(startup.phases(12.0)) == ["a", "b", "c", "process"]
    assert startup.phases(12.0)["c"] == 0.5


@pytest.mark.slow
def test_a_run_that_cannot_start_stops_the_ray_it_started(tmp_path: Path) -> None:
    """The data are missing: found while Ray is starting beside; one line, exit 2, and nothing
    the command started outlives it."""
    proc = subprocess.Popen([sys.executable, "-m", "fedctx.simulate", "--scenario", "mnist-usps",
                             "--data-dir", str(tmp_path / "none"), "--clients", "2", "--out",
                             str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 2, err[-2000:]
    assert err.strip().startswith("error: ") and "\n" not in err.strip(), err[-2000:]
    deadline = time.time() + 15
    while time.time() < deadline and _group_alive(proc.pid):
        time.sleep(0.2)
    assert not _group_alive(proc.pid), "processes of the run outlive it"

