"""The client half of :class:`~fedctx.federated.norm_strategy.NormPolicyStrategy`, for any
Flower ``ClientApp`` that trains a PyTorch model.

Three calls change a plain Flower client into one that follows the server's norm policy::

    @app.train()
    def train(msg, context):
        load(model, msg, context)                   # received arrays + the node's own norm
        ...train...
        return reply(model, msg, context, {"num-examples": n, "context": k})

    @app.query()
    def query(msg, context):                        # lets the server learn the context up front
        return describe(msg, context=k)

The policy's name arrives in ``config["norm-policy"]`` (absent: ``average``, everything
travels). Under ``local`` (FedBN) the node keeps all its normalization tensors and sends none;
under ``stats-local`` (SiloBN) it keeps its running statistics. What it keeps lives in
``context.state`` by default (it travels with the node's Context), or in any :class:`NormStore`.
"""

from __future__ import annotations

import os
import re
import weakref
from pathlib import Path
from typing import Protocol

import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from fedctx.federated.cohort import CohortScope, cohort_scope
from fedctx.federated.params import StateSplit, split_state
from fedctx.federated.policy import (
    NormPolicy,
    NormUpdate,
    client_split_reply,
    merge_client_norm,
    summed_parts,
)
from fedctx.federated.records import encode

Tensors = dict[str, torch.Tensor]
STATE_KEY = "fedctx-norm"
_SPLITS: weakref.WeakKeyDictionary[nn.Module, StateSplit] = weakref.WeakKeyDictionary()


class NormStore(Protocol):
    """Where a node keeps the normalization tensors its policy does not send."""

    def load(self, before_round: int) -> Tensors | None: ...

    def save(self, server_round: int, tensors: Tensors) -> None: ...


class ContextStore:
    """Kept tensors in ``context.state`` (Flower keeps it per node and run)."""

    def __init__(self, context: Context) -> None:
        self.state = context.state

    def load(self, before_round: int) -> Tensors | None:
        record = self.state.get(STATE_KEY)
        return None if record is None else record.to_torch_state_dict()

    def save(self, server_round: int, tensors: Tensors) -> None:
        self.state[STATE_KEY] = ArrayRecord(tensors)


_VERSION = re.compile(r"client(\d+)\.r(\d+)\.pt$")


class FileStore:
    """Kept tensors in ``<folder>/client<pid>.r<round>.pt``, written atomically; reads the
    newest version from a round before the current one, so a run resumed after ``kill -9``
    sees exactly the state its last finished round left. Two versions are kept."""

    def __init__(self, folder: Path | str, partition_id: int) -> None:
        self.folder, self.pid = Path(folder), partition_id

    def _versions(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = ((_VERSION.search(f.name), f) for f in self.folder.glob(f"client{self.pid}.r*.pt"))
        return sorted((int(m.group(2)), f) for m, f in found
                      if m and int(m.group(1)) == self.pid)

    def load(self, before_round: int) -> Tensors | None:
        earlier = [f for r, f in self._versions() if r < before_round]
        return torch.load(earlier[-1], weights_only=True) if earlier else None

    def save(self, server_round: int, tensors: Tensors) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"client{self.pid}.r{server_round}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(tensors, tmp)
        os.replace(tmp, path)
        for _, old in self._versions()[:-2]:
            old.unlink(missing_ok=True)


def model_split(model: nn.Module) -> StateSplit:
    """``split_state(model)``, computed once per model object."""
    if model not in _SPLITS:
        _SPLITS[model] = split_state(model)
    return _SPLITS[model]


def policy_of(msg: Message) -> NormPolicy:
    config = msg.content.get("config")
    return NormPolicy(str(config.get("norm-policy", "average")) if config else "average")


def _round_of(msg: Message) -> int:
    config = msg.content.get("config")
    return int(config.get("server-round", 0)) if config else 0


def _kept_before(msg: Message) -> int:
    """Kept state is read from rounds before this one; evaluating round r reads round r's."""
    r = _round_of(msg)
    if not r:
        return 1 << 62
    return r + 1 if msg.metadata.message_type == MessageType.EVALUATE else r


def load(model: nn.Module, msg: Message, context: Context, store: NormStore | None = None,
         arrays_key: str = "arrays") -> None:
    """Load the received ``arrays`` into ``model``; the normalization tensors the policy keeps
    on the node come from ``store`` (default: ``context.state``) once it has any."""
    policy, split = policy_of(msg), model_split(model)
    record, scope = msg.content[arrays_key], cohort_scope()
    received = dict(scope.decode(record)) if scope else record.to_torch_state_dict()
    if policy.client_keeps != "none":
        store = store or ContextStore(context)
        received.update(merge_client_norm(policy, split, {k: received[k] for k in split.norm},
                                          store.load(_kept_before(msg))))
    missing = set(split.shared + split.norm) - set(received)
    if missing:
        raise KeyError(f"server message lacks tensors {sorted(missing)[:5]}")
    model.load_state_dict(received)


def _trained(model: nn.Module, msg: Message, context: Context, store: NormStore | None
             ) -> Tensors:
    """The tensors a train reply sends (shared plus the norm tensors the policy returns);
    what the policy keeps goes to ``store`` (default: ``context.state``)."""
    policy, split = policy_of(msg), model_split(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sent, kept = client_split_reply(policy, split, {k: state[k] for k in split.norm})
    if kept:
        (store or ContextStore(context)).save(_round_of(msg), kept)
    return {**{k: state[k] for k in split.shared}, **sent}


def reply(model: nn.Module, msg: Message, context: Context, metrics: dict,
          store: NormStore | None = None, arrays_key: str = "arrays") -> Message:
    """The train reply: shared tensors plus the norm tensors the policy sends back, and
    ``metrics`` (``num-examples`` at least; ``context`` for ``per-context``). What the policy
    keeps goes to ``store`` (default: ``context.state``). In a summed cohort
    (:func:`~fedctx.federated.cohort.cohort_scope`) the tensors are folded into the cohort's
    sums instead (:func:`fold`) and the reply holds ``metrics`` only."""
    tensors = _trained(model, msg, context, store)
    metrics_record = MetricRecord(metrics)
    scope = cohort_scope()
    if scope is not None and scope.sums is not None:
        fold(scope, msg, tensors, metrics, model_split(model).norm)
        return Message(RecordDict({"metrics": metrics_record}), reply_to=msg)
    return Message(RecordDict({arrays_key: encode(tensors), "metrics": metrics_record}),
                   reply_to=msg)


def fold(scope: CohortScope, msg: Message, tensors: Tensors, metrics: dict,
         norm_keys: tuple[str, ...]) -> None:
    """Fold one member's trained ``tensors`` into its cohort's sums: all of them weighted by
    ``num-examples``; under ``per-context`` the norm tensors per context held instead, weighted
    by the member's count of each context (``context-counts``, else ``num-examples`` at its
    ``context``), as the server's bank merges them. Tensors that are not finite are refused
    (``ValueError``: the member fails, its tensors stay out of the sums)."""
    norms = torch._foreach_norm([t for t in tensors.values() if t.is_floating_point()])
    if norms and not bool(torch.stack(norms).isfinite().all()):
        bad = sorted(k for k, t in tensors.items()
                     if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        raise ValueError(f"arrays: {bad[:3]} hold values that are not finite")
    update = NormUpdate.from_metrics(metrics, {})
    total, by_context = summed_parts(policy_of(msg), tensors, norm_keys, update)
    scope.fold(total, update.num_examples, by_context)


def describe(msg: Message, *, context: int, partition_id: int | None = None,
             num_examples: int | None = None, label_counts: list[int] | None = None) -> Message:
    """The answer to the server's ``query``: this node's context (and partition id, size, and
    for a labelled node its ``label-counts``: training samples per class, from which the server
    learns the labelled clients' label distribution; an unlabelled node gives none)."""
    metrics: dict[str, int | list[int]] = {"context": context}
    if partition_id is not None:
        metrics["partition-id"] = partition_id
    if num_examples is not None:
        metrics["num-examples"] = num_examples
    if label_counts is not None:
        metrics["label-counts"] = list(label_counts)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
