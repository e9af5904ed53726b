"""NormPolicyStrategy with many registered nodes: registration in bounded batches, per-round work
that does not revisit every registered node, and nodes that join later still registered,
ordered and counted (benchmarks/scale.py measures the same at 10,000 nodes on Ray)."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from test_norm_strategy import ShuffledGrid, tiny

from fedctx.federated import norm_client
from fedctx.federated import norm_strategy as ns
from fedctx.federated.norm_strategy import NormPolicyStrategy


def labelled(msg: Message, context: Context) -> Message:
    """Node ``pid`` registers label counts ``[1, pid]`` and context ``pid % 2``."""
    pid = int(context.node_config["partition-id"])
    if msg.metadata.message_type == MessageType.QUERY:
        return norm_client.describe(msg, context=pid % 2, partition_id=pid, num_examples=10,
                                    label_counts=[1, pid])
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord(
        {"num-examples": 10, "train-loss": 1.0, "context": pid % 2})}), reply_to=msg)


class CountingGrid(ShuffledGrid):
    """Random node ids; records the size of every ``send_and_receive`` by message type and
    can hide its last nodes until ``join()``."""

    def __init__(self, n: int, hidden: int = 0) -> None:
        super().__init__(labelled, n, seed=1)
        self.calls: list[tuple[str, int]] = []
        self.hidden = hidden

    def join(self) -> None:
        self.hidden = 0

    def get_node_ids(self) -> list[int]:
        ids = super().get_node_ids()
        return ids[:len(ids) - self.hidden]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001
        messages = list(messages)
        if messages:
            self.calls.append((messages[0].metadata.message_type, len(messages)))
        return super().send_and_receive(messages, timeout=timeout)


def strategy(n: int, sampled: int) -> NormPolicyStrategy:
    return NormPolicyStrategy(FedAvg(fraction_train=sampled / n, min_train_nodes=sampled,
                                     min_available_nodes=0, fraction_evaluate=0.0),
                              tiny(), "per-context", seed=3)


def test_registration_sends_queries_in_bounded_batches_and_registers_every_node() -> None:
    n = 2 * ns.QUERY_BATCH + 5
    grid, s = CountingGrid(n), strategy(n, 4)
    s.register(grid)
    queries = [size for kind, size in grid.calls if kind == MessageType.QUERY]
    assert queries == [ns.QUERY_BATCH, ns.QUERY_BATCH, 5]
    assert sorted(s.client_key(node) for node in grid.get_node_ids()) == list(range(n))
    total = sum(range(n))
    assert s.label_distribution() == [n / (n + total), total / (n + total)]


def test_registration_past_the_round_timeout_leaves_the_rest_for_the_next_round() -> None:
    n = ns.QUERY_BATCH + 3
    grid, s = CountingGrid(n), strategy(n, 4)
    s.round_timeout = 0.0
    s.register(grid)
    assert not s.nodes and grid.calls == []  # the budget was spent before the first batch
    s.round_timeout = 60.0
    s.register(grid)
    assert len(s.nodes) == n


def test_nodes_that_join_later_are_registered_sampled_in_partition_order_and_counted() -> None:
    """Round 2 after 4 nodes joined samples and counts as a strategy that saw all 12 nodes
    from the start: the late nodes were registered and the kept node order was redone."""
    n, late = 12, 4
    grid, s = CountingGrid(n, hidden=late), strategy(n, 4)
    s.start(grid=grid, initial_arrays=ArrayRecord(tiny().state_dict()), num_rounds=1)
    assert {s.client_key(m) for m in s.reports[1].sampled} <= set(range(n - late))
    before = s.label_distribution()
    grid.join()
    s.round_offset = 1
    s.start(grid=grid, initial_arrays=ArrayRecord(tiny().state_dict()), num_rounds=1)
    full = strategy(n, 4)
    full.round_offset = 1
    full.start(grid=CountingGrid(n), initial_arrays=ArrayRecord(tiny().state_dict()),
               num_rounds=1)
    assert ([s.client_key(m) for m in s.reports[2].sampled]
            == [full.client_key(m) for m in full.reports[2].sampled])
    assert before != s.label_distribution() == full.label_distribution()


def test_sampling_is_the_same_with_the_node_order_kept_between_rounds() -> None:
    """The sorted node order is kept between rounds: the sampled clients are those of a
    strategy that sorts afresh (a new strategy per round, same seed and round)."""
    n, rounds = 300, 4
    grid = CountingGrid(n)
    kept = strategy(n, 10)
    kept.start(grid=grid, initial_arrays=ArrayRecord(tiny().state_dict()), num_rounds=rounds)
    for r in range(1, rounds + 1):
        fresh = strategy(n, 10)
        fresh.round_offset = r - 1
        fresh.start(grid=grid, initial_arrays=ArrayRecord(tiny().state_dict()), num_rounds=1)
        assert ([kept.client_key(m) for m in kept.reports[r].sampled]
                == [fresh.client_key(m) for m in fresh.reports[r].sampled])


def test_partition_ids_learnt_from_train_replies_reorder_the_nodes() -> None:
    """Nodes without a query handler are named by their first train reply: from then on they
    are sampled as if they had registered (the kept node order is redone)."""
    def unregistered(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == MessageType.QUERY:
            raise ValueError("no query handler")
        reply = labelled(msg, context)
        reply.content["metrics"]["partition-id"] = int(context.node_config["partition-id"])
        return reply

    n = 40
    grid = CountingGrid(n)
    grid.client_app = unregistered
    learnt = NormPolicyStrategy(FedAvg(fraction_train=1.0, min_available_nodes=0,
                                       fraction_evaluate=0.0), tiny(), "per-context", seed=3)
    learnt.start(grid=grid, initial_arrays=ArrayRecord(tiny().state_dict()), num_rounds=1)
    learnt.strategy.fraction_train = 0.25
    learnt.round_offset = 1
    learnt.start(grid=grid, initial_arrays=ArrayRecord(tiny().state_dict()), num_rounds=1)
    told = strategy(n, 10)
    told.round_offset = 1
    told.start(grid=CountingGrid(n), initial_arrays=ArrayRecord(tiny().state_dict()),
               num_rounds=1)
    assert ([learnt.client_key(m) for m in learnt.reports[2].sampled]
            == [told.client_key(m) for m in told.reports[2].sampled])


def _bench():
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(folder))  # the benchmark imports its sibling ``common``
    spec = importlib.util.spec_from_file_location("scale_bench", folder / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(clients: int, round_s: float, driver_growth: float, step: float = 0.01) -> dict:
    rounds = 6
    samples = [{"round": r, "driver_mb": 1000 + (driver_growth if r >= 5 else 0.0),
                "workers_mb": 2000.0, "workers": 5, "seconds": round_s} for r in range(1, 7)]
    return {"clients": clients, "sampled": 100, "rounds": rounds, "command": "c", "machine": "m",
            "load_before": 1.0, "load_after": 1.0, "wall_seconds": 100.0,
            "startup_seconds": 10.0, "engine_to_registration": 0.1,
            "registration_seconds": clients / 1000, "round_seconds": [round_s] * rounds,
            "width": 8, "batch": 2, "step_seconds": step, "worker_slots": 2, "samples": samples}


def test_scale_page_states_each_target_from_the_numbers() -> None:
    bench = _bench()
    good = bench.page([_record(1000, 2.0, 0.0), _record(10000, 2.1, 5.0)], workers=2)
    assert "1,000 clients: flat" in good and "10,000 clients: flat" in good
    assert "ratio **1.05**" in good and "Not longer with 10x" in good
    bad = bench.page([_record(1000, 2.0, 0.0), _record(10000, 3.0, 100.0)], workers=2)
    assert "10,000 clients: NOT flat" in bad and "Longer with 10x" in bad
