"""Cohorts (fedctx.federated.cohort): several clients per Flower message, same results."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

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

from fedctx.config import ConfigError, SimConfig
from fedctx.federated.client import app as client_app
from fedctx.federated.cohort import (
    COHORT_KEY,
    CohortGrid,
    cohort_mod,
    pack,
    split_into_cohorts,
    unpack_reply,
)
from fedctx.federated.local import InProcessGrid
from fedctx.federated.records import encode
from fedctx.federated.run_config import to_run_config
from fedctx.federated.server import Experiment
from fedctx.results import RunRecorder, round_durations


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower's task identity (run and node), which new messages read: set as a grid does."""
    InProcessGrid(client_app, 1)


def test_cohorts_balance_the_clients_weights() -> None:
    groups = split_into_cohorts([5, 1, 1, 1, 1, 1, 4, 2], 2)
    assert sorted(i for g in groups for i in g) == list(range(8))
    loads = sorted(sum([5, 1, 1, 1, 1, 1, 4, 2][i] for i in g) for g in groups)
    assert loads == [8, 8]
    assert split_into_cohorts([1, 1], 5) == [[0], [1]]  # never an empty cohort


def _train_message(node: int, arrays: ArrayRecord, config: ConfigRecord) -> Message:
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                   message_type=MessageType.TRAIN)


def _echo(msg: Message, context: Context) -> Message:
    """A handler that answers with its partition id and the first weight it received; it
    raises for partition 2."""
    pid = int(context.node_config["partition-id"])
    if pid == 2:
        raise RuntimeError("client 2 crashed")
    first = msg.content["arrays"].to_torch_state_dict()["w"]
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid,
                                                        "w": float(first[0]),
                                                        "node": msg.metadata.dst_node_id})}),
                   reply_to=msg)


def test_a_cohort_carries_shared_records_once_and_answers_per_member() -> None:
    model = ArrayRecord({"w": torch.tensor([1.5, 2.0])})
    other = ArrayRecord({"w": torch.tensor([7.0, 0.0])})  # a second context's model
    config = ConfigRecord({"lr": 0.1})
    messages = [_train_message(10, model, config), _train_message(11, other, config),
                _train_message(12, model, config), _train_message(13, model, config)]
    packed = pack(messages, [0, 1, 2, 3])
    records = [k for k in packed.content if k != COHORT_KEY]
    assert len(records) == 3  # two models and one config, each once

    carrier = Context(run_id=1, node_id=10, node_config={"partition-id": 0,
                                                         "num-partitions": 4},
                      state=RecordDict(), run_config={})
    reply = cohort_mod(packed, carrier, _echo)
    replies = unpack_reply(reply, messages)
    assert [r.metadata.src_node_id for r in replies] == [10, 11, 12, 13]
    assert replies[2].has_error() and "client 2 crashed" in replies[2].error.reason
    ok = [r.content["metrics"] for r in replies if not r.has_error()]
    assert [(m["partition-id"], m["w"], m["node"]) for m in ok] == [
        (0, 1.5, 10), (1, 7.0, 11), (3, 1.5, 13)]


class CountingGrid(InProcessGrid):
    """An in-process grid that counts the messages it is handed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001
        messages = list(messages)
        self.sent.extend(m.metadata.message_type for m in messages)
        return super().send_and_receive(messages, timeout=timeout)


def _run(tmp_path: Path, name: str, **overrides) -> tuple[list[dict], CountingGrid]:
    values = dict(clients=6, rounds=2, fraction=1.0, min_clients=2, width=4, batch_size=32,
                  out=str(tmp_path / name), backend="inprocess")
    config = SimConfig(**{**values, **overrides}).validate()
    torch.set_num_threads(1)
    run_config = to_run_config(config)
    grid = CountingGrid(client_app, config.clients, run_config=run_config)
    Experiment(config, run_config, RunRecorder(Path(config.out), config.rounds)).run(grid)
    lines = (Path(config.out) / "metrics.jsonl").read_text().splitlines()
    timings = ("seconds", "phase_seconds", "between_seconds")
    return [{k: v for k, v in json.loads(line).items() if k not in timings} for line in lines], grid


@pytest.mark.parametrize("policy", ["average", "local"])
def test_cohorts_give_the_same_run_bit_for_bit(tmp_path: Path, policy: str) -> None:
    alone, grid1 = _run(tmp_path, "alone", cohort_size=1, norm_policy=policy)
    packed, grid3 = _run(tmp_path, "packed", cohort_size=4, norm_policy=policy)
    assert packed == alone  # every metric, every round, to the last bit
    assert grid1.sent.count(MessageType.TRAIN) == 12        # 6 clients x 2 rounds
    assert grid3.sent.count(MessageType.TRAIN) == 4         # 2 cohorts x 2 rounds
    if policy == "local":  # every client evaluates with its own norm: packed as well
        assert grid1.sent.count(MessageType.EVALUATE) == 12
        assert grid3.sent.count(MessageType.EVALUATE) == 4


def test_each_round_records_where_its_time_went(tmp_path: Path) -> None:
    _run(tmp_path, "timed", cohort_size=4, norm_policy="local")  # clients evaluate too
    for line in (tmp_path / "timed" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        phases = record["phase_seconds"]
        assert list(phases) == ["train", "aggregate", "evaluate"]
        assert all(v >= 0 for v in phases.values()) and phases["train"] > 0
        assert sum(phases.values()) == pytest.approx(record["seconds"], abs=0.005)


def test_a_rounds_recording_is_timed_by_the_next_round(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A round's checkpoint comes after its ``seconds`` stop: the next round's
    ``between_seconds`` holds it, and ``round_durations`` adds it to the round it belongs to."""
    save = Experiment.save_checkpoint

    def slow_save(self: Experiment, server_round: int) -> None:
        time.sleep(0.3)
        save(self, server_round)

    monkeypatch.setattr(Experiment, "save_checkpoint", slow_save)
    _run(tmp_path, "slow", rounds=3, cohort_size=4)
    records = [json.loads(x) for x in (tmp_path / "slow" / "metrics.jsonl").read_text()
               .splitlines()]
    assert "between_seconds" not in records[0]  # nothing before the first round
    assert all(r["between_seconds"] >= 0.3 for r in records[1:])
    durations = round_durations(records)
    assert durations[0] == pytest.approx(records[0]["seconds"] + records[1]["between_seconds"])
    assert durations[-1] == records[-1]["seconds"]  # the last round has no next start


def test_cohort_grid_needs_one_way_to_size_cohorts() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        CohortGrid(None, lambda n: None)
    with pytest.raises(ConfigError, match="cohort"):
        SimConfig(cohort_size=-1).validate()


def test_records_encode_and_decode_exactly_as_flower_does() -> None:
    tensors = {"w": torch.randn(3, 4), "scalar": torch.tensor(5), "empty": torch.zeros(0, 3),
               "long": torch.arange(5), "double": torch.randn(2, 2, dtype=torch.float64),
               "flag": torch.tensor([True, False]),
               "transposed": torch.randn(4, 3).t()}  # saved in Fortran order: Flower's path
    record = ArrayRecord(tensors)
    mine = encode(tensors)
    # Flower's own class: the Deployment Engine serializes no other (tests/test_deployment.py)
    assert all(type(mine[k]) is type(record[k]) for k in tensors)
    for k in tensors:
        assert (mine[k].dtype, mine[k].shape) == (record[k].dtype, tuple(record[k].shape))
        assert torch.equal(torch.from_numpy(mine[k].numpy()), tensors[k])
        if k != "transposed":  # np.save writes that one in Fortran order, encode in C order
            assert mine[k].data == record[k].data
    packed = pack([_train_message(7, record, ConfigRecord({}))], [0])
    reply = Message(RecordDict({"m0.arrays": packed.content["r0"]}), reply_to=packed)
    fast = unpack_reply(reply, [packed])[0].content["arrays"]
    assert all(type(fast[k]).__name__ == "PayloadArray" for k in tensors)
    for k in tensors:
        want, got = record[k].numpy(), fast[k].numpy()
        assert got.dtype == want.dtype and got.shape == want.shape and got.flags.writeable
        assert torch.equal(torch.from_numpy(got), torch.from_numpy(want))


# ---------------------------------------------------------------- summed cohorts (--cohort-sums)
def _checkpoint(tmp_path: Path, name: str) -> dict:
    return torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)


def _close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _close(a[key], b[key], atol)
        else:
            assert a[key].dtype == b[key].dtype, key
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("policy", ["per-context", "average", "stats-local", "local"])
def test_summed_cohorts_average_as_the_per_client_replies(tmp_path: Path, policy: str) -> None:
    """One round: the model and the norm state from the cohorts' sums equal those from one reply
    per client to float tolerance (float64 sums in another order than FedAvg's float32 ones);
    the clients' metrics are the same, bit for bit."""
    alone, _ = _run(tmp_path, "alone", rounds=1, cohort_size=1, norm_policy=policy)
    summed, grid = _run(tmp_path, "summed", rounds=1, cohort_size=4, norm_policy=policy,
                        cohort_sums=True)
    assert grid.sent.count(MessageType.TRAIN) == 2
    assert summed[0]["train_loss"] == alone[0]["train_loss"]
    assert summed[0]["clients_ok"] == alone[0]["clients_ok"] == 6
    a, b = _checkpoint(tmp_path, "alone"), _checkpoint(tmp_path, "summed")
    _close(a["arrays"], b["arrays"], atol=1e-6)
    norm_a, norm_b = a["strategy"]["norm"], b["strategy"]["norm"]
    _close(norm_a["global_norm"], norm_b["global_norm"], atol=1e-6)
    _close(norm_a["bank"], norm_b["bank"], atol=1e-6)
    if policy == "per-context":  # the bank was merged: entries differ from the initial state
        assert len(norm_b["bank"]) > 1


def test_a_member_sent_alone_is_summed_on_the_server(tmp_path: Path) -> None:
    """Five clients in three cohorts: at least one has a single member, sent as a message of
    its own (a full reply); the server sums that reply itself, with the same result."""
    alone, _ = _run(tmp_path, "alone", clients=5, rounds=1, cohort_size=1)
    summed, grid = _run(tmp_path, "summed", clients=5, rounds=1, cohort_size=2,
                        cohort_sums=True)
    assert grid.sent.count(MessageType.TRAIN) == 3
    assert summed[0]["clients_ok"] == 5 and summed[0]["train_loss"] == alone[0]["train_loss"]
    a, b = _checkpoint(tmp_path, "alone"), _checkpoint(tmp_path, "summed")
    _close(a["arrays"], b["arrays"], atol=1e-6)
    _close(a["strategy"]["norm"]["bank"], b["strategy"]["norm"]["bank"], atol=1e-6)


def test_a_summed_cohort_with_a_rejected_member_is_dropped_whole(tmp_path: Path) -> None:
    """The server rejects a member by its metrics after the worker summed its tensors: the
    member's cohort is dropped (its other members are rejected by check ``cohort``), the other
    cohorts are aggregated."""
    records, _ = _run(tmp_path, "bounded", rounds=1, cohort_size=2, cohort_sums=True,
                      max_examples=700)  # the scenario's 1,000-example clients claim too many
    report = records[0]
    checks = [r["check"] for r in report["rejections"]]
    assert "num-examples" in checks and "cohort" in checks
    assert set(checks) == {"num-examples", "cohort"}
    assert report["rejected_by_check"] == dict(Counter(checks))
    assert report["clients_ok"] + len(checks) == 6 and report["clients_ok"] >= 2


def test_non_finite_tensors_stay_out_of_a_cohorts_sums() -> None:
    from fedctx.federated.cohort import CohortScope, CohortSums
    from fedctx.federated.norm_client import fold

    scope = CohortScope(sums=CohortSums())
    msg = Message(RecordDict({"config": ConfigRecord({"norm-policy": "average"})}),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    metrics = {"num-examples": 3, "context": 0}
    fold(scope, msg, {"w": torch.ones(2), "n": torch.tensor(4)}, metrics, ())
    with pytest.raises(ValueError, match="not finite"):
        fold(scope, msg, {"w": torch.tensor([1.0, float("nan")]), "n": torch.tensor(5)},
             metrics, ())
    assert scope.sums is not None and scope.sums.total.weight == 3
    assert torch.equal(scope.sums.total.sums["w"], torch.full((2,), 3.0, dtype=torch.float64))


def test_weighted_sums_in_parts_give_the_weighted_average() -> None:
    from fedctx.federated.params import WeightedSum, weighted_average

    gen = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=gen), "count": torch.tensor(i)} for i in range(5)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    left, right = WeightedSum(), WeightedSum()
    for i, (s, w) in enumerate(zip(states, weights, strict=True)):
        (left if i < 2 else right).add(s, w)
    left.merge(right)
    expected = weighted_average(states, weights)
    mean = left.mean(states[0])
    torch.testing.assert_close(mean["w"], expected["w"], rtol=0, atol=1e-6)
    assert mean["count"].item() == 4 and mean["count"].dtype == torch.int64
    with pytest.raises(ValueError, match="positive"):
        WeightedSum().add(states[0], 0.0)


@pytest.mark.parametrize(("flags", "message"), [
    ({"strategy": "krum"}, "--cohort-sums needs a strategy that averages"),
    ({"cohort_size": 1}, "--cohort-sums needs cohorts"),
])
def test_cohort_sums_refuse_what_they_cannot_sum(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SimConfig(cohort_sums=True, **flags).validate()


def test_cohort_sums_off_keeps_older_runs_folder_names() -> None:
    """The results folder's hash is that of the options before ``--cohort-sums`` existed, unless
    it is set: ``--resume`` without ``--out`` still finds a run an older version started."""
    import hashlib

    from fedctx.federated.run_config import config_hash, experiment_options

    config = SimConfig().validate()
    before = {k: v for k, v in experiment_options(config).items()
              if k not in ("rounds", "cohort_sums")}
    old = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:8]
    assert config_hash(config) == old
    assert config_hash(SimConfig(cohort_sums=True).validate()) != old
