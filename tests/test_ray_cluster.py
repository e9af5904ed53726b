"""A real two-node Ray cluster on loopback (a head and a worker node, one CPU each): fedctx
joins it with --ray-address and clients run on both nodes.

Each node runs as ``ray start --block`` in a process group of its own, so tearing the cluster
down kills exactly its processes (``ray stop`` would stop every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def _alive_nodes(address: str) -> int:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else 0


@pytest.fixture
def two_node_cluster():
    port = random.randint(20000, 40000)
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths are limited
    address = f"127.0.0.1:{port}"
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats", "--node-ip-address",
              "127.0.0.1"]
    nodes = [subprocess.Popen([RAY, "start", "--head", "--port", str(port),
                               "--include-dashboard", "false", "--temp-dir", temp, *common],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        deadline = time.time() + 180
        while _alive_nodes(address) < 1:
            assert time.time() < deadline, "the Ray head did not start"
            time.sleep(1)
        nodes.append(subprocess.Popen([RAY, "start", "--address", address, *common],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        while _alive_nodes(address) < 2:
            assert time.time() < deadline, "the second Ray node did not join"
            time.sleep(1)
        yield address
    finally:
        for node in reversed(nodes):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(node.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    node.wait(timeout=20)
                    break
                except subprocess.TimeoutExpired:
                    continue


@pytest.mark.slow
def test_simulation_spreads_clients_over_both_nodes(two_node_cluster: str, tmp_path: Path
                                                    ) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedctx.simulate", "--ray-address", two_node_cluster,
         "--clients", "6", "--rounds", "2", "--fraction", "1.0", "--width", "4",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["ray_nodes"] for r in rounds) == 2
    assert all(r["clients_ok"] == 6 for r in rounds)
