"""``NormPolicyStrategy``: any Flower strategy, plus a norm policy for the normalization tensors.

The wrapper follows the shape of Flower's own DP wrappers: it delegates to an inner strategy and
adds one concern. The inner strategy (FedAvg, FedAdam, Krum, a DP wrapper, ...) sees and
aggregates only the **shared** tensors; the wrapper decides what happens to the
**normalization** tensors (``average``, ``local``, ``stats-local``, ``per-context``, see
:mod:`fedctx.federated.policy`), screens replies and keeps the per-context bank::

    strategy = NormPolicyStrategy(FedAvg(fraction_train=0.5), model=Net(), policy="per-context")
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            num_rounds=3)

Messages keep Flower's layout: ``arrays`` carries the **full** model (the inner strategy's
shared arrays plus the norm tensors the policy sends to that node), so an unchanged PyTorch
client that loads ``arrays`` and replies with its whole ``state_dict`` works with ``average`` and
``per-context``; ``local`` / ``stats-local`` clients keep their own normalization state with
:mod:`fedctx.federated.norm_client`. The policy's name travels in ``config["norm-policy"]``.

Node -> context (and partition id) is learnt from a ``query`` message sent once to each new node
(answered by :func:`fedctx.federated.norm_client.describe`) and from the ``context`` metric of
train replies; ``contexts=`` gives it up front.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedctx.federated.params import StateSplit, split_state
from fedctx.federated.policy import NormPolicy, NormUpdate, ServerNormState

log = logging.getLogger("fedctx")
Tensors = dict[str, torch.Tensor]
POLICY_KEY = "norm-policy"


@dataclass
class NodeInfo:
    """What a node told about itself (``None``: it did not say)."""

    partition_id: int | None = None
    context: int | None = None
    num_examples: int | None = None


@dataclass
class RoundReport:
    """What the wrapper saw in one round (fedctx's results are written from it)."""

    server_round: int
    started: float
    sampled: list[int] = field(default_factory=list)      # node ids
    accepted: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list)
    failures: int = 0
    train_loss: float = math.nan
    aggregated: bool = False
    ray_nodes: int = 0
    evaluation: dict[int, MetricRecord] = field(default_factory=dict)  # node id -> metrics


def _inner_attr(strategy: Strategy, name: str, default: Any) -> Any:
    """An attribute of ``strategy`` or of the strategy it wraps (Flower's DP wrappers)."""
    while strategy is not None:
        if hasattr(strategy, name):
            return getattr(strategy, name)
        strategy = getattr(strategy, "strategy", None)
    return default


def check_record(arrays: Tensors, reference: Tensors, required: Iterable[str],
                 allowed: Iterable[str]) -> str | None:
    """Why ``arrays`` does not match ``reference``, or ``None``.

    ``required`` keys must be present, keys outside ``allowed`` must not; every tensor must have
    the reference's shape and dtype and, if floating, finite values.
    """
    got, required, allowed = set(arrays), set(required), set(allowed)
    if not required <= got <= allowed:
        extra, missing = sorted(got - allowed)[:3], sorted(required - got)[:3]
        return f"arrays: wrong keys (unexpected {extra}, missing {missing})"
    for key in sorted(required):
        tensor, want = arrays[key], reference[key]
        if tuple(tensor.shape) != tuple(want.shape):
            return f"arrays.{key}: shape {tuple(tensor.shape)} != {tuple(want.shape)}"
        if tensor.dtype != want.dtype:
            return f"arrays.{key}: dtype {tensor.dtype} != {want.dtype}"
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            return f"arrays.{key}: non-finite values"
    return None


class StrategyStateError(TypeError):
    """A strategy attribute that a checkpoint cannot hold; the message names it."""


_PLAIN = (type(None), bool, int, float, str)


def encode_state(value: Any, where: str) -> Any:
    """``value`` as tensors and plain types only (``torch.load(weights_only=True)`` reads it
    back): NumPy arrays and scalars, Flower records, Python and NumPy random generators,
    lists, tuples and dicts of these. :class:`StrategyStateError` names anything else."""
    import numpy as np

    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return {"__npscalar__": value.dtype.str, "value": value.item()}
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": {k: v.detach().cpu()
                                    for k, v in value.to_torch_state_dict().items()}}
    if isinstance(value, MetricRecord | ConfigRecord):
        return {f"__{type(value).__name__}__": encode_state(dict(value), where)}
    if isinstance(value, random.Random):
        return {"__random__": encode_state(value.getstate(), where)}
    if isinstance(value, np.random.Generator):
        return {"__np_generator__": encode_state(value.bit_generator.state, where)}
    if isinstance(value, list | tuple):
        items = [encode_state(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict) and all(isinstance(k, _PLAIN) for k in value):
        return {"__dict__": [[k, encode_state(v, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise StrategyStateError(f"{where} ({type(value).__name__}) cannot be saved in a checkpoint "
                             "(tensors, arrays, Flower records and plain types can); give the "
                             "strategy state_dict() and load_state_dict(state) methods that "
                             "declare its state")


def decode_state(value: Any) -> Any:
    """The inverse of :func:`encode_state`."""
    import numpy as np

    if isinstance(value, list):
        return [decode_state(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__ndarray__" in value:
        return value["__ndarray__"].numpy().copy()
    if "__npscalar__" in value:
        return np.dtype(value["__npscalar__"]).type(value["value"])
    if "__arrayrecord__" in value:
        return ArrayRecord(dict(value["__arrayrecord__"]))
    if "__MetricRecord__" in value:
        return MetricRecord(decode_state(value["__MetricRecord__"]))
    if "__ConfigRecord__" in value:
        return ConfigRecord(decode_state(value["__ConfigRecord__"]))
    if "__random__" in value:
        rng = random.Random()
        rng.setstate(_tuples(decode_state(value["__random__"])))
        return rng
    if "__np_generator__" in value:
        state = decode_state(value["__np_generator__"])
        rng = np.random.Generator(getattr(np.random, state["bit_generator"])())
        rng.bit_generator.state = state
        return rng
    if "__tuple__" in value:
        return tuple(decode_state(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: decode_state(v) for k, v in value["__dict__"]}
    return {k: decode_state(v) for k, v in value.items()}


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _is_setting(value: Any) -> bool:
    """A callable set up at construction (an aggregation function, a class, a logger...)."""
    return callable(value) or isinstance(value, logging.Logger)


def strategy_state(strategy: Strategy, initial: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The state of ``strategy`` (and of the strategies it wraps) for a checkpoint: what its
    ``state_dict()`` declares, if it has one; else its attributes, except callables it held
    since construction (``initial``: id -> attributes then). :class:`StrategyStateError` names
    an attribute that cannot be saved."""
    name = type(strategy).__name__
    if callable(getattr(strategy, "state_dict", None)):
        return {"declared": encode_state(strategy.state_dict(), f"{name}.state_dict()")}
    before = initial.get(id(strategy), {})
    attributes: dict[str, Any] = {}
    for attr, value in vars(strategy).items():
        if isinstance(value, Strategy):
            attributes[attr] = {"__strategy__": strategy_state(value, initial)}
        elif _is_setting(value) and before.get(attr, object()) is value:
            continue
        else:
            attributes[attr] = encode_state(value, f"strategy attribute {name}.{attr}")
    return {"attributes": attributes}


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Restore :func:`strategy_state` into ``strategy``."""
    if "declared" in state:
        strategy.load_state_dict(decode_state(state["declared"]))
        return
    for attr, value in state["attributes"].items():
        if isinstance(value, dict) and "__strategy__" in value:
            load_strategy_state(getattr(strategy, attr), value["__strategy__"])
        else:
            setattr(strategy, attr, decode_state(value))


def _strategy_chain(strategy: Any) -> list[Strategy]:
    chain = []
    while isinstance(strategy, Strategy) and strategy not in chain:
        chain.append(strategy)
        strategy = next((v for v in vars(strategy).values() if isinstance(v, Strategy)), None)
    return chain


class _NodesInOrder:
    """The grid, listing its nodes by partition id (then node id): with a seeded ``random``, the
    inner strategy's sampling then depends only on (seed, round) and the partition ids, not on
    the random node ids Flower assigns. Everything else is the grid's own."""

    def __init__(self, grid: Grid, order: Callable[[int], tuple[int, int]]) -> None:
        self._grid, self._order = grid, order

    def get_node_ids(self) -> list[int]:
        return sorted(self._grid.get_node_ids(), key=self._order)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class NormPolicyStrategy(Strategy):
    """Wrap ``strategy`` (any ``flwr.serverapp.strategy.Strategy``) with a norm ``policy``.

    Parameters
    ----------
    strategy : the Flower strategy that samples nodes and aggregates the shared tensors.
    model : the model (its module types decide shared vs normalization tensors; its state is
        the reference for reply screening and the initial normalization state).
    policy : ``average``, ``local``, ``stats-local`` or ``per-context``.
    seed : if given, the inner strategy samples with Python's ``random`` seeded from
        (seed, round), over nodes listed by partition id: reproducible sampling.
    min_replies : rounds with fewer sound replies keep the weights.
    evaluate_when : rounds in which ``configure_evaluate`` sends messages (default: every round).
    contexts : node id -> context, when known up front.
    """

    def __init__(self, strategy: Strategy, model: nn.Module, policy: str = "per-context", *,
                 seed: int | None = None, min_replies: int = 1,
                 evaluate_when: Callable[[int], bool] | None = None,
                 contexts: dict[int, int] | None = None) -> None:
        super().__init__()
        self.strategy = strategy
        self.policy = NormPolicy(policy)
        self.split: StateSplit = split_state(model)
        self.reference: Tensors = {k: v.detach().cpu().clone()
                                   for k, v in model.state_dict().items()}
        self.norm = ServerNormState(self.policy, self.split, self.reference)
        self.seed = seed
        self.min_replies = min_replies
        self.evaluate_when = evaluate_when or (lambda r: True)
        self.nodes: dict[int, NodeInfo] = {n: NodeInfo(context=c)
                                           for n, c in (contexts or {}).items()}
        self.trained: set[int] = set()       # partition ids (node ids if none) holding own norm
        self.round_offset = 0                # rounds finished before a resumed start()
        self.reports: dict[int, RoundReport] = {}
        self.registered_at: float | None = None
        self._arrays_key = _inner_attr(strategy, "arrayrecord_key", "arrays")
        self._asked: set[int] = set()
        # the attributes at construction: callables among them are settings, not state
        self._initial = {id(s): dict(vars(s)) for s in _strategy_chain(strategy)}

    # ------------------------------------------------------------------ nodes
    def client_key(self, node_id: int) -> int:
        """The node's partition id if it told one, else its node id."""
        pid = self.nodes.get(node_id, NodeInfo()).partition_id
        return node_id if pid is None else pid

    def _order(self, node_id: int) -> tuple[int, int]:
        pid = self.nodes.get(node_id, NodeInfo()).partition_id
        return (0, pid, node_id) if pid is not None else (1, node_id, node_id)

    def _context(self, node_id: int) -> int | None:
        return self.nodes.get(node_id, NodeInfo()).context

    def register(self, grid: Grid, timeout: float = 600.0) -> None:
        """Wait for the inner strategy's ``min_available_nodes``, then ask each node not asked
        yet for its partition id, context and size (one ``query`` message each; a ClientApp
        without a query handler answers with an error and is learnt from its train replies)."""
        expected = int(_inner_attr(self.strategy, "min_available_nodes", 0))
        deadline = time.time() + timeout
        while len(node_ids := list(grid.get_node_ids())) < expected and time.time() < deadline:
            time.sleep(0.05)
        new = [n for n in node_ids if n not in self._asked]
        if new:
            messages = [Message(RecordDict({}), message_type=MessageType.QUERY, dst_node_id=n)
                        for n in new]
            for reply in grid.send_and_receive(messages):
                self._asked.add(reply.metadata.src_node_id)
                if not reply.has_error() and "metrics" in reply.content:
                    self._learn(reply.metadata.src_node_id, reply.content["metrics"])
        if self.registered_at is None:
            self.registered_at = time.time()

    def _learn(self, node: int, metrics: MetricRecord) -> None:
        info = self.nodes.setdefault(node, NodeInfo())
        for key, attr in (("partition-id", "partition_id"), ("context", "context"),
                          ("num-examples", "num_examples")):
            if key in metrics:
                setattr(info, attr, int(metrics[key]))

    # ------------------------------------------------------------------ messages
    def _seeded(self, server_round: int, call: Callable[[], Iterable[Message]]) -> list[Message]:
        if self.seed is None:
            return list(call())
        saved = random.getstate()
        random.seed(self.seed * 1_000_003 + server_round)
        try:
            return list(call())
        finally:
            random.setstate(saved)

    def _outgoing(self, messages: list[Message], server_round: int) -> list[Message]:
        """Each inner message with its node's norm tensors added to ``arrays``."""
        out, full_cache = [], {}
        for msg in messages:
            content = RecordDict(dict(msg.content.items()))  # the inner record may be shared
            shared = content[self._arrays_key]
            ctx = self._context(msg.metadata.dst_node_id)
            key = (id(shared), ctx)
            if key not in full_cache:
                norm = ArrayRecord(self.norm.outgoing(ctx))
                full_cache[key] = ArrayRecord({**{k: shared[k] for k in shared.keys()},
                                               **{k: norm[k] for k in norm.keys()}})
            content[self._arrays_key] = full_cache[key]
            config = content.get("config")
            if isinstance(config, ConfigRecord):
                content["config"] = ConfigRecord({**config, POLICY_KEY: str(self.policy),
                                                  "server-round": server_round})
            out.append(Message(content, message_type=msg.metadata.message_type,
                               dst_node_id=msg.metadata.dst_node_id,
                               group_id=msg.metadata.group_id or None))
        return out

    def _shared_record(self, arrays: ArrayRecord) -> ArrayRecord:
        return ArrayRecord({k: arrays[k] for k in self.split.shared if k in arrays})

    def full_arrays(self, shared: ArrayRecord | Tensors, context: int | None = None
                    ) -> ArrayRecord:
        """The whole model: ``shared`` plus the norm tensors the policy gives ``context``."""
        shared_t = shared.to_torch_state_dict() if isinstance(shared, ArrayRecord) else shared
        return ArrayRecord({**{k: shared_t[k] for k in self.split.shared},
                            **self.norm.outgoing(context)})

    # ------------------------------------------------------------------ Flower's interface
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self.register(grid)
        report = RoundReport(server_round, time.time())
        self.reports[server_round] = report
        inner = self._seeded(server_round, lambda: self.strategy.configure_train(
            server_round, self._shared_record(arrays), config, _NodesInOrder(grid, self._order)))
        report.sampled = [m.metadata.dst_node_id for m in inner]
        return self._outgoing(inner, server_round)

    def screen(self, reply: Message) -> str | None:
        """Why a training reply must be rejected, or ``None`` if it is sound: an error, missing
        records, a bad ``num-examples``, wrong keys, shapes, dtypes or non-finite values."""
        if reply.has_error():
            return f"client error: {reply.error.reason}"
        content = reply.content
        if self._arrays_key not in content or "metrics" not in content:
            return f"reply lacks '{self._arrays_key}' or 'metrics'"
        n = content["metrics"].get("num-examples")
        if isinstance(n, bool) or not isinstance(n, int | float) or not n > 0:
            return f"bad num-examples {n!r}"
        if (self.policy is NormPolicy.PER_CONTEXT and "context" not in content["metrics"]
                and self._context(reply.metadata.src_node_id) is None):
            return "per-context: the client's context is unknown (no 'context' metric)"
        required = self.split.shared + self.norm.expected_reply_keys()
        return check_record(content[self._arrays_key].to_torch_state_dict(), self.reference,
                            required, self.reference)

    def _sorted(self, replies: Iterable[Message]) -> list[Message]:
        # Replies arrive in completion order; aggregate in partition order so that float sums,
        # and so the run, are reproducible.
        return sorted(replies, key=lambda r: self._order(r.metadata.src_node_id))

    def _split_reply(self, reply: Message) -> NormUpdate | None:
        """Replace the reply's ``arrays`` by its shared part; return its norm part."""
        record = reply.content[self._arrays_key]
        reply.content[self._arrays_key] = ArrayRecord({k: record[k] for k in self.split.shared})
        keys = self.norm.expected_reply_keys()
        if not keys:
            return None
        m = reply.content["metrics"]
        context = int(m["context"]) if "context" in m else self._context(
            reply.metadata.src_node_id)
        norm = ArrayRecord({k: record[k] for k in keys}).to_torch_state_dict()
        return NormUpdate(0 if context is None else context, int(m["num-examples"]), norm)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        report = self.reports.setdefault(server_round, RoundReport(server_round, time.time()))
        replies = self._sorted(replies)
        accepted = self._screen_all(replies, report)
        if len(accepted) < self.min_replies:
            log.warning("round %d: only %d valid replies (< %d); weights kept", server_round,
                        len(accepted), self.min_replies)
            return None, None
        updates = [u for r in accepted if (u := self._split_reply(r)) is not None]
        losses = [(float(r.content["metrics"].get("train-loss", math.nan)),
                   int(r.content["metrics"]["num-examples"])) for r in accepted]
        report.train_loss = sum(lo * n for lo, n in losses) / sum(n for _, n in losses)
        report.ray_nodes = len({int(r.content["metrics"].get("ray-node", 0)) for r in accepted})
        shared, metrics = self.strategy.aggregate_train(server_round, accepted)
        self.norm.update(updates)
        report.aggregated = shared is not None
        if shared is None:
            return None, metrics
        new = shared.to_torch_state_dict()
        full = ArrayRecord({**{k: new[k].to(self.reference[k].dtype) for k in self.split.shared},
                            **self.norm.outgoing(None)})
        return full, metrics

    def _screen_all(self, replies: list[Message], report: RoundReport) -> list[Message]:
        """Screen replies; count rejections and failures on ``report``; learn contexts."""
        accepted = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if not reply.has_error():
                if "metrics" in reply.content:
                    self._learn(node, reply.content["metrics"])
                self.trained.add(self.client_key(node))  # it holds its own norm state now
            reason = self.screen(reply)
            if reason is None:
                accepted.append(reply)
                continue
            client = self.client_key(node)
            log.warning("round %d: rejected reply of client %s: %s", report.server_round,
                        client, reason)
            if reply.has_error():
                report.failures += 1
            else:
                report.rejections.append({"client": client, "reason": reason})
        report.failures += max(0, len(report.sampled) - len(replies))
        report.accepted = len(accepted) if len(accepted) >= self.min_replies else 0
        return accepted

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.evaluate_when(server_round):
            return []
        inner = self._seeded(server_round, lambda: self.strategy.configure_evaluate(
            server_round, self._shared_record(arrays), config, _NodesInOrder(grid, self._order)))
        if not self.policy.evaluates_on_server:
            # A node that never trained holds only the initial norm state: as in FedBN, only
            # clients with their own normalization evaluate.
            inner = [m for m in inner if self.client_key(m.metadata.dst_node_id) in self.trained]
        return self._outgoing(inner, server_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        server_round += self.round_offset
        replies = self._sorted(replies)
        report = self.reports.setdefault(server_round, RoundReport(server_round, time.time()))
        for reply in replies:
            if reply.has_error():
                log.warning("evaluation failed on node %s: %s", reply.metadata.src_node_id,
                            reply.error.reason)
            elif "metrics" in reply.content:
                report.evaluation[reply.metadata.src_node_id] = reply.content["metrics"]
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info("NormPolicyStrategy: norm policy %r around %s", str(self.policy),
                 type(self.strategy).__name__)
        self.strategy.summary()

    # ------------------------------------------------------------------ state
    def norm_for_context(self, context: int) -> Tensors | None:
        """Norm tensors to evaluate on ``context`` at the server (``None`` for ``local`` and
        ``stats-local``, whose statistics only the clients hold)."""
        return self.norm.for_evaluation(context)

    def partition_of(self, node_id: int) -> int | None:
        return self.nodes.get(node_id, NodeInfo()).partition_id

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: norm state, clients that hold their own norm state
        (by partition id) and the inner strategy's state (FedAdam's moments, ...).

        Only tensors and plain types (``torch.load(weights_only=True)`` reads them); an inner
        attribute that cannot be saved is a :class:`StrategyStateError` naming it (a strategy
        declares its state with ``state_dict()`` / ``load_state_dict(state)``)."""
        return {"norm": self.norm.state_dict(), "trained": sorted(self.trained),
                "inner": strategy_state(self.strategy, self._initial)}

    def load_state_dict(self, state: dict[str, Any], finished_rounds: int) -> None:
        """Restore :meth:`state_dict`; the next ``start()`` continues after ``finished_rounds``."""
        self.norm.load_state_dict(state["norm"])
        self.trained = set(state["trained"])
        load_strategy_state(self.strategy, state["inner"])
        self.round_offset = finished_rounds
