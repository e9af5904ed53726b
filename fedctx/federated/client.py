"""fedctx's Flower ``ClientApp`` (``fedctx.federated.client:app``): each node trains the run's
model on its partition, under its context's normalization.

Everything comes from Flower: the experiment from ``context.run_config`` (see
:mod:`fedctx.federated.run_config`), the node's partition from
``context.node_config["partition-id"]``. Messages:

* ``query`` -> metrics ``partition-id``, ``context``, ``num-examples`` and, for a node whose
  data has labels, ``label-counts`` (training samples per class).
* ``train``: in ``arrays`` (the full model, as the server's norm policy sends it) and
  ``config``; out ``arrays`` (shared tensors plus the norm tensors the policy returns) and
  ``metrics`` (``num-examples``, ``train-loss``, ``context``, ``context-counts`` (training
  samples per context id), ``partition-id``, ``ray-node``). A node with labels trains
  supervised and, in a run with ``--unlabelled-domains``, adds ``confidence`` (its mean
  top-class probability, the source side of AdaMatch's relative threshold); a node without
  labels (``ClientData.y is None``, an ``--unlabelled-domains`` domain) trains with AdaMatch's
  unlabelled objective (:mod:`fedctx.federated.unlabelled`, reading ``label-distribution`` and
  ``source-confidence`` from ``config`` when the server sends them) and adds
  ``unlabelled-mask-rate``. Shared weights are averaged by ``num-examples`` either way.
* ``evaluate`` (policies whose norm state stays on clients): accuracy of the global shared
  weights with the node's own norm on its context's test set.

Client-local norm state (``local``, ``stats-local``) is kept with a
:class:`~fedctx.federated.norm_client.FileStore` in ``<out>/client_state/``, so a run resumed
after ``kill -9`` sees exactly the state its last finished round left.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedctx.federated import norm_client
from fedctx.federated.cohort import cohort_mod
from fedctx.federated.runtime import Runtime, get_runtime
from fedctx.federated.training import evaluate, local_train
from fedctx.federated.unlabelled import source_confidence, unlabelled_train

app = ClientApp(mods=[cohort_mod])


def ray_node_tag() -> int:
    """A 48-bit tag of the Ray node this client runs on (0 outside Ray), to see placement."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 0
    return int(ray.get_runtime_context().get_node_id()[:12], 16)


def _setup(context: Context) -> tuple[Runtime, int]:
    rt = get_runtime(context.run_config)
    torch.set_num_threads(max(1, int(rt.config.cpus_per_client)))
    pid = int(context.node_config["partition-id"])
    parts = int(context.node_config.get("num-partitions", rt.config.clients))
    if parts != rt.config.clients or not 0 <= pid < parts:
        raise ValueError(f"node has partition {pid} of {parts}, the run config expects "
                         f"clients = {rt.config.clients}")
    return rt, pid


def _store(rt: Runtime, pid: int) -> norm_client.FileStore:
    return norm_client.FileStore(Path(rt.config.out) / "client_state", pid)


@app.query()
def query(msg: Message, context: Context) -> Message:
    rt, pid = _setup(context)
    data = rt.data.clients[pid]
    labels = (None if data.y is None
              else torch.bincount(data.y, minlength=rt.data.num_classes).tolist())
    return norm_client.describe(msg, context=data.context, partition_id=pid,
                                num_examples=len(data.x), label_counts=labels)


@app.train()
def train(msg: Message, context: Context) -> Message:
    rt, pid = _setup(context)
    data, cfg = rt.data.clients[pid], msg.content["config"]
    server_round = int(cfg["server-round"])
    norm_client.load(rt.model, msg, context, _store(rt, pid))
    generator = torch.Generator().manual_seed(rt.config.seed * 1_000_003 + server_round * 10_007
                                              + pid)
    sgd = {"epochs": int(cfg["local-epochs"]), "batch_size": int(cfg["batch-size"]),
           "lr": float(cfg["lr"]), "momentum": float(cfg["momentum"]),
           "weight_decay": float(cfg["weight-decay"]), "generator": generator,
           "proximal_mu": float(cfg.get("proximal-mu", 0.0)), "device": rt.device}
    if data.y is None:
        confidence = cfg.get("source-confidence")
        loss, mask_rate = unlabelled_train(
            rt.model, data, num_classes=rt.data.num_classes,
            label_distribution=cfg.get("label-distribution"),
            source_confidence=None if confidence is None else float(confidence), **sgd)
        extra: dict[str, float] = {"unlabelled-mask-rate": mask_rate}
    else:
        loss = local_train(rt.model, data, **sgd)
        extra = {}
        if rt.data.unlabelled_domains:  # AdaMatch's relative threshold needs it; a forward pass
            extra["confidence"] = source_confidence(rt.model, data, generator, device=rt.device)
    metrics = {"num-examples": len(data.x), "train-loss": loss, "context": data.context,
               "context-counts": data.context_counts(rt.data.num_contexts).tolist(),
               "partition-id": pid, "ray-node": ray_node_tag(), **extra}
    return norm_client.reply(rt.model, msg, context, metrics, _store(rt, pid))


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    rt, pid = _setup(context)
    data = rt.data.clients[pid]
    norm_client.load(rt.model, msg, context, _store(rt, pid))
    x, y = rt.data.test[data.context]
    acc, loss = evaluate(rt.model, x, y, data.context, device=rt.device)
    metrics = MetricRecord({"num-examples": len(y), "accuracy": acc, "loss": loss,
                            "context": data.context, "partition-id": pid})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
