"""Whole federations in one process (InProcessGrid): strategies, bad clients, failing clients,
client-local state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType

from fedctx import strategies
from fedctx.config import SimConfig
from fedctx.federated.client import app as client_app
from fedctx.federated.local import InProcessGrid
from fedctx.federated.norm_client import FileStore
from fedctx.federated.run_config import to_run_config
from fedctx.federated.server import Experiment
from fedctx.results import RunRecorder


def small_config(tmp_path: Path, **overrides) -> SimConfig:
    values = dict(clients=4, rounds=2, fraction=1.0, min_clients=2, width=4, batch_size=32,
                  out=str(tmp_path / "run"), backend="inprocess")
    values.update(overrides)
    return SimConfig(**values).validate()


def run(config: SimConfig, app=None) -> RunRecorder:
    torch.set_num_threads(1)
    run_config = to_run_config(config)
    recorder = RunRecorder(Path(config.out), config.rounds)
    grid = InProcessGrid(app or client_app, config.clients, run_config=run_config)
    Experiment(config, run_config, recorder).run(grid)
    return recorder


def load_kept_state(config: SimConfig, pid: int, before_round: int) -> dict | None:
    return FileStore(Path(config.out) / "client_state", pid).load(before_round)


class FaultyApp:
    """Wraps a ClientApp; corrupts or fails the train replies of chosen partitions."""

    def __init__(self, inner, faults: dict[int, str]) -> None:
        self.inner, self.faults = inner, faults

    def __call__(self, msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        fault = self.faults.get(pid)
        if msg.metadata.message_type == MessageType.TRAIN and fault == "raise":
            raise RuntimeError("simulated client crash")
        reply = self.inner(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or fault is None:
            return reply
        arrays = reply.content["arrays"].to_torch_state_dict()
        first = next(iter(arrays))
        if fault == "nan":
            arrays[first] = torch.full_like(arrays[first], float("nan"))
        elif fault == "shape":
            arrays[first] = torch.zeros(3)
        elif fault == "dtype":
            arrays[first] = arrays[first].double()
        elif fault == "keys":
            arrays["extra.weight"] = torch.zeros(1)
        elif fault == "scale":  # a poisoning client: finite, right shapes, 1000x too large
            arrays = {k: v * 1000 if v.is_floating_point() else v for k, v in arrays.items()}
        reply.content["arrays"] = ArrayRecord(arrays)
        return reply


@pytest.mark.parametrize("fault", ["nan", "shape", "dtype", "keys"])
def test_bad_replies_are_rejected_and_counted(tmp_path: Path, fault: str) -> None:
    config = small_config(tmp_path, rounds=1)
    recorder = run(config, FaultyApp(client_app, {1: fault}))
    record = recorder.history[0]
    assert record["rejected"] == 1 and record["clients_ok"] == 3
    assert record["rejections"][0]["client"] == 1
    expected_word = {"nan": "non-finite", "shape": "shape", "dtype": "dtype", "keys": "keys"}
    assert expected_word[fault] in record["rejections"][0]["reason"]
    assert torch.isfinite(torch.tensor(record["train_loss"]))


def test_failing_client_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    config = small_config(tmp_path, rounds=1)
    recorder = run(config, FaultyApp(client_app, {0: "raise", 2: "raise"}))
    record = recorder.history[0]
    assert record["failures"] == 2 and record["clients_ok"] == 2


def test_round_below_minimum_keeps_weights(tmp_path: Path) -> None:
    config = small_config(tmp_path, rounds=1, min_clients=4)
    recorder = run(config, FaultyApp(client_app, {0: "raise"}))
    record = recorder.history[0]
    assert record["clients_ok"] == 0 and record["failures"] == 1
    assert record["train_loss"] != record["train_loss"]  # NaN: no aggregation this round


def test_local_policy_keeps_norm_on_clients(tmp_path: Path) -> None:
    config = small_config(tmp_path, norm_policy="local")
    recorder = run(config)
    summary = json.loads((Path(config.out) / "summary.json").read_text())
    assert summary["evaluated_on"] == "clients"
    kept = load_kept_state(config, 0, before_round=config.rounds + 1)
    assert kept is not None and any("running_mean" in k for k in kept)
    # client 0 trained with its own statistics: they differ from client 1's
    other = load_kept_state(config, 1, before_round=config.rounds + 1)
    key = next(k for k in kept if "running_mean" in k)
    assert not torch.equal(kept[key], other[key])
    assert len(recorder.history) == config.rounds


def shared_deviation(config: SimConfig) -> float:
    """Largest change of a shared (non-norm) weight between the initial and the final model."""
    from fedctx.federated.runtime import build_model, get_runtime

    final = torch.load(Path(config.out) / "model.pt", weights_only=False)["shared"]
    initial = build_model(config, get_runtime(to_run_config(config)).data).state_dict()
    return max(float((final[k] - initial[k]).abs().max()) for k in final)


@pytest.mark.parametrize("name", ["krum", "fedmedian", "fedtrimmedavg"])
def test_robust_strategies_ignore_a_poisoning_client(tmp_path: Path, name: str) -> None:
    # fedctx's Krum, FedMedian and FedTrimmedAvg (their fedctx defaults, in fedctx's server with
    # real clients) keep the shared weights where honest training puts them when one client of
    # five sends weights 1000x too large; FedAvg's mean is dragged far away.
    attack = FaultyApp(client_app, {4: "scale"})
    robust = small_config(tmp_path / name, clients=5, rounds=1, strategy=name)
    fedavg = small_config(tmp_path / "fedavg", clients=5, rounds=1)
    assert run(robust, attack).history[0]["clients_ok"] == 5  # accepted: only the rule helps
    run(fedavg, attack)
    honest, dragged = shared_deviation(robust), shared_deviation(fedavg)
    assert honest < 2.0 and dragged > 50 * honest, (honest, dragged)


def test_fedadam_server_moments_move_between_rounds_and_are_checkpointed(tmp_path: Path
                                                                          ) -> None:
    from fedctx.results import read_checkpoint

    def leaves(value) -> list[torch.Tensor]:
        if isinstance(value, dict):
            return [t for v in value.values() for t in leaves(v)]
        if isinstance(value, list | tuple):
            return [t for v in value for t in leaves(v)]
        return [torch.as_tensor(value)] if isinstance(value, torch.Tensor | float) else []

    config = small_config(tmp_path, rounds=2, strategy="fedadam")
    run(config)
    moments = [read_checkpoint(Path(config.out) / name)["strategy"]["inner"]["attributes"]
               for name in ("checkpoint.prev.pt", "checkpoint.pt")]  # after rounds 1 and 2
    for key in ("m_t", "v_t"):
        first, second = leaves(moments[0][key]), leaves(moments[1][key])
        assert first and any(float(t.abs().max()) > 0 for t in first), key  # round 1 set them
        assert any(not torch.equal(a, b) for a, b in zip(first, second, strict=True)), key


def test_fedprox_sends_its_proximal_term_to_the_clients_fedavg_does_not(tmp_path: Path
                                                                         ) -> None:
    # the term itself pulls a client towards the global weights: test below
    received: dict[str, list[float]] = {}

    def recording(name: str):
        def app(msg: Message, context) -> Message:
            if msg.metadata.message_type == MessageType.TRAIN:
                received.setdefault(name, []).append(
                    float(msg.content["config"].get("proximal-mu", 0.0)))
            return client_app(msg, context)
        return app

    for name in ("fedprox", "fedavg"):
        run(small_config(tmp_path / name, rounds=1, strategy=name), recording(name))
    assert received == {"fedprox": [0.01] * 4, "fedavg": [0.0] * 4}


@pytest.mark.parametrize("name", sorted(strategies.BUILTIN))
def test_every_builtin_strategy_trains_with_any_policy(tmp_path: Path, name: str) -> None:
    # What each strategy is for: the tests above (fedctx's server) and tests/test_norm_strategy.py
    # (the wrapper alone); here: every one runs inside fedctx's server with some policy,
    # aggregates every reply and moves the weights.
    policy = {"fedavg": "average", "fedprox": "per-context", "fedadam": "stats-local",
              "krum": "local"}.get(name, "per-context")
    config = small_config(tmp_path, rounds=1, strategy=name, norm_policy=policy)
    recorder = run(config)
    assert recorder.history[0]["clients_ok"] == 4
    assert shared_deviation(config) > 0


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    a = run(small_config(tmp_path / "a", seed=7)).history
    b = run(small_config(tmp_path / "b", seed=7)).history
    c = run(small_config(tmp_path / "c", seed=8)).history
    key = [(r["train_loss"], r["accuracy"]) for r in a]
    assert key == [(r["train_loss"], r["accuracy"]) for r in b]
    assert key != [(r["train_loss"], r["accuracy"]) for r in c]


def test_resume_restores_strategy_and_client_state(tmp_path: Path) -> None:
    """FedAdam's moments and stats-local client state survive a stop after round 2."""
    full = run(small_config(tmp_path / "full", rounds=4, strategy="fedadam",
                            norm_policy="stats-local", fraction=0.5)).history
    part = small_config(tmp_path / "part", rounds=2, strategy="fedadam",
                        norm_policy="stats-local", fraction=0.5)
    run(part)
    resumed = run(small_config(tmp_path / "part", rounds=4, strategy="fedadam",
                               norm_policy="stats-local", fraction=0.5, resume=True)).history
    assert [r["round"] for r in resumed] == [1, 2, 3, 4]
    assert [(r["train_loss"], r["accuracy"]) for r in resumed] == \
        [(r["train_loss"], r["accuracy"]) for r in full]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(small_config(tmp_path, resume=True))


def test_fedprox_term_pulls_towards_the_global_weights() -> None:
    from fedctx.data import ClientData
    from fedctx.federated.training import local_train
    from fedctx.models import make_model

    torch.manual_seed(0)
    data = ClientData(torch.randn(64, 3, 28, 28), torch.randint(0, 10, (64,)),
                      torch.zeros(64, dtype=torch.long))
    drift = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(1)
        model = make_model("digits-cnn", norm="batch", width=4)
        start = [p.detach().clone() for p in model.parameters()]
        local_train(model, data, epochs=2, batch_size=16, lr=0.05, momentum=0.0,
                    weight_decay=0.0, generator=torch.Generator().manual_seed(0),
                    proximal_mu=mu)
        drift[mu] = sum(float((p.detach() - s).norm()) for p, s in
                        zip(model.parameters(), start, strict=True))
    assert drift[10.0] < drift[0.0]


@pytest.mark.parametrize("norm", __import__("fedctx.norm", fromlist=["available"]).available())
def test_every_norm_trains_federated(tmp_path: Path, norm: str) -> None:
    # A moderate step size: norms without batch statistics (acn, scb) let activations grow and
    # diverge at the default lr 0.05 with momentum 0.9 (the screening then rejects the client).
    recorder = run(small_config(tmp_path, rounds=1, norm=norm, lr=0.01, momentum=0.5))
    assert recorder.history[0]["clients_ok"] == 4
    assert recorder.history[0]["train_loss"] == recorder.history[0]["train_loss"]  # not NaN


@pytest.mark.parametrize("policy", ["local", "stats-local"])
def test_client_side_policies_evaluate_exactly_the_clients_that_trained(
        tmp_path: Path, policy: str) -> None:
    # FedBN's protocol: each client evaluates the global model with its own norm state. A client
    # never sampled holds only the initial state and must not lower the reported accuracy.
    config = small_config(tmp_path, clients=8, rounds=2, fraction=0.25, norm_policy=policy)
    recorder = run(config)
    seen: set[int] = set()
    for record in recorder.history:
        assert len(record["sampled"]) == 2
        seen |= set(record["sampled"])
        assert set(map(int, record["accuracy_per_client"])) == seen
        assert record["clients_evaluated"] == len(seen)
        # a context's accuracy is the mean over its evaluated clients
        for name, acc in record["accuracy_per_context"].items():
            k = ["mnist", "usps", "mnistm", "mnist-inverted"].index(name)
            members = [a for p, a in record["accuracy_per_client"].items() if int(p) % 4 == k]
            assert acc == pytest.approx(sum(members) / len(members))
    assert len(seen) < 8  # some clients never trained and were not evaluated


def test_eval_every_evaluates_on_schedule_and_after_the_last_round(tmp_path: Path) -> None:
    config = small_config(tmp_path, rounds=5, eval_every=2)
    recorder = run(config)
    assert [r["round"] for r in recorder.history if "accuracy" in r] == [2, 4, 5]
    assert recorder.summary["rounds"] == 5 and "accuracy" in recorder.summary


def test_per_context_bank_equals_fedbn_with_one_client_per_context(tmp_path: Path) -> None:
    # With one client per context and every client every round, the bank entry of context k is
    # client k's own norm state: the per-context bank and FedBN compute the same run. The FedBN
    # benchmark (benchmarks/fedbn_digits.py) relies on this to share runs between those rows.
    common = dict(clients=4, rounds=2, fraction=1.0, norm="batch")
    bank = run(small_config(tmp_path / "bank", norm_policy="per-context", **common)).history
    fedbn = run(small_config(tmp_path / "fedbn", norm_policy="local", **common)).history
    assert [(r["train_loss"], r["accuracy_per_context"]) for r in bank] == \
        [(r["train_loss"], r["accuracy_per_context"]) for r in fedbn]
