"""The Flower ``ClientApp``: each simulated client trains with its context's normalization.

Messages (Flower Message API, ``flwr.app`` records):

* ``query`` -> metrics ``partition-id``, ``context``, ``num-examples`` (the server's registry).
* ``train``: in ``arrays`` (shared weights), ``norm`` (norm tensors the policy sends),
  ``config``; out ``arrays`` (shared weights), ``norm`` (norm tensors the policy returns),
  ``metrics`` (``num-examples``, ``train-loss``, ``context``, ``partition-id``).
* ``evaluate`` (policies whose norm state stays on clients): accuracy of the global shared
  weights with the client's own norm on its context's test set.

Client-local norm state (``local``, ``stats-local``) is written atomically to
``<out>/client_state/client<pid>.r<round>.pt`` and read back as the newest version from an
earlier round, so a resumed run sees exactly the state its last finished round left.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedctx.config import SimConfig
from fedctx.federated.policy import NormPolicy, client_split_reply, merge_client_norm
from fedctx.federated.runtime import get_runtime
from fedctx.federated.training import evaluate, local_train

_VERSION = re.compile(r"client(\d+)\.r(\d+)\.pt$")


def _state_dir(config: SimConfig) -> Path:
    return Path(config.out) / "client_state"


def load_kept_state(config: SimConfig, pid: int, before_round: int) -> dict | None:
    """The client's kept norm tensors from the newest round < ``before_round``, if any."""
    folder = _state_dir(config)
    if not folder.is_dir():
        return None
    best = None
    for f in folder.glob(f"client{pid}.r*.pt"):
        m = _VERSION.search(f.name)
        if m and int(m.group(1)) == pid and int(m.group(2)) < before_round:
            if best is None or int(m.group(2)) > best[0]:
                best = (int(m.group(2)), f)
    return None if best is None else torch.load(best[1], weights_only=True)


def save_kept_state(config: SimConfig, pid: int, server_round: int, tensors: dict) -> None:
    """Write the client's kept norm tensors for ``server_round`` atomically; keep two versions."""
    folder = _state_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"client{pid}.r{server_round}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(tensors, tmp)
    os.replace(tmp, path)
    versions = sorted((int(m.group(2)), f) for f in folder.glob(f"client{pid}.r*.pt")
                      if (m := _VERSION.search(f.name)))
    for _, old in versions[:-2]:
        old.unlink(missing_ok=True)


def ray_node_tag() -> int:
    """A 48-bit tag of the Ray node this client runs on (0 outside Ray), to see placement."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 0
    return int(ray.get_runtime_context().get_node_id()[:12], 16)


class _RunClientApp(ClientApp):
    """A ``ClientApp`` that pickles as ``make_client_app(config)``.

    Flower's Ray backend pickles the ClientApp with every message it sends to a worker; pickling
    the handlers' closures by value cost milliseconds per message, this costs a small dict.
    """

    def __init__(self, config: SimConfig) -> None:
        super().__init__()
        self.run_config = config

    def __reduce__(self):  # noqa: ANN204
        return (_client_app_from_dict, (self.run_config.to_dict(),))


_APPS: dict[str, ClientApp] = {}


def _client_app_from_dict(values: dict) -> ClientApp:
    key = json.dumps(values, sort_keys=True)
    if key not in _APPS:
        _APPS[key] = make_client_app(SimConfig(**values))
    return _APPS[key]


def make_client_app(config: SimConfig) -> ClientApp:
    """Build the ``ClientApp`` for a run described by ``config``."""
    app = _RunClientApp(config)
    policy = NormPolicy(config.norm_policy)
    threads = max(1, int(config.cpus_per_client))

    def setup(context: Context):
        torch.set_num_threads(threads)
        rt = get_runtime(config)
        pid = int(context.node_config["partition-id"])
        return rt, pid, rt.data.clients[pid]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        rt, pid, data = setup(context)
        metrics = MetricRecord({"partition-id": pid, "context": data.context,
                                "num-examples": len(data)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    def load_weights(rt, msg: Message, pid: int, server_round: int) -> None:
        shared = msg.content["arrays"].to_torch_state_dict()
        received = msg.content["norm"].to_torch_state_dict() if "norm" in msg.content else {}
        kept = load_kept_state(config, pid, server_round) if policy.client_keeps != "none" else None
        norm = merge_client_norm(policy, rt.split, received, kept)
        missing = set(rt.split.shared + rt.split.norm) - set(shared) - set(norm)
        if missing:
            raise KeyError(f"server message lacks tensors {sorted(missing)[:5]}")
        rt.model.load_state_dict({**shared, **norm})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rt, pid, data = setup(context)
        cfg = msg.content["config"]
        server_round = int(cfg["server-round"])
        load_weights(rt, msg, pid, server_round)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + server_round * 10_007
                                                  + pid)
        loss = local_train(
            rt.model, data, epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]),
            lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
            weight_decay=float(cfg["weight-decay"]), generator=generator,
            proximal_mu=float(cfg.get("proximal-mu", 0.0)), device=rt.device,
        )
        state = {k: v.detach().cpu() for k, v in rt.model.state_dict().items()}
        sent, kept = client_split_reply(policy, rt.split, {k: state[k] for k in rt.split.norm})
        if kept:
            save_kept_state(config, pid, server_round, kept)
        content = RecordDict({
            "arrays": ArrayRecord({k: state[k] for k in rt.split.shared}),
            "metrics": MetricRecord({"num-examples": len(data), "train-loss": loss,
                                     "context": data.context, "partition-id": pid,
                                     "ray-node": ray_node_tag()}),
        })
        if sent:
            content["norm"] = ArrayRecord(sent)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        rt, pid, data = setup(context)
        server_round = int(msg.content["config"]["server-round"])
        load_weights(rt, msg, pid, server_round + 1)
        x, y = rt.data.test[data.context]
        acc, loss = evaluate(rt.model, x, y, data.context, device=rt.device)
        metrics = MetricRecord({"num-examples": len(y), "accuracy": acc, "loss": loss,
                                "context": data.context, "partition-id": pid})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app
