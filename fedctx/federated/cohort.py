"""Cohorts: several simulated clients carried by one Flower message.

In a simulation every worker process can train any client (each builds the run's data), so the
per-client price of the transport — one Flower message, one pickled model and one Ray task per
client per round, and a worker idle between short tasks — can be paid once per worker instead,
the observation behind pfl-research's simulator (Granqvist et al. 2024). Two halves, both on
Flower's Message API:

* :class:`CohortGrid` (server side) wraps the grid a strategy talks to. ``send_and_receive``
  packs the round's messages into one message per cohort — each distinct record (the model, a
  config) carried once, whichever members share it — and unpacks the cohort's reply into one
  reply per member, as if each client had answered alone: the strategy, its screening and its
  aggregation see per-client replies (Krum and FedMedian need them).
* :func:`cohort_mod` (client side) is a Flower client mod: it runs the ClientApp's handler once
  per member, with the member's own :class:`~flwr.app.Context` (its ``partition-id``), and packs
  the replies; a member whose handler raises gets an error reply, the others are unaffected.

With ``sums=True`` (``--cohort-sums``) a train cohort answers with its members' metrics and one
:class:`CohortSums` instead of one arrays record per member: the example-weighted sums of the
trained tensors (the norm tensors per context under ``per-context``), summed on the worker as
each member finishes (:func:`fedctx.federated.norm_client.fold`). The server screens each
member's metrics, then averages the cohorts' sums: a strategy that averages (FedAvg, FedProx)
gets the same model to float tolerance (float64 sums in another order), with one reply's worth
of bytes and decoding per cohort. A member whose tensors are not finite is left out of the sums
on the worker (a failed client); a cohort holding a member the server rejects is dropped whole.

Each member computes exactly what its own message would have computed (same seeds, same data),
so results are bit for bit those of one message per client
(``tests/test_cohort.py::test_cohorts_give_the_same_run_bit_for_bit``). What changes: a member's
``context.state`` is fresh in every round (fedctx's ClientApp keeps client state in files, see
:class:`~fedctx.federated.norm_client.FileStore`), and the round timeout covers the cohort as a
whole — a hung member withholds its cohort's replies, counted as failures of every member.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from fedctx.federated.params import WeightedSum
from fedctx.federated.records import encode, fast

log = logging.getLogger("fedctx")
COHORT_KEY = "fedctx-cohort"          # the cohort's layout (a ConfigRecord)
ERRORS_KEY = "fedctx-cohort-errors"   # in a cohort's reply: member -> reason
SUMS_KEY = "fedctx-cohort-sums"       # a summed reply's layout; in each member's reply: its cohort
SUM_PREFIX = "fedctx-sum"             # the sums' ArrayRecords: ``fedctx-sum`` (total), ``-c<k>``
PACKED_TYPES = frozenset({"train", "evaluate"})
# node id -> (partition id, weight), or None for a node whose partition is not known
Member = Callable[[int], "tuple[int, int] | None"]


Tensors = dict[str, torch.Tensor]


@dataclass
class CohortSums:
    """A cohort's trained tensors, summed: ``total`` over every folded member (weight: its
    ``num-examples``) and, under ``per-context``, ``by_context[k]`` of the norm tensors over the
    members holding context *k* (weight: their count of *k*); ``members``: the indices of the
    folded members in the cohort."""

    total: WeightedSum = field(default_factory=WeightedSum)
    by_context: dict[int, WeightedSum] = field(default_factory=dict)
    members: list[int] = field(default_factory=list)

    def add(self, tensors: Tensors, weight: float, by_context: dict[int, tuple[Tensors, int]],
            member: int | None = None) -> None:
        """Add one client's ``tensors`` to the total (``weight``) and, for each context *k* it
        holds, ``by_context[k]`` (its norm tensors, weight: its count of *k*); ``member``: its
        index in the cohort, if it is one of its members."""
        self.total.add(tensors, weight)
        for k, (norm, count) in by_context.items():
            self.by_context.setdefault(k, WeightedSum()).add(norm, count)
        if member is not None:
            self.members.append(member)

    def merge(self, other: CohortSums) -> None:
        self.total.merge(other.total)
        for k, part in other.by_context.items():
            self.by_context.setdefault(k, WeightedSum()).merge(part)
        self.members.extend(other.members)

    def to_records(self) -> dict[str, Any]:
        """The sums as records (float64 sums travel as float64 arrays)."""
        contexts = sorted(self.by_context)
        records: dict[str, Any] = {SUM_PREFIX: encode(self.total.sums)}
        records.update({f"{SUM_PREFIX}-c{k}": encode(self.by_context[k].sums) for k in contexts})
        records[SUMS_KEY] = ConfigRecord({
            "members": list(self.members), "weight": self.total.weight,
            "contexts": contexts, "context-weights": [self.by_context[k].weight
                                                      for k in contexts]})
        return records

    @classmethod
    def from_records(cls, content: RecordDict) -> CohortSums:
        layout = content[SUMS_KEY]
        sums = cls(WeightedSum(content[SUM_PREFIX].to_torch_state_dict(), float(layout["weight"])),
                   members=[int(i) for i in layout["members"]])
        for k, w in zip(layout["contexts"], layout["context-weights"], strict=True):
            sums.by_context[int(k)] = WeightedSum(
                content[f"{SUM_PREFIX}-c{k}"].to_torch_state_dict(), float(w))
        return sums


@dataclass
class CohortScope:
    """What the members of one cohort message share while :func:`cohort_mod` runs them: the
    received records decoded once (record id -> tensors) and, for a summed train cohort, the
    sums the members are folded into (``member``: the index of the member running)."""

    decoded: dict[int, Tensors] = field(default_factory=dict)
    sums: CohortSums | None = None
    member: int = 0

    def fold(self, tensors: Tensors, weight: float,
             by_context: dict[int, tuple[Tensors, int]]) -> None:
        """Add the running member's ``tensors`` to the total (``weight``) and, for each
        context *k* it holds, ``by_context[k]`` (its norm tensors, weight: its count of *k*)."""
        if self.sums is None:
            raise RuntimeError("fold() outside a summed cohort")
        self.sums.add(tensors, weight, by_context, member=self.member)

    def decode(self, record: ArrayRecord) -> Tensors:
        """``record.to_torch_state_dict()``, once per record object in this cohort (members of
        one context receive the same record). The tensors are shared: read them, do not
        modify them."""
        key = id(record)
        if key not in self.decoded:
            self.decoded[key] = record.to_torch_state_dict()
        return self.decoded[key]


_SCOPE: ContextVar[CohortScope | None] = ContextVar("fedctx_cohort_scope", default=None)


def cohort_scope() -> CohortScope | None:
    """The cohort whose member is running in this call, or ``None`` (a message of its own)."""
    return _SCOPE.get()


@contextmanager
def _scoped(scope: CohortScope) -> Iterator[CohortScope]:
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def _member_key(index: int, name: str) -> str:
    return f"m{index}.{name}"


def pack(messages: list[Message], partitions: list[int], sums: bool = False) -> Message:
    """One message to ``messages[0]``'s node carrying every message's content: distinct records
    once (``r<j>``), and the layout ``{"node-ids", "partition-ids", "m<i>": [name:r<j>]}``
    (plus ``"sums": True`` to ask for a :class:`CohortSums` reply)."""
    content: dict[str, Any] = {}
    refs: dict[int, str] = {}
    layout: dict[str, Any] = {"node-ids": [m.metadata.dst_node_id for m in messages],
                              "partition-ids": list(partitions)}
    if sums:
        layout["sums"] = True
    for i, msg in enumerate(messages):
        entry = []
        for name, record in msg.content.items():
            ref = refs.setdefault(id(record), f"r{len(refs)}")
            content[ref] = record
            entry.append(f"{name}:{ref}")
        layout[f"m{i}"] = entry
    content[COHORT_KEY] = ConfigRecord(layout)
    first = messages[0].metadata
    return Message(RecordDict(content), dst_node_id=first.dst_node_id,
                   message_type=first.message_type, group_id=first.group_id or None)


def unpack_reply(reply: Message, members: list[Message]) -> list[Message]:
    """One reply per member from the cohort's ``reply``: its records (arrays as
    :class:`~fedctx.federated.records.PayloadArray`, which the server decodes several times), or
    its error."""
    if reply.has_error():
        return [Message(reply.error, reply_to=m) for m in members]
    content = reply.content
    errors = content.get(ERRORS_KEY, ConfigRecord())
    summed = SUMS_KEY in content
    carrier = min((int(i) for i in content[SUMS_KEY]["members"]), default=None) if summed else None
    replies = []
    for i, member in enumerate(members):
        if (reason := errors.get(f"m{i}")) is not None:
            replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                         reason=str(reason)), reply_to=member))
            continue
        prefix = _member_key(i, "")
        records = {k[len(prefix):]: fast(v) for k, v in content.items()
                   if k.startswith(prefix)}
        if summed:  # its metrics, its cohort; the first folded member carries the sums
            cohort = reply.metadata.src_node_id
            records[SUMS_KEY] = ConfigRecord({"cohort": cohort})
            if i == carrier:
                records.update({k: v for k, v in content.items()
                                if k.startswith(SUM_PREFIX)})
                records[SUMS_KEY] = ConfigRecord({**content[SUMS_KEY], "cohort": cohort})
        replies.append(Message(RecordDict(records), reply_to=member))
    return replies


def ray_worker_slots(cpus_per_client: float, gpus_per_client: float = 0.0) -> int | None:
    """How many clients the running Ray instance runs at once (its CPUs, and GPUs if clients
    use them, over each client's share); ``None`` when Ray is not running in this process."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 0) // cpus_per_client)
    if gpus_per_client > 0:
        slots = min(slots, int(resources.get("GPU", 0) // gpus_per_client))
    return max(1, slots)


def split_into_cohorts(weights: list[int], cohorts: int) -> list[list[int]]:
    """Indices of ``weights`` in ``cohorts`` groups of near-equal total weight (largest first,
    each to the lightest group; ties to the lower group), each group in index order."""
    groups: list[list[int]] = [[] for _ in range(cohorts)]
    loads = [0] * cohorts
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        g = min(range(cohorts), key=lambda g: (loads[g], g))
        groups[g].append(i)
        loads[g] += weights[i]
    return [sorted(g) for g in groups if g]


class CohortGrid:
    """``grid``, sending train and evaluate messages in cohorts.

    Parameters
    ----------
    grid : the grid to send through (Flower's simulation grid; anything with the Grid API).
    member : node id -> (partition id, weight such as its number of examples), ``None`` for a
        node whose partition is unknown (it gets its own message, as do query messages).
    cohorts : number of cohorts per call (e.g. the number of Ray workers), or
    size : clients per cohort (one of the two; ``size=1`` sends every message alone).
    sums : train cohorts answer with :class:`CohortSums` (the strategy must average them).
    """

    def __init__(self, grid: Any, member: Member, *, cohorts: int = 0, size: int = 0,
                 sums: bool = False) -> None:
        if (cohorts > 0) == (size > 0):
            raise ValueError("CohortGrid: give exactly one of cohorts= and size= (> 0)")
        self._grid, self._member = grid, member
        self.cohorts, self.size, self.sums = cohorts, size, sums

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _groups(self, messages: list[Message]) -> list[list[tuple[Message, int | None]]]:
        """One message type's ``messages`` in cohorts, each message with its partition id;
        a message whose partition is unknown goes alone (partition ``None``)."""
        known, alone = [], []
        for msg in messages:
            info = self._member(msg.metadata.dst_node_id)
            if info is None:
                alone.append([(msg, None)])
            else:
                known.append((msg, info))
        if not known:
            return alone
        n = self.cohorts if self.cohorts else math.ceil(len(known) / self.size)
        split = split_into_cohorts([max(1, w) for _, (_, w) in known], min(n, len(known)))
        return [[(known[i][0], known[i][1][0]) for i in group] for group in split] + alone

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        """Flower's ``Grid.send_and_receive``, one message per cohort; the replies are the
        members' own (none for the members of a cohort that did not answer in time)."""
        by_type: dict[str, list[Message]] = {}
        for msg in messages:
            by_type.setdefault(msg.metadata.message_type, []).append(msg)
        outgoing: list[Message] = []
        members: dict[int, list[Message]] = {}  # carrier node id -> the cohort's messages
        for message_type, group in by_type.items():
            cohorts = (self._groups(group) if message_type in PACKED_TYPES
                       else [[(m, None)] for m in group])
            for cohort in cohorts:
                if len(cohort) == 1:
                    outgoing.append(cohort[0][0])
                    continue
                carried = [m for m, _ in cohort]
                outgoing.append(pack(carried, [p for _, p in cohort],
                                     sums=self.sums and message_type == MessageType.TRAIN))
                members[carried[0].metadata.dst_node_id] = carried
        replies: list[Message] = []
        for reply in self._grid.send_and_receive(outgoing, timeout=timeout):
            cohort = members.get(reply.metadata.src_node_id)
            replies.extend([reply] if cohort is None else unpack_reply(reply, cohort))
        return replies


def _member_message(msg: Message, content: RecordDict, node_id: int) -> Message:
    """The message ``node_id`` would have received: ``msg``'s metadata, addressed to it."""
    metadata = copy.copy(msg.metadata)
    metadata.dst_node_id = node_id
    return Message(content, metadata=metadata)


def cohort_mod(msg: Message, context: Context,
               call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower client mod: a cohort message runs ``call_next`` once per member, with the member's
    content and a Context of its own (node id, ``partition-id``; the run config shared), inside
    a :class:`CohortScope` (:func:`cohort_scope`); every other message passes through. Received
    arrays become :class:`~fedctx.federated.records.PayloadArray` (decoded without
    ``np.load``). A summed cohort's members must fold their tensors into the scope's sums and
    reply with their metrics only."""
    if msg.has_error():
        return call_next(msg, context)
    if COHORT_KEY not in msg.content:
        content = RecordDict({k: fast(v) for k, v in msg.content.items()})
        return call_next(_member_message(msg, content, msg.metadata.dst_node_id), context)
    layout = msg.content[COHORT_KEY]
    records = {k: fast(v) for k, v in msg.content.items() if k != COHORT_KEY}
    scope = CohortScope(sums=CohortSums() if layout.get("sums", False) else None)
    out: dict[str, Any] = {}
    errors: dict[str, str] = {}
    with _scoped(scope):
        for i, (node_id, partition) in enumerate(zip(layout["node-ids"], layout["partition-ids"],
                                                     strict=True)):
            content = RecordDict({name: records[ref] for name, ref in
                                  (entry.split(":", 1) for entry in layout[f"m{i}"])})
            member = _member_message(msg, content, node_id)
            member_context = Context(run_id=context.run_id, node_id=node_id,
                                     node_config={**context.node_config,
                                                  "partition-id": partition},
                                     state=RecordDict(), run_config=context.run_config)
            scope.member = i
            try:
                reply = call_next(member, member_context)
            except Exception as err:  # noqa: BLE001 - one member's failure is its own error reply
                log.exception("cohort member %s (partition %s) failed", node_id, partition)
                errors[f"m{i}"] = f"{type(err)}:<'{err}'>"
                continue
            if reply.has_error():
                errors[f"m{i}"] = reply.error.reason
                continue
            if scope.sums is not None and (i not in scope.sums.members
                                           or reply.content.array_records):
                raise RuntimeError("a summed cohort's member must fold its tensors "
                                   "(fedctx.federated.norm_client.fold) and reply with metrics "
                                   "only")
            out.update({_member_key(i, name): record for name, record in reply.content.items()})
    if scope.sums is not None:
        if any(int(k[1:]) in scope.sums.members for k in errors):
            raise RuntimeError("a cohort member failed after folding its tensors: the cohort's "
                               "sums are void")
        out.update(scope.sums.to_records())
    if errors:
        out[ERRORS_KEY] = ConfigRecord(errors)
    return Message(RecordDict(out), reply_to=msg)
