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

Node -> context (and partition id, size, label counts) is learnt from a ``query`` message sent
once to each new node (answered by :func:`fedctx.federated.norm_client.describe`), else from the
node's first accepted train reply; ``contexts=`` gives it up front.

Every train reply goes through one screening step (:data:`SCREENING`, one named check per
rule); a rejected reply is counted by check in the round's :class:`RoundReport` and the round
goes on while at least ``min_replies`` replies are sound. A client that raises, dies or does not
answer within ``round_timeout`` seconds counts as a failure; a round with too few sound replies
keeps the model and is listed in ``failed_rounds``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    MultiKrum,
    Result,
    Strategy,
)
from torch import nn

from fedctx.federated.cohort import SUMS_KEY, CohortSums
from fedctx.federated.params import (
    Rule,
    StateSplit,
    coordinate_median,
    krum,
    split_state,
    trimmed_mean,
    weighted_average,
)
from fedctx.federated.policy import NormPolicy, NormUpdate, ServerNormState, summed_parts
from fedctx.federated.records import sub_record
from fedctx.federated.startup import mark

log = logging.getLogger("fedctx")
Tensors = dict[str, torch.Tensor]
POLICY_KEY = "norm-policy"
# train-reply metrics: always required, and the optional ones fedctx's clients send
REQUIRED_METRICS = ("num-examples", "context")
OPTIONAL_METRICS = ("train-loss", "partition-id", "ray-node", "context-counts", "confidence",
                    "unlabelled-mask-rate")
RATE_METRICS = ("confidence", "unlabelled-mask-rate")     # floats in [0, 1]
# checks a member of a summed cohort skips: its reply holds metrics only, and the worker refused
# tensors that are not finite before summing (fedctx.federated.norm_client.fold)
SUMMED_SKIPS = frozenset({"records", "arrays"})
AVERAGING = (FedAvg, FedProx)  # strategies whose aggregate is the num-examples-weighted mean
AVERAGED_METRICS = ("train-loss", *RATE_METRICS)           # num-examples-weighted in the record
# registration queries in flight at once: Flower's in-memory link state scans every stored
# message to deliver one, so sending all 10,000 queries at once cost O(n^2) (10,000 nodes:
# minutes); batches keep that O(n * QUERY_BATCH) (docs/results/scale.md)
QUERY_BATCH = 64


@dataclass
class NodeInfo:
    """What a node told about itself (``None``: it did not say); ``registered``: it told it in
    answer to the ``query`` (or ``contexts=``), not in a train reply."""

    partition_id: int | None = None
    context: int | None = None
    num_examples: int | None = None
    registered: bool = False


@dataclass
class RoundReport:
    """What the wrapper saw in one round (fedctx's results are written from it)."""

    server_round: int
    started: float
    sampled: list[int] = field(default_factory=list)      # node ids
    accepted: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list)  # client, check, reason
    failures: int = 0
    train_loss: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)  # AVERAGED_METRICS reported
    aggregated: bool = False
    failed: bool = False       # too few sound replies (or the inner strategy gave no model)
    replied: float | None = None     # time.time() when the replies reached aggregate_train
    merged: float | None = None      # ... and when aggregate_train returned
    ray_nodes: int = 0
    evaluation: dict[int, MetricRecord] = field(default_factory=dict)  # node id -> metrics

    @property
    def rejected_by_check(self) -> dict[str, int]:
        """Number of rejected replies per screening check."""
        return dict(Counter(r["check"] for r in self.rejections))


def _inner_attr(strategy: Strategy, name: str, default: Any) -> Any:
    """An attribute of ``strategy`` or of the strategy it wraps (Flower's DP wrappers)."""
    while strategy is not None:
        if hasattr(strategy, name):
            return getattr(strategy, name)
        strategy = getattr(strategy, "strategy", None)
    return default


def norm_rule(strategy: Strategy) -> Rule:
    """The rule that merges normalization tensors, as robust as ``strategy``'s for the shared
    weights: what the strategy (or one it wraps) declares in a ``norm_rule`` attribute (a
    :data:`~fedctx.federated.params.Rule`), else by type of Flower's robust strategies: Krum /
    MultiKrum, FedMedian, FedTrimmedAvg; else the example-weighted mean."""
    declared = _inner_attr(strategy, "norm_rule", None)
    if declared is not None:
        return declared
    while strategy is not None:
        if isinstance(strategy, MultiKrum):
            return krum(strategy.num_malicious_nodes, strategy.num_nodes_to_select)
        if isinstance(strategy, FedMedian):
            return coordinate_median
        if isinstance(strategy, FedTrimmedAvg):
            return trimmed_mean(strategy.beta)
        strategy = getattr(strategy, "strategy", None)
    return weighted_average


def _count(value: Any) -> int | None:
    """``value`` as a non-negative integer count (an int, or a float with an integer value),
    else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if value >= 0 else None


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
    floats = [k for k in sorted(required) if arrays[k].dtype.is_floating_point]
    # One fused pass first: a NaN or inf makes its tensor's norm non-finite (9x faster than a
    # check per tensor); only then, tensor by tensor (a huge finite tensor's norm can overflow).
    norms = torch._foreach_norm([arrays[k] for k in floats]) if floats else []
    if not all(math.isfinite(float(n)) for n in norms):
        for key in floats:
            if not bool(torch.isfinite(arrays[key]).all()):
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


def _model_contexts(model: nn.Module) -> int | None:
    """``K`` of the model's context-aware layers (their ``num_contexts``), or ``None``."""
    ks = [m.num_contexts for m in model.modules()
          if isinstance(getattr(m, "num_contexts", None), int)]
    return max(ks) if ks else None


def _strategy_chain(strategy: Any) -> list[Strategy]:
    chain = []
    while isinstance(strategy, Strategy) and strategy not in chain:
        chain.append(strategy)
        strategy = next((v for v in vars(strategy).values() if isinstance(v, Strategy)), None)
    return chain


class _NodesInOrder:
    """The grid, listing its nodes by partition id (then node id): with a seeded ``random``, the
    inner strategy's sampling then depends only on (seed, round) and the partition ids, not on
    the random node ids Flower assigns. ``in_order`` sorts the grid's node ids. Everything else
    is the grid's own."""

    def __init__(self, grid: Grid, in_order: Callable[[Iterable[int]], list[int]]) -> None:
        self._grid, self._in_order = grid, in_order

    def get_node_ids(self) -> list[int]:
        return self._in_order(self._grid.get_node_ids())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class NormPolicyStrategy(Strategy):
    """Wrap ``strategy`` (any ``flwr.serverapp.strategy.Strategy``) with a norm ``policy``.

    Parameters
    ----------
    strategy : the Flower strategy that samples nodes and aggregates the shared tensors; its
        rule (Krum, median, trimmed mean, or a declared ``norm_rule``) also merges the
        normalization tensors (:func:`norm_rule`).
    model : the model (its module types decide shared vs normalization tensors; its state is
        the reference for reply screening and the initial normalization state).
    policy : ``average``, ``local``, ``stats-local`` or ``per-context``.
    seed : if given, the inner strategy samples with Python's ``random`` seeded from
        (seed, round), over nodes listed by partition id: reproducible sampling.
    min_replies : rounds with fewer sound replies keep the weights (a failed round).
    evaluate_when : rounds in which ``configure_evaluate`` sends messages (default: every round).
    contexts : node id -> context, when known up front.
    round_timeout : seconds a round (and the registration query) waits for replies; a node that
        has not answered by then counts as failed. ``start`` uses it unless given ``timeout``.
    max_examples : the largest ``num-examples`` a reply may claim; 0: the size the node
        registered with (no bound for a node that did not say).
    num_contexts : ``K``, for checking ``context`` and ``context-counts`` (default: the
        model's context-aware layers' ``num_contexts``; ``None``: not checked).
    extra_metrics : train-reply metric names accepted beyond fedctx's own
        (:data:`REQUIRED_METRICS`, :data:`OPTIONAL_METRICS`).
    """

    def __init__(self, strategy: Strategy, model: nn.Module, policy: str = "per-context", *,
                 seed: int | None = None, min_replies: int = 1,
                 evaluate_when: Callable[[int], bool] | None = None,
                 contexts: dict[int, int] | None = None, round_timeout: float = 600.0,
                 max_examples: int = 0, num_contexts: int | None = None,
                 extra_metrics: Iterable[str] = ()) -> None:
        super().__init__()
        self.strategy = strategy
        self.policy = NormPolicy(policy)
        self.split: StateSplit = split_state(model)
        self.reference: Tensors = {k: v.detach().cpu().clone()
                                   for k, v in model.state_dict().items()}
        self.norm = ServerNormState(self.policy, self.split, self.reference, norm_rule(strategy))
        self.seed = seed
        self.min_replies = min_replies
        self.evaluate_when = evaluate_when or (lambda r: True)
        self.round_timeout = round_timeout
        self.max_examples = max_examples
        self.num_contexts = num_contexts if num_contexts is not None else _model_contexts(model)
        self.allowed_metrics = frozenset((*REQUIRED_METRICS, *OPTIONAL_METRICS, *extra_metrics))
        self.nodes: dict[int, NodeInfo] = {n: NodeInfo(context=c, registered=True)
                                           for n, c in (contexts or {}).items()}
        self.trained: set[int] = set()       # partition ids (node ids if none) holding own norm
        self.label_counts: dict[int, list[int]] = {}  # client key -> registered label counts
        self._distribution: list[float] | None = None  # label_distribution(), kept current
        self._label_counts_state: dict[str, torch.Tensor] | None = None  # state_dict's, cached
        self.source_confidence: float | None = None   # last round's labelled confidence
        self.failed_rounds: list[int] = []
        self.round_offset = 0                # rounds finished before a resumed start()
        self.reports: dict[int, RoundReport] = {}
        self.registered_at: float | None = None
        self._arrays_key = _inner_attr(strategy, "arrayrecord_key", "arrays")
        self._asked: set[int] = set()
        self._ordered: tuple[set[int], list[int]] | None = None  # node ids, sorted by _order
        # the attributes at construction: callables among them are settings, not state
        self._initial = {id(s): dict(vars(s)) for s in _strategy_chain(strategy)}

    # ------------------------------------------------------------------ nodes
    def client_key(self, node_id: int) -> int:
        """The node's partition id if it told one, else its node id."""
        pid = self.nodes.get(node_id, NodeInfo()).partition_id
        return node_id if pid is None else pid

    def _order(self, node_id: int) -> tuple[int, int, int]:
        pid = self.nodes.get(node_id, NodeInfo()).partition_id
        return (0, pid, node_id) if pid is not None else (1, node_id, node_id)

    def _in_order(self, node_ids: Iterable[int]) -> list[int]:
        """``node_ids`` sorted by :meth:`_order`. The sorted list is kept while the nodes and
        their partition ids stay the same: sorting 10,000 nodes took 30 ms, twice a round."""
        ids = set(node_ids)
        if self._ordered is None or self._ordered[0] != ids:
            self._ordered = (ids, sorted(ids, key=self._order))
        return list(self._ordered[1])

    def _context(self, node_id: int) -> int | None:
        return self.nodes.get(node_id, NodeInfo()).context

    def register(self, grid: Grid, timeout: float = 600.0) -> None:
        """Wait for the inner strategy's ``min_available_nodes``, then ask each node not asked
        yet for its partition id, context, size and label counts (one ``query`` message each,
        :data:`QUERY_BATCH` at a time, all within ``round_timeout``: nodes not asked by then
        are asked at the next round; a ClientApp without a query handler answers with an error
        and is learnt from its first accepted train reply)."""
        mark("registration")  # start-up trace ($FEDCTX_STARTUP_TRACE): the first call's start
        expected = int(_inner_attr(self.strategy, "min_available_nodes", 0))
        deadline = time.time() + timeout
        while len(node_ids := list(grid.get_node_ids())) < expected and time.time() < deadline:
            time.sleep(0.05)
        new = [n for n in node_ids if n not in self._asked]
        if new:
            until = time.time() + self.round_timeout
            for first in range(0, len(new), QUERY_BATCH):
                if (left := until - time.time()) <= 0:
                    break  # the others are asked at the next round
                batch = new[first:first + QUERY_BATCH]
                self._asked.update(batch)
                messages = [Message(RecordDict({}), message_type=MessageType.QUERY,
                                    dst_node_id=n) for n in batch]
                for reply in grid.send_and_receive(messages, timeout=left):
                    if not reply.has_error() and "metrics" in reply.content:
                        self._register(reply.metadata.src_node_id, reply.content["metrics"])
            self._label_counts_changed()
            self._ordered = None  # a node listed before it answered now has its partition id
        if self.registered_at is None:
            self.registered_at = time.time()

    def _register(self, node: int, metrics: MetricRecord) -> None:
        """Learn what a node's ``query`` reply says (values that are not counts are ignored)."""
        info = self.nodes.setdefault(node, NodeInfo())
        info.registered = True
        for key, attr in (("partition-id", "partition_id"), ("context", "context"),
                          ("num-examples", "num_examples")):
            if (value := _count(metrics.get(key))) is not None:
                setattr(info, attr, value)
        labels = metrics.get("label-counts")
        if isinstance(labels, list) and labels and all(_count(c) is not None for c in labels):
            known = next(iter(self.label_counts.values()), labels)
            if len(labels) == len(known):
                self.label_counts[self.client_key(node)] = [int(c) for c in labels]

    def _learn_from_train(self, node: int, metrics: MetricRecord, accepted: bool) -> None:
        """A node that did not register: its partition id from any reply (to name it), its
        context from its first accepted reply."""
        info = self.nodes.setdefault(node, NodeInfo())
        if info.registered:
            return
        if info.partition_id is None:
            info.partition_id = _count(metrics.get("partition-id"))
            self._ordered = None
        if accepted and info.context is None:
            info.context = int(metrics["context"])

    def label_distribution(self) -> list[float] | None:
        """The labelled nodes' summed registered label counts, normalised to sum 1 (``None``:
        no node registered label counts). Summed once per registration, not per message: with
        10,000 registered nodes the sum took 13 ms, paid for every sampled node's config."""
        return self._distribution

    def _label_counts_changed(self) -> None:
        self._distribution = self._sum_label_counts()
        self._label_counts_state = None

    def _sum_label_counts(self) -> list[float] | None:
        if not self.label_counts:
            return None
        totals = [sum(c) for c in zip(*self.label_counts.values(), strict=True)]
        return [t / sum(totals) for t in totals] if sum(totals) > 0 else None

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

    def _config(self, config: ConfigRecord, message_type: str, server_round: int
                ) -> ConfigRecord:
        """The inner strategy's config plus the policy, the round and, for training, the
        labelled nodes' label distribution and last round's source confidence."""
        extra: dict[str, Any] = {POLICY_KEY: str(self.policy), "server-round": server_round}
        if message_type == MessageType.TRAIN:
            if (distribution := self.label_distribution()) is not None:
                extra["label-distribution"] = distribution
            if self.source_confidence is not None:
                extra["source-confidence"] = self.source_confidence
        return ConfigRecord({**config, **extra})

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
                content["config"] = self._config(config, msg.metadata.message_type,
                                                 server_round)
            out.append(Message(content, message_type=msg.metadata.message_type,
                               dst_node_id=msg.metadata.dst_node_id,
                               group_id=msg.metadata.group_id or None))
        return out

    def _shared_record(self, arrays: ArrayRecord) -> ArrayRecord:
        return ArrayRecord({k: arrays[k] for k in self.split.shared if k in arrays})

    # ------------------------------------------------------------------ Flower's interface
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None
              ) -> Result:
        """Flower's ``Strategy.start``; each round waits ``timeout`` seconds for replies
        (default: ``round_timeout``)."""
        return super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds,
                             timeout=self.round_timeout if timeout is None else timeout,
                             train_config=train_config, evaluate_config=evaluate_config,
                             evaluate_fn=evaluate_fn)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self.register(grid)
        report = RoundReport(server_round, time.time())
        self.reports[server_round] = report
        inner = self._seeded(server_round, lambda: self.strategy.configure_train(
            server_round, self._shared_record(arrays), config, _NodesInOrder(grid, self._in_order)))
        report.sampled = [m.metadata.dst_node_id for m in inner]
        return self._outgoing(inner, server_round)

    # ------------------------------------------------------------------ screening
    def screening(self) -> tuple[tuple[str, Callable[[Message], str | None]], ...]:
        """The screening step: (check, function) pairs, in order; each function gives the
        reason a train reply breaks its rule, or ``None`` (it may assume the earlier checks
        passed)."""
        return (("records", self.check_records), ("metrics", self.check_metric_names),
                ("num-examples", self.check_num_examples), ("context", self.check_context),
                ("context-counts", self.check_context_counts),
                ("train-loss", self.check_train_loss), ("rates", self.check_rates),
                ("arrays", self.check_arrays))

    def failed_check(self, reply: Message, skip: frozenset[str] = frozenset()
                     ) -> tuple[str, str] | None:
        """(check, reason) of the first screening check a train reply fails, or ``None``;
        the checks named in ``skip`` are not run."""
        for check, rule in self.screening():
            if check not in skip and (reason := rule(reply)) is not None:
                return check, reason
        return None

    def screen(self, reply: Message) -> str | None:
        """Why a train reply must be rejected (a client error or a failed screening check),
        or ``None`` if it is sound."""
        if reply.has_error():
            return f"client error: {reply.error.reason}"
        failed = self.failed_check(reply)
        return None if failed is None else failed[1]

    def check_records(self, reply: Message) -> str | None:
        """Exactly an ArrayRecord under the arrays key and a MetricRecord ``metrics``."""
        content = reply.content
        got = sorted(content.keys())
        if (got != sorted((self._arrays_key, "metrics"))
                or not isinstance(content[self._arrays_key], ArrayRecord)
                or not isinstance(content["metrics"], MetricRecord)):
            return (f"records: expected ArrayRecord '{self._arrays_key}' and MetricRecord "
                    f"'metrics', got {got}")
        return None

    def check_metric_names(self, reply: Message) -> str | None:
        """Every required metric, no metric outside the accepted ones."""
        names = set(reply.content["metrics"])
        missing = sorted(set(REQUIRED_METRICS) - names)
        extra = sorted(names - self.allowed_metrics)
        if missing or extra:
            return f"metrics: missing {missing}, unexpected {extra[:3]}"
        return None

    def _example_bound(self, node: int) -> tuple[int | None, str]:
        if self.max_examples:
            return self.max_examples, "max_examples"
        return self.nodes.get(node, NodeInfo()).num_examples, "the client's registered size"

    def check_num_examples(self, reply: Message) -> str | None:
        """A positive integer, at most the bound (``max_examples`` or the registered size)."""
        value = reply.content["metrics"]["num-examples"]
        n = _count(value)
        if n is None or n == 0:
            return f"num-examples {value!r} is not a positive finite integer"
        bound, what = self._example_bound(reply.metadata.src_node_id)
        if bound is not None and n > bound:
            return f"num-examples {n} above {bound} ({what})"
        return None

    def check_context(self, reply: Message) -> str | None:
        """A context id in ``[0, K)``, the one the client registered with."""
        value = reply.content["metrics"]["context"]
        k = _count(value)
        if k is None or (self.num_contexts is not None and k >= self.num_contexts):
            return f"context {value!r} is not a context id in [0, {self.num_contexts})"
        registered = self._context(reply.metadata.src_node_id)
        if registered is not None and k != registered:
            return f"context {k} differs from the registered context {registered}"
        return None

    def check_context_counts(self, reply: Message) -> str | None:
        """If present: K non-negative integers summing to ``num-examples``."""
        metrics = reply.content["metrics"]
        counts = metrics.get("context-counts")
        if counts is None:
            return None
        if not isinstance(counts, list) or any(_count(c) is None for c in counts):
            return f"context-counts {counts!r} are not non-negative integers"
        if self.num_contexts is not None and len(counts) != self.num_contexts:
            return f"context-counts has {len(counts)} entries, not K = {self.num_contexts}"
        if sum(int(c) for c in counts) != int(metrics["num-examples"]):
            return (f"context-counts sum to {sum(int(c) for c in counts)}, not num-examples "
                    f"{int(metrics['num-examples'])}")
        return None

    def check_train_loss(self, reply: Message) -> str | None:
        """If present: a finite number."""
        loss = reply.content["metrics"].get("train-loss", 0.0)
        if isinstance(loss, bool) or not isinstance(loss, int | float) or not math.isfinite(loss):
            return f"train-loss {loss!r} is not a finite number"
        return None

    def check_rates(self, reply: Message) -> str | None:
        """If present: ``confidence`` and ``unlabelled-mask-rate`` are numbers in [0, 1]."""
        metrics = reply.content["metrics"]
        for key in RATE_METRICS:
            value = metrics.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0.0 <= value <= 1.0:
                return f"{key} {value!r} is not a number in [0, 1]"
        return None

    def check_arrays(self, reply: Message) -> str | None:
        """The policy's keys, with the model's shapes and dtypes, finite values."""
        required = self.split.shared + self.norm.expected_reply_keys()
        return check_record(reply.content[self._arrays_key].to_torch_state_dict(),
                            self.reference, required, self.reference)

    def _screen_all(self, replies: list[Message], report: RoundReport,
                    skip: Callable[[Message], frozenset[str]] | None = None) -> list[Message]:
        """Screen replies (without the checks ``skip(reply)`` names); count rejections (by
        check) and failures (errors, no reply) on ``report``; learn what unregistered nodes say
        about themselves."""
        accepted = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                report.failures += 1
                log.warning("round %d: client %s failed: %s", report.server_round,
                            self.client_key(node), reply.error.reason)
                continue
            failed = self.failed_check(reply, skip(reply) if skip else frozenset())
            if "metrics" in reply.content and isinstance(reply.content["metrics"], MetricRecord):
                self._learn_from_train(node, reply.content["metrics"], failed is None)
            self.trained.add(self.client_key(node))  # it holds its own norm state now
            if failed is None:
                accepted.append(reply)
                continue
            check, reason = failed
            client = self.client_key(node)
            log.warning("round %d: rejected reply of client %s: %s", report.server_round,
                        client, reason)
            report.rejections.append({"client": client, "check": check, "reason": reason})
        replied = {r.metadata.src_node_id for r in replies}
        silent = [self.client_key(n) for n in report.sampled if n not in replied]
        if silent:
            log.warning("round %d: no reply from clients %s (dead, or hung past the %.0f s "
                        "round timeout)", report.server_round, sorted(silent),
                        self.round_timeout)
        report.failures += len(silent)
        report.accepted = len(accepted)
        return accepted

    # ------------------------------------------------------------------ aggregation
    def _sorted(self, replies: Iterable[Message]) -> list[Message]:
        # Replies arrive in completion order; aggregate in partition order so that float sums,
        # and so the run, are reproducible.
        return sorted(replies, key=lambda r: self._order(r.metadata.src_node_id))

    def _split_reply(self, reply: Message) -> NormUpdate | None:
        """Replace the reply's ``arrays`` by its shared part; return its norm part."""
        record = reply.content[self._arrays_key]
        reply.content[self._arrays_key] = sub_record(record, self.split.shared)
        keys = self.norm.expected_reply_keys()
        if not keys:
            return None
        return NormUpdate.from_metrics(reply.content["metrics"],
                                       sub_record(record, keys).to_torch_state_dict())

    @staticmethod
    def _common_metrics(replies: list[Message]) -> None:
        """Keep in each reply only the metrics every reply has (Flower's strategies refuse
        replies whose metric names differ, e.g. labelled and unlabelled clients')."""
        common = set.intersection(*(set(r.content["metrics"]) for r in replies))
        for r in replies:
            r.content["metrics"] = MetricRecord({k: v for k, v in r.content["metrics"].items()
                                                 if k in common})

    @staticmethod
    def _weighted_metric(replies: list[Message], key: str) -> float | None:
        """The ``num-examples``-weighted mean of metric ``key`` over the replies that carry
        it (``None``: none does)."""
        pairs = [(float(m[key]), int(m["num-examples"]))
                 for m in (r.content["metrics"] for r in replies) if key in m]
        return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else None

    def _record_metrics(self, accepted: list[Message], report: RoundReport) -> None:
        for key in AVERAGED_METRICS:
            if (value := self._weighted_metric(accepted, key)) is not None:
                report.metrics[key] = value
        report.train_loss = report.metrics.get("train-loss", math.nan)
        report.ray_nodes = len({int(r.content["metrics"].get("ray-node", 0)) for r in accepted})

    def _fail(self, report: RoundReport, why: str) -> tuple[None, None]:
        """Record a failed round: the model and norm state stay as they were."""
        log.warning("round %d failed: %s; weights kept", report.server_round, why)
        report.failed, report.accepted = True, 0
        self.failed_rounds.append(report.server_round)
        return None, None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, then: shared tensors by the inner strategy, norm tensors by the policy
        (with the inner strategy's rule), both only if at least ``min_replies`` are sound."""
        server_round += self.round_offset
        report = self.reports.setdefault(server_round, RoundReport(server_round, time.time()))
        report.replied = time.time()
        try:
            return self._aggregate_train(server_round, replies, report)
        finally:
            report.merged = time.time()

    def _aggregate_train(self, server_round: int, replies: Iterable[Message],
                         report: RoundReport) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self._sorted(replies)
        if any(SUMS_KEY in r.content for r in replies if not r.has_error()):
            return self._aggregate_sums(replies, report)
        accepted = self._screen_all(replies, report)
        if not self._enough(accepted, report):
            return None, None
        updates = [u for r in accepted if (u := self._split_reply(r)) is not None]
        self._common_metrics(accepted)
        shared, metrics = self.strategy.aggregate_train(server_round, accepted)
        if shared is None:
            return self._fail(report, f"{type(self.strategy).__name__} aggregated no model")
        self.norm.update(updates)
        new = shared.to_torch_state_dict()
        return self._merged(report, {k: new[k].to(self.reference[k].dtype)
                                     for k in self.split.shared}), metrics

    def _enough(self, kept: list[Message], report: RoundReport) -> bool:
        """Whether ``kept`` holds at least ``min_replies`` replies: then their metrics are
        recorded; else the round fails."""
        if len(kept) < self.min_replies:
            self._fail(report, f"only {len(kept)} sound replies (< {self.min_replies})")
            return False
        self._record_metrics(kept, report)
        return True

    def _merged(self, report: RoundReport, shared: dict[str, torch.Tensor]) -> ArrayRecord:
        """The round's model: the merged ``shared`` tensors and the norm state the policy sends
        to every client; the round is recorded as aggregated."""
        self.source_confidence = report.metrics.get("confidence")  # round r+1's config
        report.aggregated = True
        return ArrayRecord({**shared, **self.norm.outgoing(None)})

    # ------------------------------------------------------------------ summed cohorts
    def sums_unsupported(self) -> str | None:
        """Why this strategy cannot aggregate summed cohorts (:class:`CohortSums`), or
        ``None``: the inner strategy must be Flower's FedAvg or FedProx weighting by
        ``num-examples`` (their aggregate is the weighted mean that sums give), the norm rule the
        weighted average, and the screening fedctx's own (a worker runs only part of it)."""
        inner = self.strategy
        if type(inner) not in AVERAGING:
            return (f"{type(inner).__name__} does not aggregate by the num-examples-weighted "
                    "mean (FedAvg and FedProx do)")
        if getattr(inner, "weighted_by_key", None) != "num-examples":
            return f"{type(inner).__name__} weights by {inner.weighted_by_key!r}"
        if self.norm.rule is not weighted_average:
            return "the norm tensors are merged by a robust rule"
        if type(self).screening is not NormPolicyStrategy.screening:
            return f"{type(self).__name__} screens replies its own way"
        return None

    def _aggregate_sums(self, replies: list[Message], report: RoundReport
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``aggregate_train`` over summed cohorts: screen each member's metrics; drop a cohort
        holding a member the screening rejects (its tensors are in the cohort's sums) or whose
        sums' weight is not its members' ``num-examples``; a reply of its own (a member sent
        alone) is screened in full and summed here; then shared = total sum / total weight, the
        norm state from the sums, metrics by the inner strategy's rule."""
        if (why := self.sums_unsupported()) is not None:
            raise ValueError(f"summed cohorts: {why}")
        accepted = self._screen_all(
            replies, report, skip=lambda r: SUMMED_SKIPS if SUMS_KEY in r.content else frozenset())
        cohort_of = {id(r): int(r.content[SUMS_KEY]["cohort"]) for r in replies
                     if not r.has_error() and SUMS_KEY in r.content}
        sums = {cohort_of[id(r)]: CohortSums.from_records(r.content) for r in replies
                if id(r) in cohort_of and "members" in r.content[SUMS_KEY]}
        accepted_ids = {id(r) for r in accepted}
        void: dict[int, str] = {}
        for r in replies:
            if id(r) in cohort_of and id(r) not in accepted_ids:
                void.setdefault(cohort_of[id(r)], f"summed with the rejected reply of client "
                                                  f"{self.client_key(r.metadata.src_node_id)}")
        for cohort, part in sums.items():
            weight = sum(int(r.content["metrics"]["num-examples"]) for r in accepted
                         if cohort_of.get(id(r)) == cohort)
            if cohort not in void and weight != part.total.weight:
                void[cohort] = (f"the cohort's sums weigh {part.total.weight:g}, its clients' "
                                f"num-examples {weight}")
        kept = []
        for r in accepted:
            cohort = cohort_of.get(id(r))
            if cohort is None or (cohort in sums and cohort not in void):
                kept.append(r)
                continue
            reason = void.get(cohort, "its cohort's sums did not arrive")
            client = self.client_key(r.metadata.src_node_id)
            log.warning("round %d: rejected reply of client %s: %s", report.server_round,
                        client, reason)
            report.rejections.append({"client": client, "check": "cohort", "reason": reason})
        report.accepted = len(kept)
        if not self._enough(kept, report):
            return None, None
        total = CohortSums()
        for r in kept:  # in partition order: a cohort at its first folded member
            if id(r) not in cohort_of:
                total.merge(self._reply_sums(r))
            elif "members" in r.content[SUMS_KEY]:
                total.merge(sums[cohort_of[id(r)]])
        self._common_metrics(kept)
        contents = [RecordDict({"metrics": r.content["metrics"]}) for r in kept]
        metrics = self.strategy.train_metrics_aggr_fn(contents, self.strategy.weighted_by_key)
        self.norm.update_from_sums(total.total, total.by_context)
        shared = total.total.mean({k: self.reference[k] for k in self.split.shared})
        return self._merged(report, shared), metrics

    def _reply_sums(self, reply: Message) -> CohortSums:
        """One client's own train reply as sums (as its worker would have summed it)."""
        update = NormUpdate.from_metrics(reply.content["metrics"], {})
        tensors = reply.content[self._arrays_key].to_torch_state_dict()
        total, by_context = summed_parts(self.policy, tensors, self.split.norm, update)
        part = CohortSums()
        part.add(total, update.num_examples, by_context)
        return part

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.evaluate_when(server_round):
            return []
        inner = self._seeded(server_round, lambda: self.strategy.configure_evaluate(
            server_round, self._shared_record(arrays), config, _NodesInOrder(grid, self._in_order)))
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

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: norm state, clients that hold their own norm state
        (by partition id), the inner strategy's state (FedAdam's moments, ...), the failed
        rounds, the registered label counts and the last source confidence.

        Only tensors and plain types (``torch.load(weights_only=True)`` reads them); an inner
        attribute that cannot be saved is a :class:`StrategyStateError` naming it (a strategy
        declares its state with ``state_dict()`` / ``load_state_dict(state)``)."""
        if self._label_counts_state is None:  # as tensors: pickling 10,000 lists took 64 ms
            keys = sorted(self.label_counts)
            self._label_counts_state = {
                "clients": torch.tensor(keys, dtype=torch.int64),
                "counts": (torch.tensor([self.label_counts[k] for k in keys], dtype=torch.int64)
                           if keys else torch.zeros(0, 0, dtype=torch.int64))}
        return {"norm": self.norm.state_dict(),
                "trained": torch.tensor(sorted(self.trained), dtype=torch.int64),
                "inner": strategy_state(self.strategy, self._initial),
                "failed_rounds": list(self.failed_rounds),
                "label_counts": self._label_counts_state,
                "source_confidence": self.source_confidence}

    def load_state_dict(self, state: dict[str, Any], finished_rounds: int) -> None:
        """Restore :meth:`state_dict`; the next ``start()`` continues after ``finished_rounds``."""
        self.norm.load_state_dict(state["norm"])
        self.trained = {int(k) for k in state["trained"]}  # a tensor (a list before 2026-11-24)
        load_strategy_state(self.strategy, state["inner"])
        self.failed_rounds = list(state.get("failed_rounds", []))
        saved = state.get("label_counts", {})
        if "counts" in saved:  # {"clients": (N,), "counts": (N, classes)}
            self.label_counts = {int(k): [int(c) for c in row] for k, row in
                                 zip(saved["clients"].tolist(), saved["counts"].tolist(),
                                     strict=True)}
        else:  # checkpoints written before 2026-11-24: {client: [counts]}
            self.label_counts = {int(k): list(v) for k, v in saved.items()}
        self._label_counts_changed()
        self.source_confidence = state.get("source_confidence")
        self.round_offset = finished_rounds
