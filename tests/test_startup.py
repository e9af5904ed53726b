"""Start-up (#13 item 2): the phase trace of ``$FEDCTX_STARTUP_TRACE`` and the early Ray start
of ``python -m fedctx.simulate`` (a run that cannot start shuts Ray down again)."""

from __future__ import annotations

import json
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


def test_a_trace_file_that_cannot_be_written_turns_tracing_off_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    monkeypatch.setattr(startup, "_MARKED", {})
    monkeypatch.setenv(startup.STARTUP_TRACE_ENV, str(tmp_path / "missing" / "trace.jsonl"))
    startup.mark("a")
    startup.mark("b")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "start-up tracing is off" in err and "missing" in err
    assert startup.STARTUP_TRACE_ENV not in os.environ
    assert list(startup.phases(0.0)) == ["a", "b"]


def _traced_command(argv: list[str], trace: Path, timeout: float
                    ) -> tuple[int, str, str, list[str]]:
    """Run ``argv`` from the repository with the start-up trace in ``trace``, in a session of its
    own: (exit status, stdout, stderr, the traced phases), once nothing it started is alive."""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, startup.STARTUP_TRACE_ENV: str(trace)})
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    deadline = time.time() + 15
    while time.time() < deadline and _group_alive(proc.pid):
        time.sleep(0.2)
    assert not _group_alive(proc.pid), "processes of the run outlive it"
    return proc.returncode, out, err, [str(m["phase"]) for m in startup.read_trace(trace)]


@pytest.mark.slow
def test_resuming_an_in_process_run_from_the_command_line_stops_the_early_ray(
        tmp_path: Path) -> None:
    """The command line starts Ray before the options are resolved; when they resolve to
    another backend (here ``--resume`` of an in-process run), that Ray is stopped and the run
    goes on as its options say."""
    out = tmp_path / "run"
    base = [sys.executable, "-m", "fedctx.simulate", "--out", str(out)]
    subprocess.run([*base, "--backend", "inprocess", "--clients", "4", "--rounds", "1"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    status, stdout, err, phases = _traced_command([*base, "--resume", "--rounds", "2"],
                                                  tmp_path / "trace.jsonl", 300)
    assert status == 0, err[-2000:]
    # Ray started early, was stopped before the driver went on, and the run went on in-process
    assert phases.index("ray-init") < phases.index("ray-stopped") < phases.index("driver-ready")
    assert "Starting Ray" not in stdout
    assert [json.loads(line)["round"] for line in
            (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["missing data", "bad option"])
def test_a_run_that_cannot_start_stops_the_ray_it_started(tmp_path: Path, problem: str) -> None:
    """Found while Ray is starting beside (the data when they are loaded; a bad option while
    the options are resolved, Ray started before them on the command line): one line, exit 2,
    and nothing the command started outlives it."""
    bad = (["--data-dir", str(tmp_path / "none")] if problem == "missing data"
           else ["--norm-options", "nope=1"])
    status, _, err, phases = _traced_command(
        [sys.executable, "-m", "fedctx.simulate", "--scenario", "mnist-usps", *bad,
         "--clients", "2", "--out", str(tmp_path / "run")], tmp_path / "trace.jsonl", 120)
    assert status == 2, err[-2000:]
    assert err.strip().startswith("error: ") and "\n" not in err.strip(), err[-2000:]
    assert "ray-init" in phases



@pytest.mark.parametrize("bad", [["--clients", "zero"], ["--fraction", "1.5"], ["--lr", "inf"]])
def test_a_bad_flag_value_is_told_before_ray_starts(tmp_path: Path, bad: list[str]) -> None:
    """What a flag alone can tell (type, bounds, fixed choices) ends the command line before
    Ray is started beside the options (it took 15-19 s on a loaded machine to say so, most of
    it waiting for Ray's start to return); the message is the one the full check gives."""
    trace = tmp_path / "trace.jsonl"
    trace.touch()
    status, _, err, phases = _traced_command(
        [sys.executable, "-m", "fedctx.simulate", *bad, "--out", str(tmp_path / "run")], trace,
        120)
    assert status == 2 and err.strip() == f"error: {_full_check_error(bad)}", err[-2000:]
    assert "ray-init" not in phases
    assert not (tmp_path / "run").exists()


def _full_check_error(argv: list[str]) -> str:
    from fedctx.config import ConfigError
    from fedctx.simulate import parse_config

    with pytest.raises(ConfigError) as info:
        parse_config(argv)
    return str(info.value)

def test_client_workers_import_no_flower_superlink() -> None:
    """What a worker preloads (fedctx's ClientApp and its actor class) leaves ``flwr.simulation``
    and the SuperLink's database and web stack unimported: 0.9 CPU s per worker at start-up."""
    from fedctx.federated.engine import WORKER_PRELOAD

    code = ("import sys; import " + ", ".join(WORKER_PRELOAD) + "; print(sorted({m for m in "
            "sys.modules if m.partition('.')[0] in ('sqlalchemy', 'alembic', 'fastapi') or "
            "m.startswith('flwr.simulation')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_flower_ray_backend_creates_fedctx_actor(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedctx.federated import actor, engine

    monkeypatch.setattr(raybackend, "ClientAppActor", raybackend.ClientAppActor)
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    assert engine._adapt_flower_engine()
    assert raybackend.ClientAppActor is actor.ClientAppActor
    assert vce_api.add_messages_to_queue is engine._dispatch_pending_messages


@pytest.mark.parametrize(("argv", "expected"), [
    ([], (0, False)),
    (["--num-cpus", "two"], None),
    (["--num-cpus", "1", "--verbose"], (1, True)),
    (["--backend", "inprocess"], None),
    (["--ray-address", "127.0.0.1:1"], None),
    (["--config", "{toml}"], None),
    (["--config", "{missing}"], None),
])
def test_the_command_line_starts_ray_before_resolving_options_only_when_it_asks_for_local_ray(
        tmp_path: Path, argv: list[str], expected: tuple[int, bool] | None) -> None:
    from fedctx.simulate import _local_ray_request, command_parser

    toml = tmp_path / "run.toml"
    toml.write_text('backend = "inprocess"\n')
    argv = [a.format(toml=toml, missing=tmp_path / "none.toml") for a in argv]
    assert _local_ray_request(command_parser().parse_args(argv)) == expected
