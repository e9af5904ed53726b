"""fedctx on Flower's Deployment Engine: a SuperLink and four SuperNodes on loopback, ``flwr run .``
trains 2 rounds over real processes and gRPC, with the same metrics as the in-process run.

Each Flower process runs in a process group of its own (the ServerApp and ClientApp processes
they spawn join it), so the teardown kills exactly the processes this test started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLIENTS = 4


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
def test_flwr_run_on_superlink_and_supernodes(tmp_path: Path) -> None:
    from fedctx.config import SimConfig
    from fedctx.federated.client import app as client_app
    from fedctx.federated.engine import run_in_process
    from fedctx.federated.run_config import to_run_config

    del client_app
    link, *node_ports = free_ports(1 + CLIENTS)  # Flower 1.41: one HTTP port per process
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    log = (tmp_path / "flower.log").open("w")
    started: list[subprocess.Popen] = []

    def spawn(*cmd: str) -> None:
        started.append(subprocess.Popen(list(cmd), cwd=tmp_path, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True))

    out = tmp_path / "deployed"
    overrides = f"clients={CLIENTS} rounds=2 width=4 out='{out}'"
    try:
        spawn(str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
              str(link), "--disable-runtime-dependency-installation")
        for i, port in enumerate(node_ports):
            spawn(str(BIN / "flower-supernode"), "--insecure", "--superlink",
                  f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port", str(port),
                  "--node-config", f"partition-id={i} num-partitions={CLIENTS}")
        deadline = time.time() + 120
        while True:  # the Control API accepts runs once the SuperLink is up
            proc = subprocess.run([str(BIN / "flwr"), "run", str(REPO), "loopback",
                                   "--run-config", overrides], env=env, capture_output=True,
                                  text=True, timeout=120)
            if proc.returncode == 0 or time.time() > deadline:
                break
            time.sleep(2)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        deadline = time.time() + 480
        while not (out / "summary.json").exists():
            assert time.time() < deadline, (tmp_path / "flower.log").read_text()[-3000:]
            time.sleep(1)
    finally:
        for p in reversed(started):
            stop(p)
        log.close()
    assert all(p.poll() is not None for p in started)
    deployed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in deployed] == [1, 2]
    assert all(r["clients_ok"] == r["clients_sampled"] == 2 for r in deployed)

    config = SimConfig(clients=CLIENTS, rounds=2, width=4, out=str(tmp_path / "inprocess"))
    run_in_process(to_run_config(config.validate()), num_clients=CLIENTS)
    local = [json.loads(x) for x in
             (tmp_path / "inprocess" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(deployed, local, strict=True):
        assert a["sampled"] == b["sampled"]
        assert a["accuracy_per_context"] == b["accuracy_per_context"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
