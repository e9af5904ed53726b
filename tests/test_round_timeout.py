"""A client that hangs or dies does not stop the federation (#14 item 6): the round timeout
counts it as failed, the round goes on with at least ``min_replies`` sound replies, a round with
fewer keeps the model and is listed in ``failed_rounds``."""

from __future__ import annotations

import threading
import time

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
from test_norm_strategy import PlainClients, sampling, start, tiny

from fedctx.federated.local import InProcessGrid
from fedctx.federated.norm_strategy import NormPolicyStrategy

HANG_S = 20.0  # how long a hung client would block a grid that ignores the timeout


class Unreliable(PlainClients):
    """:class:`PlainClients` whose partition 0 hangs in training (until ``release``) and
    partition 1 dies (raises)."""

    def __init__(self) -> None:
        super().__init__(shift=lambda pid: 0.1)
        self.release = threading.Event()

    def __call__(self, msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if msg.metadata.message_type == MessageType.TRAIN and pid == 0:
            deadline = time.monotonic() + HANG_S
            while not self.release.wait(0.01) and time.monotonic() < deadline:
                pass
        if msg.metadata.message_type == MessageType.TRAIN and pid == 1:
            raise RuntimeError("worker died")
        return super().__call__(msg, context)


@pytest.fixture
def clients():
    app = Unreliable()
    yield app
    app.release.set()


def test_in_process_grid_stops_waiting_at_the_timeout(clients: Unreliable) -> None:
    grid = InProcessGrid(clients, 3)
    content = {"arrays": ArrayRecord(tiny().state_dict()),
               "config": ConfigRecord({"server-round": 1})}
    messages = [Message(RecordDict(content), message_type=MessageType.TRAIN, dst_node_id=n)
                for n in grid.get_node_ids()]
    t0 = time.monotonic()
    replies = grid.send_and_receive(messages, timeout=2.0)
    assert time.monotonic() - t0 < HANG_S / 4
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert set(by_node) == {1001, 1002}               # node 1000 hung: no reply
    assert by_node[1001].has_error() and not by_node[1002].has_error()


def test_hung_and_dead_clients_are_failures_and_the_round_goes_on(clients: Unreliable) -> None:
    strategy = NormPolicyStrategy(FedAvg(**sampling(4)), tiny(), "average", min_replies=2,
                                  round_timeout=2.0)
    t0 = time.monotonic()
    result = start(strategy, clients, n=4)
    assert time.monotonic() - t0 < HANG_S / 2
    report = strategy.reports[1]
    assert report.failures == 2 and report.accepted == 2 and report.aggregated
    assert strategy.failed_rounds == []
    final = result.arrays.to_torch_state_dict()
    assert torch.allclose(final["0.bias"], tiny().state_dict()["0.bias"] + 0.1)


def test_a_round_with_too_few_sound_replies_fails_and_keeps_the_model(
        clients: Unreliable) -> None:
    strategy = NormPolicyStrategy(FedAvg(**sampling(4)), tiny(), "average", min_replies=3,
                                  round_timeout=2.0)
    seen = []
    strategy.start(grid=InProcessGrid(clients, 4), initial_arrays=ArrayRecord(
        tiny().state_dict()), num_rounds=2,
        evaluate_fn=lambda r, arrays: seen.append(arrays.to_torch_state_dict()))
    assert strategy.failed_rounds == [1, 2]
    assert all(strategy.reports[r].failed and strategy.reports[r].failures == 2
               for r in (1, 2))
    assert len(seen) == 3  # before round 1 and after each round: the initial model
    assert all(torch.equal(arrays[k], v) for arrays in seen for k, v in tiny().state_dict().items())
    resumed = NormPolicyStrategy(FedAvg(**sampling(4)), tiny(), "average")
    resumed.load_state_dict(strategy.state_dict(), finished_rounds=2)
    assert resumed.failed_rounds == [1, 2]


def test_a_client_computing_past_the_timeout_is_stopped_and_its_node_freed() -> None:
    calls = []

    def app(msg: Message, context: Context) -> Message:
        calls.append(msg)
        while len(calls) == 1:  # the first message: compute forever
            pass
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)

    grid = InProcessGrid(app, 1)
    first, second = (Message(RecordDict({}), message_type=MessageType.QUERY, dst_node_id=1000)
                     for _ in range(2))
    assert grid.send_and_receive([first], timeout=0.5) == []
    t0 = time.monotonic()
    replies = grid.send_and_receive([second], timeout=HANG_S)
    assert len(replies) == 1 and not replies[0].has_error()
    assert time.monotonic() - t0 < HANG_S / 4
