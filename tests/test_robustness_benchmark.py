"""benchmarks/robustness.py: the attacker alters only its own train replies, as named; the
failure-case table names tests that exist."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedctx.federated import runtime
from fedctx.federated.local import InProcessGrid
from fedctx.federated.params import split_state

_BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(_BENCH))  # the benchmark imports its sibling ``common``
_spec = importlib.util.spec_from_file_location("robustness", _BENCH / "robustness.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def honest(msg: Message, context: Context) -> Message:
    """Trains by adding 1 to every float tensor."""
    state = {k: v + 1 if v.is_floating_point() else v
             for k, v in msg.content["arrays"].to_torch_state_dict().items()}
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(
        {"num-examples": 10, "context": 0, "context-counts": [10, 0]})}), reply_to=msg)


@pytest.fixture
def nodes(monkeypatch) -> InProcessGrid:
    split = split_state(model())
    monkeypatch.setattr(runtime, "get_runtime", lambda run_config: SimpleNamespace(split=split))
    return InProcessGrid(honest, 2)


def replies(grid: InProcessGrid, attack: str) -> dict[int, Message]:
    app = bench.Attacker(attack)
    app.app = honest
    sent = ArrayRecord(model().state_dict())
    return {pid: app(Message(RecordDict({"arrays": sent}), message_type=MessageType.TRAIN,
                             dst_node_id=1000 + pid), grid.contexts[1000 + pid])
            for pid in (0, 1)}


@pytest.mark.parametrize("attack", sorted(bench.ATTACKS))
def test_only_the_attackers_reply_changes_and_only_as_named(nodes: InProcessGrid,
                                                            attack: str) -> None:
    got = replies(nodes, attack)
    init = model().state_dict()
    for pid, reply in got.items():
        state = reply.content["arrays"].to_torch_state_dict()
        metrics = reply.content["metrics"]
        changed = {k for k, v in state.items() if v.is_floating_point()
                   and not torch.equal(v, init[k] + 1)}
        attacked = pid == bench.ATTACKER and attack != "none"
        expected = {"norm-x1e6": {"1.weight", "1.bias", "1.running_mean", "1.running_var"},
                    "shared-x1e6": {"0.weight", "0.bias"},
                    "sign-flip": {"0.weight", "0.bias"}}.get(attack, set())
        assert changed == (expected if attacked else set())
        big = attacked and attack == "examples-x1000"
        assert metrics["num-examples"] == (10_000 if big else 10)
        assert metrics["context-counts"] == ([10_000, 0] if big else [10, 0])
    if attack == "sign-flip":
        flipped = got[bench.ATTACKER].content["arrays"].to_torch_state_dict()
        torch.testing.assert_close(flipped["0.bias"], init["0.bias"] - 10)


def test_failure_table_names_existing_tests() -> None:
    rows = bench.failure_table()[2:]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == [str(i) for i in range(4, 13)]
