"""The one place that calls Flower's simulation engine (Ray backend) for
``python -m fedctx.simulate``.

It runs fedctx's Flower App (``fedctx.federated.server:app``, ``fedctx.federated.client:app``)
exactly as ``flwr run`` does in a local simulation (Flower's ``_run_simulation`` with the apps
loaded by reference and the run config read from an app folder), minus the detached SuperLink
process that ``flwr run`` starts, which doubles start-up time here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedctx.federated.startup import mark

if TYPE_CHECKING:
    from flwr.app import Context, Message

SERVER_APP = "fedctx.federated.server:app"
CLIENT_APP = "fedctx.federated.client:app"
RunConfig = dict[str, bool | int | float | str]


def quiet_flower(verbose: bool) -> None:
    """Silence Flower's and Ray's INFO/WARNING logs unless ``verbose``."""
    if not verbose:
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.ERROR)


def run_in_process(run_config: RunConfig, *, num_clients: int, verbose: bool = False,
                   client_app: Callable[[Message, Context], Message] | None = None) -> None:
    """Run fedctx's ServerApp against an :class:`~fedctx.federated.local.InProcessGrid` of
    ``client_app`` (default: fedctx's ClientApp; e.g. a wrapper that alters some replies, as
    ``benchmarks/robustness.py`` does), without Ray, both with ``run_config``."""
    from flwr.app import Context, RecordDict

    from fedctx.federated.client import app as fedctx_client_app
    from fedctx.federated.local import InProcessGrid
    from fedctx.federated.server import app as server_app

    quiet_flower(verbose)
    grid = InProcessGrid(client_app or fedctx_client_app, num_clients, run_config=run_config)
    server_app(grid, Context(run_id=grid.run_id, node_id=1, node_config={}, state=RecordDict(),
                             run_config=dict(run_config)))


def write_app_config(folder: Path, run_config: RunConfig) -> None:
    """A Flower App folder whose ``pyproject.toml`` names fedctx's apps and holds
    ``run_config`` as ``[tool.flwr.app.config]`` (how Flower hands a run config to apps)."""
    def value(v: bool | int | float | str) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    lines = ["[project]", 'name = "fedctx-run"', 'version = "0.1.0"', "",
             "[tool.flwr.app]", 'publisher = "fedctx"', "",
             "[tool.flwr.app.components]", f'serverapp = "{SERVER_APP}"',
             f'clientapp = "{CLIENT_APP}"', "", "[tool.flwr.app.config]",
             *(f'"{k}" = {value(v)}' for k, v in run_config.items())]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")


DISPATCH_POLL_S = 0.005


def _dispatch_pending_messages(state, queue, nodes_mapping, f_stop) -> None:  # noqa: ANN001
    """Flower 1.41's ``vce_api.add_messages_to_queue`` with the same contract, made cheap.

    Flower's loop asks the link state, every 0.1 s, for a message for *every* registered node,
    and each ask scans every stored message: O(nodes x messages) per poll, which dominated the
    driver's CPU with 100+ clients (measured with py-spy; see docs/results/simulation_overhead.md)
    and grows with the number of registered clients. This loop first collects, in one pass, the
    nodes that have an undelivered message, asks only for those, and polls every 5 ms.
    """
    nodes = set(nodes_mapping)
    indexed = hasattr(state, "message_ins_store") and hasattr(state, "lock")
    while not f_stop.is_set():
        waiting = nodes
        if indexed:
            with state.lock:
                waiting = {m.metadata.dst_node_id for m in state.message_ins_store.values()
                           if m.metadata.delivered_at == ""} & nodes
        for node_id in waiting:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(DISPATCH_POLL_S)


def _adapt_flower_engine() -> bool:
    """Only on the Flower version they were written against (the pinned 1.41.0), install
    :func:`_dispatch_pending_messages` in Flower's simulation engine and have its Ray backend
    create :class:`fedctx.federated.actor.ClientAppActor` (which spares every worker the import
    of Flower's SuperLink). Returns whether it did."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    if (flwr.__version__ != "1.41.0" or not hasattr(vce_api, "add_messages_to_queue")
            or not hasattr(raybackend, "ClientAppActor")):
        return False
    from fedctx.federated.actor import ClientAppActor

    vce_api.add_messages_to_queue = _dispatch_pending_messages
    raybackend.ClientAppActor = ClientAppActor
    return True


def ray_init_args(num_cpus: int, verbose: bool) -> dict[str, object]:
    """Arguments for ``ray.init`` of a local instance sized to ``num_cpus`` (0: all cores)."""
    return {
        "num_cpus": num_cpus or os.cpu_count() or 1,
        "include_dashboard": False,
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "log_to_driver": verbose,
        "configure_logging": True,
    }


#: What a client worker imports as it starts: fedctx's ClientApp (torch, Flower, fedctx) and
#: the module of its client actor class (Ray, Flower's ClientApp).
WORKER_PRELOAD = [CLIENT_APP.partition(":")[0], "fedctx.federated.actor"]


def init_local_ray(num_cpus: int, verbose: bool) -> None:
    """Start a local Ray instance sized to ``num_cpus`` (0: all cores), unless Ray is up.

    Its workers see the driver's ``sys.path`` (as ``PYTHONPATH``, which Flower's
    ``RayBackend.init_ray`` would hand them as a runtime env; inherited here instead, so that the
    workers Ray starts with its raylet serve the client actors) and import
    :data:`WORKER_PRELOAD` as soon as they start (Ray's ``preload_python_modules``), while the
    driver is still busy, instead of on their first message. Marks ``ray-init`` (before ``import
    ray``) and ``ray-ready`` (:mod:`fedctx.federated.startup`). Call it from the main thread:
    Ray's processes end with the thread that started them.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
    mark("ray-init")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ray.init(_system_config={"preload_python_modules": WORKER_PRELOAD},
                 **ray_init_args(num_cpus, verbose))
    mark("ray-ready")


RAY_CONNECT_TIMEOUT_S = 5.0  # the TCP probe of a Ray address
RAY_JOIN_TIMEOUT_S = 30.0  # joining the cluster (Ray retries for about 20 s)


def connect_ray_cluster(address: str, error: type[Exception], verbose: bool = False,
                        log_to_driver: bool | None = None) -> None:
    """Join the Ray cluster at ``address`` (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``), or
    raise ``error`` with one line saying why: a malformed address, no TCP answer within
    :data:`RAY_CONNECT_TIMEOUT_S`, or no Ray cluster joined within :data:`RAY_JOIN_TIMEOUT_S`
    (the command lines' ``--ray-address``). ``log_to_driver``: the cluster's task output shown
    here (default ``verbose``)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address != "auto" and (not host or not port.isdigit()):
        raise error(f"--ray-address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379), "
                    "ray://HOST:PORT or auto")
    try:
        if address != "auto":
            socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
        join_ray_cluster(address, verbose, RAY_JOIN_TIMEOUT_S, log_to_driver)
    except (OSError, RuntimeError) as err:  # ConnectionError, TimeoutError, Ray's RpcError
        reason = " ".join(str(getattr(err, "strerror", None) or err).split())[:200]
        raise error(f"--ray-address {address}: no Ray cluster answers there ({reason}); start "
                    "one with `ray start --head` or fix the address") from None


def join_ray_cluster(address: str, verbose: bool = False, timeout: float = RAY_JOIN_TIMEOUT_S,
                     log_to_driver: bool | None = None) -> None:
    """``ray.init(address=address)``, waiting at most ``timeout`` seconds; Ray's own retry
    messages are kept off the terminal unless ``verbose``, the cluster's task output unless
    ``log_to_driver`` (default ``verbose``). Raises ``ConnectionError`` (Ray's) or
    ``TimeoutError`` when no cluster can be joined there."""
    import threading

    import ray

    if ray.is_initialized():
        return
    failure: list[BaseException] = []
    show_tasks = verbose if log_to_driver is None else log_to_driver

    def connect() -> None:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=show_tasks)
        except Exception as err:  # noqa: BLE001 - handed to the caller
            failure.append(err)

    worker = threading.Thread(target=connect, daemon=True)
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        if not verbose:
            os.dup2(sink.fileno(), 2)  # Ray's C++ client logs each retry on stderr
        try:
            worker.start()
            worker.join(timeout)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {timeout:.0f} s")
    if failure:
        raise failure[0]


def run_on_ray(run_config: RunConfig, *, num_clients: int, cpus_per_client: float,
               gpus_per_client: float, num_cpus: int = 0, ray_address: str = "",
               verbose: bool = False) -> None:
    """Run fedctx's apps with ``num_clients`` simulated SuperNodes on Ray.

    With ``ray_address``, join that Ray cluster (``ray.init(address=...)``) and let Flower place
    clients on any of its nodes; otherwise use the local Ray instance started already (see
    ``fedctx.simulate``), or start one with ``num_cpus`` CPUs.
    """
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    quiet_flower(verbose)
    backend_config: dict[str, object] = {
        # A worker process that dies (killed, out of memory) is restarted by Ray: the clients it
        # was running fail that round (counted as failures), later rounds use the new process.
        # Flower's actor pool would otherwise keep handing out the dead actor.
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client,
                             "max_restarts": -1},
    }
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray_address:
        join_ray_cluster(ray_address, verbose)
    else:
        init_local_ray(num_cpus, verbose)
    _adapt_flower_engine()
    with tempfile.TemporaryDirectory(prefix="fedctx-app-") as folder, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_app_config(Path(folder), run_config)
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                          run_config=dict(run_config))
        mark("engine")
        _run_simulation(server_app_attr=SERVER_APP, client_app_attr=CLIENT_APP,
                        num_supernodes=num_clients, backend_name="ray",
                        backend_config=backend_config, app_dir=folder, is_app=True,
                        server_app_context=context, verbose_logging=verbose,
                        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE)
