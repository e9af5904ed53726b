"""Normalization tensors merged as robustly as the strategy merges the shared weights (#14 item
9): one client scaling its norm tensors by 1e6 cannot poison them under Krum, FedMedian or
FedTrimmedAvg (per context for ``per-context``), while the weighted mean (FedAvg) is dragged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from test_norm_strategy import sampling, start, tiny

from fedctx.federated import norm_client
from fedctx.federated.norm_strategy import NormPolicyStrategy, norm_rule
from fedctx.federated.params import coordinate_median, krum, trimmed_mean, weighted_average

N = 10           # clients; contexts pid % 2, five each
ATTACKER = 4     # a client of context 0
NORM_FLOAT = ("1.weight", "1.bias", "1.running_mean", "1.running_var")


def honest_value(pid: int) -> float:
    return 1.0 + 0.1 * pid


class Attacked:
    """Plain clients: every float norm tensor of client ``pid`` is ``1 + 0.1 pid``; the
    attacker multiplies its norm tensors by 1e6."""

    def __call__(self, msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if msg.metadata.message_type == MessageType.QUERY:
            return norm_client.describe(msg, context=pid % 2, partition_id=pid, num_examples=10)
        state = msg.content["arrays"].to_torch_state_dict()
        for key in NORM_FLOAT:
            state[key] = torch.full_like(state[key], honest_value(pid))
            if pid == ATTACKER:
                state[key] *= 1e6
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(
            {"num-examples": 10, "train-loss": 0.1, "context": pid % 2})}), reply_to=msg)


def merged_norm(inner, policy: str) -> dict[int, dict[str, torch.Tensor]]:
    """Context -> the norm tensors the server holds for it after one round."""
    strategy = NormPolicyStrategy(inner, tiny(), policy)
    start(strategy, Attacked(), n=N)
    return {k: strategy.norm_for_context(k) for k in (0, 1)}


def honest_range(context: int | None) -> tuple[float, float]:
    values = [honest_value(p) for p in range(N)
              if p != ATTACKER and (context is None or p % 2 == context)]
    return min(values), max(values)


ROBUST = {
    "fedmedian": lambda: FedMedian(**sampling(N)),
    "krum": lambda: Krum(num_malicious_nodes=1, **sampling(N)),
    "multikrum": lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3, **sampling(N)),
    "fedtrimmedavg": lambda: FedTrimmedAvg(beta=0.2, **sampling(N)),
}


@pytest.mark.parametrize("name", sorted(ROBUST))
@pytest.mark.parametrize("policy", ["average", "per-context"])
def test_robust_strategies_keep_norm_tensors_in_the_honest_range(name: str, policy: str
                                                                 ) -> None:
    norm = merged_norm(ROBUST[name](), policy)
    for k in (0, 1):
        low, high = honest_range(k if policy == "per-context" else None)
        for key in NORM_FLOAT:
            assert low - 1e-6 <= float(norm[k][key].min()) <= float(norm[k][key].max()) \
                <= high + 1e-6, (name, policy, k, key)


@pytest.mark.parametrize("policy", ["average", "per-context"])
def test_the_weighted_mean_is_poisoned(policy: str) -> None:
    norm = merged_norm(FedAvg(**sampling(N)), policy)
    assert float(norm[0]["1.running_var"].max()) > 1e4    # the attacker's context


def test_rules_match_flowers_aggregations() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 4)) for _ in range(7)]
    states = [{"w": torch.from_numpy(a)} for a in arrays]
    weights = [float(w) for w in rng.integers(1, 9, size=7)]
    np.testing.assert_allclose(coordinate_median(states, weights)["w"],
                               np.median(np.stack(arrays), axis=0))
    np.testing.assert_allclose(coordinate_median(states[:6], weights)["w"],
                               np.median(np.stack(arrays[:6]), axis=0))
    np.testing.assert_allclose(trimmed_mean(0.2)(states, weights)["w"],
                               trim_mean(np.stack(arrays), 0.2))
    contents = [RecordDict({"arrays": ArrayRecord([a]), "metrics": MetricRecord(
        {"num-examples": int(w)})}) for a, w in zip(arrays, weights, strict=True)]
    chosen = select_multikrum(contents, num_malicious_nodes=1, num_nodes_to_select=3)
    index = [next(i for i, c in enumerate(contents) if c is ch) for ch in chosen]
    expected = weighted_average([states[i] for i in index], [weights[i] for i in index])
    torch.testing.assert_close(krum(1, 3)(states, weights)["w"], expected["w"])


def test_a_plugin_declares_its_rule_and_wrappers_are_seen_through() -> None:
    class Declared(FedAvg):
        norm_rule = staticmethod(coordinate_median)

    assert norm_rule(Declared()) is coordinate_median
    assert norm_rule(FedAvg()) is weighted_average
    dp = DifferentialPrivacyServerSideFixedClipping(FedMedian(), noise_multiplier=0.0,
                                                    clipping_norm=1.0, num_sampled_clients=2)
    assert norm_rule(dp) is coordinate_median
