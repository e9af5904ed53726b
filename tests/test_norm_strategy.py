"""NormPolicyStrategy around Flower's own strategies, driven by Flower's ``Strategy.start`` over
in-process grids of plain ClientApps: each strategy does what it is for, the wrapper adds only
the norm policy."""

from __future__ import annotations

import io
import random

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    Krum,
)
from torch import nn

from fedctx.federated import norm_client
from fedctx.federated.local import InProcessGrid
from fedctx.federated.norm_strategy import NormPolicyStrategy

SHARED, NORM = ("0.weight", "0.bias"), ("1.weight", "1.bias", "1.running_mean",
                                        "1.running_var", "1.num_batches_tracked")


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


class PlainClients:
    """A plain ClientApp (no fedctx code): loads ``arrays``, replies with its whole state.

    Node ``pid``'s context is ``pid % 2``; its reply adds ``shift(pid)`` to the shared tensors
    and sets every float norm tensor to ``1 + 4 * context``. Every received message is logged.
    """

    def __init__(self, shift=lambda pid: 0.0, query: bool = True) -> None:
        self.shift, self.query, self.log = shift, query, []

    def __call__(self, msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            if not self.query:
                raise ValueError("no query handler")
            return norm_client.describe(msg, context=pid % 2, partition_id=pid)
        received = msg.content["arrays"].to_torch_state_dict()
        self.log.append((kind, pid, received, dict(msg.content["config"])))
        if kind == MessageType.EVALUATE:
            return Message(RecordDict({"metrics": MetricRecord(
                {"num-examples": 1, "accuracy": 0.5, "partition-id": pid})}), reply_to=msg)
        out = {k: v + self.shift(pid) if k in SHARED else
               (torch.full_like(v, 1.0 + 4 * (pid % 2)) if v.is_floating_point() else v + 1)
               for k, v in received.items()}
        return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord(
            {"num-examples": 10, "train-loss": 1.0, "context": pid % 2})}), reply_to=msg)


class ShuffledGrid(InProcessGrid):
    """Random node ids, as Flower's simulation assigns them."""

    def __init__(self, app, n: int, seed: int) -> None:
        super().__init__(app, n)
        ids = random.Random(seed).sample(range(10**6, 10**7), n)
        old = list(self.contexts)
        self.contexts = {i: self.contexts[o] for i, o in zip(ids, old, strict=True)}


def start(strategy, clients, n: int = 4, rounds: int = 1, grid=None):
    grid = grid or InProcessGrid(clients, n)
    return strategy.start(grid=grid, initial_arrays=ArrayRecord(tiny().state_dict()),
                          num_rounds=rounds)


def sampling(n: int, **extra) -> dict:
    return dict(fraction_train=1.0, min_train_nodes=n, min_available_nodes=n,
                fraction_evaluate=0.0, **extra)


def deviation(result) -> float:
    final, init = result.arrays.to_torch_state_dict(), tiny().state_dict()
    return max(float((final[k] - init[k]).abs().max()) for k in SHARED)


def test_krum_ignores_an_outlier_client() -> None:
    clients = PlainClients(shift=lambda pid: 1000.0 if pid == 4 else 0.01 * pid)
    krum = start(NormPolicyStrategy(Krum(num_malicious_nodes=1, **sampling(5)), tiny(),
                                    "average"), clients, n=5)
    fedavg = start(NormPolicyStrategy(FedAvg(**sampling(5)), tiny(), "average"), clients, n=5)
    assert deviation(krum) < 0.05          # one of the honest clients' weights
    assert deviation(fedavg) > 100         # the mean is dragged by the outlier


def test_fedadam_server_state_moves_and_sees_only_shared_tensors() -> None:
    clients = PlainClients(shift=lambda pid: 0.1)
    inner = FedAdam(eta=0.05, eta_l=0.1, tau=1e-3, **sampling(4))
    wrapper = NormPolicyStrategy(inner, tiny(), "per-context")
    start(wrapper, clients, rounds=1)
    m1 = {k: v.copy() for k, v in inner.m_t.items()}
    assert set(m1) == set(SHARED) and set(inner.v_t) == set(SHARED)
    assert all(abs(v).max() > 0 for v in m1.values())
    start(wrapper, clients, rounds=1)
    assert any(abs(inner.m_t[k] - m1[k]).max() > 0 for k in SHARED)


def test_per_context_bank_reaches_each_context_with_a_plain_client() -> None:
    clients = PlainClients()
    wrapper = NormPolicyStrategy(FedAvg(**sampling(4)), tiny(), "per-context")
    start(wrapper, clients, rounds=2)
    round2 = [(pid, got) for kind, pid, got, cfg in clients.log
              if kind == MessageType.TRAIN and cfg["server-round"] == 2]
    assert len(round2) == 4
    for pid, got in round2:
        assert torch.all(got["1.weight"] == 1.0 + 4 * (pid % 2))   # its context's entry
    assert set(wrapper.norm.bank) == {0, 1}
    assert wrapper.norm_for_context(1)["1.running_mean"].eq(5.0).all()


def test_without_a_query_handler_contexts_are_learnt_from_train_replies() -> None:
    clients = PlainClients(query=False)
    wrapper = NormPolicyStrategy(FedAvg(**sampling(4)), tiny(), "per-context")
    start(wrapper, clients, rounds=2)
    assert {n.context for n in wrapper.nodes.values()} == {0, 1}
    round2 = [(pid, got) for kind, pid, got, cfg in clients.log if cfg["server-round"] == 2]
    assert all(torch.all(got["1.weight"] == 1.0 + 4 * (pid % 2)) for pid, got in round2)


class PerNodeLr(FedAvg):
    """Gives each node its own learning rate (per-node configuration)."""

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for i, msg in enumerate(messages):
            content = RecordDict(dict(msg.content.items()))
            content["config"] = type(msg.content["config"])({**msg.content["config"],
                                                             "lr": 0.1 * (i + 1)})
            msg.content = content
        return messages


def test_inner_per_node_configuration_is_honoured() -> None:
    clients = PlainClients()
    start(NormPolicyStrategy(PerNodeLr(**sampling(4)), tiny(), "local"), clients)
    configs = [cfg for kind, _, _, cfg in clients.log if kind == MessageType.TRAIN]
    assert sorted(round(c["lr"], 3) for c in configs) == [0.1, 0.2, 0.3, 0.4]
    assert all(c["norm-policy"] == "local" for c in configs)


def test_dp_wrapper_inside_clips_shared_tensors_only() -> None:
    clients = PlainClients(shift=lambda pid: 10.0)
    dp = DifferentialPrivacyServerSideFixedClipping(FedAvg(**sampling(4)), noise_multiplier=0.0,
                                                    clipping_norm=0.1, num_sampled_clients=4)
    result = start(NormPolicyStrategy(dp, tiny(), "average"), clients)
    final, init = result.arrays.to_torch_state_dict(), tiny().state_dict()
    update = torch.cat([(final[k] - init[k]).flatten() for k in SHARED])
    assert float(update.norm()) == pytest.approx(0.1, rel=1e-4)   # clipped
    assert torch.all(final["1.weight"] == 3.0)                      # norm averaged, not clipped


def test_sampling_depends_on_seed_round_and_partition_ids_only() -> None:
    def sampled(grid_seed: int, seed: int) -> list[list[int]]:
        clients = PlainClients()
        inner = FedAvg(fraction_train=0.3, min_train_nodes=2, min_available_nodes=10,
                       fraction_evaluate=0.0)
        start(NormPolicyStrategy(inner, tiny(), "average", seed=seed), clients, rounds=3,
              grid=ShuffledGrid(clients, 10, grid_seed))
        return [sorted(pid for kind, pid, _, cfg in clients.log if cfg["server-round"] == r)
                for r in (1, 2, 3)]

    a = sampled(grid_seed=1, seed=7)
    assert a == sampled(grid_seed=2, seed=7)          # other random node ids, same clients
    assert len(a[0]) == 3 and a[0] != a[1]
    assert a != sampled(grid_seed=1, seed=8)


def test_local_policy_with_the_client_helper_keeps_norm_in_context_state() -> None:
    model = tiny()

    def app(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == MessageType.QUERY:
            return norm_client.describe(msg, context=0)
        norm_client.load(model, msg, context)
        with torch.no_grad():
            model[1].running_mean += 1.0 + int(context.node_config["partition-id"])
        if msg.metadata.message_type == MessageType.EVALUATE:
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}),
                           reply_to=msg)
        return norm_client.reply(model, msg, context, {"num-examples": 5, "context": 0})

    grid = InProcessGrid(app, 2)
    inner = FedAvg(**{**sampling(2), "fraction_evaluate": 1.0, "min_evaluate_nodes": 0})
    wrapper = NormPolicyStrategy(inner, tiny(), "local")
    start(wrapper, app, n=2, rounds=2, grid=grid)
    for pid, ctx in enumerate(grid.contexts.values()):
        kept = ctx.state[norm_client.STATE_KEY].to_torch_state_dict()
        # trained twice and evaluated twice: each added (1 + pid) to its own statistics
        assert torch.all(kept["1.running_mean"] == 2 * (1 + pid))
    assert wrapper.norm.bank == {} and torch.equal(
        wrapper.norm.global_norm["1.running_mean"], tiny().state_dict()["1.running_mean"])


class MixedLabels(PlainClients):
    """Partitions 0 and 1 are labelled (label counts [3, 1] and [1, 1] at registration; train
    confidence 0.8 and 0.5 over 10 and 30 examples); partition 2 is unlabelled (no label
    counts, reports ``unlabelled-mask-rate``)."""

    LABELS = {0: [3, 1], 1: [1, 1]}

    def __call__(self, msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if msg.metadata.message_type == MessageType.QUERY:
            described = norm_client.describe(msg, context=pid % 2, partition_id=pid)
            if pid in self.LABELS:
                described.content["metrics"]["label-counts"] = self.LABELS[pid]
            return described
        out = super().__call__(msg, context)
        metrics = out.content["metrics"]
        metrics["num-examples"] = {0: 10, 1: 30, 2: 20}[pid]
        if pid in self.LABELS:
            metrics["confidence"] = {0: 0.8, 1: 0.5}[pid]
        else:
            metrics["unlabelled-mask-rate"] = 0.25
        return out


def test_label_distribution_and_source_confidence_reach_the_train_config() -> None:
    clients = MixedLabels()
    wrapper = NormPolicyStrategy(FedAvg(**sampling(3)), tiny(), "per-context")
    start(wrapper, clients, n=3, rounds=2)
    configs = {(pid, cfg["server-round"]): cfg for kind, pid, _, cfg in clients.log
               if kind == MessageType.TRAIN}
    for pid in range(3):
        assert configs[pid, 1]["label-distribution"] == pytest.approx([4 / 6, 2 / 6])
        assert "source-confidence" not in configs[pid, 1]
        assert configs[pid, 2]["source-confidence"] == pytest.approx((10 * 0.8 + 30 * 0.5) / 40)
    report = wrapper.reports[2]
    assert report.aggregated and report.accepted == 3
    assert report.metrics["unlabelled-mask-rate"] == pytest.approx(0.25)
    assert report.metrics["confidence"] == pytest.approx(0.575)
    state = wrapper.state_dict()
    # tensors, not 10,000 Python lists to pickle every round (issue #13 item 3)
    assert isinstance(state["trained"], torch.Tensor)
    assert all(isinstance(v, torch.Tensor) for v in state["label_counts"].values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = NormPolicyStrategy(FedAvg(**sampling(3)), tiny(), "per-context")
    resumed.load_state_dict(torch.load(buffer, weights_only=True), finished_rounds=2)
    assert resumed.source_confidence == pytest.approx(0.575)
    assert resumed.label_distribution() == pytest.approx([4 / 6, 2 / 6])
    assert resumed.label_counts == wrapper.label_counts == {0: [3, 1], 1: [1, 1]}
    assert resumed.trained == wrapper.trained == {0, 1, 2}
    # a checkpoint written before: lists
    old = {**state, "trained": [0, 1, 2], "label_counts": {0: [3, 1], 1: [1, 1]}}
    earlier = NormPolicyStrategy(FedAvg(**sampling(3)), tiny(), "per-context")
    earlier.load_state_dict(old, finished_rounds=2)
    assert earlier.label_counts == wrapper.label_counts and earlier.trained == {0, 1, 2}
    assert earlier.label_distribution() == pytest.approx([4 / 6, 2 / 6])


def test_no_label_counts_no_label_distribution() -> None:
    clients = PlainClients()
    start(NormPolicyStrategy(FedAvg(**sampling(2)), tiny(), "per-context"), clients, n=2,
          rounds=2)
    assert not any("label-distribution" in cfg or "source-confidence" in cfg
                   for _, _, _, cfg in clients.log)
