"""One screening step for train replies (#14 item 8): each rule rejects and names its check,
the round goes on with the sound replies and counts rejections per check."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from test_norm_strategy import sampling, start, tiny

from fedctx.federated import norm_client
from fedctx.federated.local import InProcessGrid
from fedctx.federated.norm_strategy import NormPolicyStrategy, check_record

SIZE = 10  # every node registers 10 training images


def describe_app(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return norm_client.describe(msg, context=pid % 2, partition_id=pid, num_examples=SIZE)


def registered(**options) -> tuple[NormPolicyStrategy, InProcessGrid]:
    """A per-context strategy (K = 2) that has registered nodes 1000 (context 0) and 1001
    (context 1), each of size 10."""
    grid = InProcessGrid(describe_app, 2)
    strategy = NormPolicyStrategy(FedAvg(**sampling(2)), tiny(), "per-context", num_contexts=2,
                                  **options)
    strategy.register(grid)
    return strategy, grid


def reply(node: int = 1000, records: dict | None = None, **metrics) -> Message:
    """A sound train reply of ``node`` (context ``node % 2``), with ``metrics`` overriding
    (``None`` removes one) and ``records`` added to its content."""
    values = {"num-examples": SIZE, "train-loss": 0.5, "context": node % 2, **metrics}
    content = {"arrays": ArrayRecord(tiny().state_dict()),
               "metrics": MetricRecord({k: v for k, v in values.items() if v is not None}),
               **(records or {})}
    sent = Message(RecordDict({}), message_type=MessageType.TRAIN, dst_node_id=node)
    return Message(RecordDict(content), reply_to=sent)


def check_of(strategy: NormPolicyStrategy, msg: Message) -> str | None:
    failed = strategy.failed_check(msg)
    return None if failed is None else failed[0]


def test_a_sound_reply_passes_every_check() -> None:
    strategy, _ = registered()
    assert strategy.failed_check(reply()) is None
    assert strategy.failed_check(reply(1001, **{"context-counts": [0, SIZE]})) is None


@pytest.mark.parametrize("value", [0, -3, 2.5, math.nan, math.inf])
def test_num_examples_must_be_a_positive_finite_integer(value: float) -> None:
    strategy, _ = registered()
    assert check_of(strategy, reply(**{"num-examples": value})) == "num-examples"


def test_num_examples_bounded_by_the_registered_size_or_max_examples() -> None:
    strategy, _ = registered()
    assert check_of(strategy, reply(**{"num-examples": SIZE + 1})) == "num-examples"
    assert "registered size" in strategy.screen(reply(**{"num-examples": SIZE + 1}))
    bounded, _ = registered(max_examples=20)
    assert bounded.failed_check(reply(**{"num-examples": 20})) is None
    assert check_of(bounded, reply(**{"num-examples": 21})) == "num-examples"


def test_missing_or_extra_records_are_rejected() -> None:
    strategy, _ = registered()
    assert check_of(strategy, reply(records={"config": ConfigRecord({"a": 1})})) == "records"
    assert check_of(strategy, reply(records={"more": MetricRecord({"a": 1})})) == "records"
    no_metrics = reply()
    del no_metrics.content["metrics"]
    assert check_of(strategy, no_metrics) == "records"


def test_missing_or_extra_metrics_are_rejected() -> None:
    strategy, _ = registered()
    assert check_of(strategy, reply(context=None)) == "metrics"
    assert check_of(strategy, reply(**{"num-examples": None})) == "metrics"
    assert check_of(strategy, reply(surprise=1.0)) == "metrics"
    allowed, _ = registered(extra_metrics=("surprise",))
    assert allowed.failed_check(reply(surprise=1.0)) is None


@pytest.mark.parametrize("node,context", [(1000, 2), (1000, -1), (1000, 0.5), (1000, 1),
                                          (1001, 0)])
def test_context_out_of_range_or_not_the_registered_one(node: int, context: float) -> None:
    strategy, _ = registered()
    assert check_of(strategy, reply(node, context=context)) == "context"


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_non_finite_train_loss_is_rejected(loss: float) -> None:
    strategy, _ = registered()
    assert check_of(strategy, reply(**{"train-loss": loss})) == "train-loss"


@pytest.mark.parametrize("counts", [[SIZE], [SIZE, 0, 0], [SIZE + 2, -2], [9.5, 0.5],
                                    [SIZE - 1, 0]])
def test_context_counts_of_wrong_length_sign_type_or_sum(counts: list) -> None:
    strategy, _ = registered()
    assert check_of(strategy, reply(**{"context-counts": counts})) == "context-counts"


@pytest.mark.parametrize("key", ["confidence", "unlabelled-mask-rate"])
def test_rates_outside_zero_one_are_rejected(key: str) -> None:
    strategy, _ = registered()
    assert strategy.failed_check(reply(**{key: 0.75})) is None
    assert check_of(strategy, reply(**{key: 1.5})) == "rates"


def test_wrong_arrays_are_rejected() -> None:
    strategy, _ = registered()
    bad = reply()
    state = tiny().state_dict()
    state["0.weight"] = torch.full_like(state["0.weight"], math.nan)
    bad.content["arrays"] = ArrayRecord(state)
    assert check_of(strategy, bad) == "arrays"


class Inflating:
    """Plain clients of size 10; partition 1 claims 10**6 examples (and so would outweigh the
    others in every weighted average)."""

    def __call__(self, msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if msg.metadata.message_type == MessageType.QUERY:
            return describe_app(msg, context)
        state = msg.content["arrays"].to_torch_state_dict()
        n = 10**6 if pid == 1 else SIZE
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(
            {"num-examples": n, "train-loss": 0.1, "context": pid % 2})}), reply_to=msg)


def test_round_goes_on_and_counts_rejections_per_check() -> None:
    strategy = NormPolicyStrategy(FedAvg(**sampling(4)), tiny(), "per-context", min_replies=2)
    start(strategy, Inflating(), n=4)
    report = strategy.reports[1]
    assert report.aggregated and report.accepted == 3
    assert report.rejected_by_check == {"num-examples": 1}
    assert report.rejections[0]["client"] == 1


def test_array_check_finds_the_non_finite_tensor_and_accepts_huge_finite_ones() -> None:
    reference = {"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.float64),
                 "steps": torch.zeros((), dtype=torch.long)}
    good = {"a": torch.ones(3), "b": torch.ones(2, dtype=torch.float64),
            "steps": torch.tensor(4)}
    assert check_record(good, reference, reference, reference) is None
    nan = {**good, "b": torch.tensor([1.0, math.nan], dtype=torch.float64)}
    assert check_record(nan, reference, reference, reference) == "arrays.b: non-finite values"
    inf = {**good, "a": torch.tensor([1.0, -math.inf, 0.0])}
    assert check_record(inf, reference, reference, reference) == "arrays.a: non-finite values"
    huge = {**good, "a": torch.full((3,), 1e30)}  # finite, though its float32 norm overflows
    assert check_record(huge, reference, reference, reference) is None
