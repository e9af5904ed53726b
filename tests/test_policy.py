"""Norm policies on exact numbers, and the split of a model's state by module type."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fedctx.federated.params import split_state, weighted_average
from fedctx.federated.policy import (
    NormPolicy,
    NormUpdate,
    ServerNormState,
    client_split_reply,
    merge_client_norm,
)
from fedctx.models import make_model
from fedctx.norm import ContextNorm1d, norm_layer


class OddNames(nn.Module):
    """Norm layers whose names contain no 'bn' (FedBN's substring rule misses them)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scaler = nn.BatchNorm2d(4)
        self.bnlike_linear = nn.Linear(4, 2)  # name contains 'bn', is not a norm


def test_split_by_module_type_not_by_name() -> None:
    s = split_state(OddNames())
    assert set(s.norm_affine) == {"scaler.weight", "scaler.bias"}
    assert set(s.norm_stats) == {"scaler.running_mean", "scaler.running_var",
                                 "scaler.num_batches_tracked"}
    assert set(s.shared) == {"conv.weight", "conv.bias", "bnlike_linear.weight",
                             "bnlike_linear.bias"}


def test_split_torchvision_and_context_models() -> None:
    resnet = torchvision.models.resnet18(num_classes=10)
    s = split_state(resnet)
    bn_keys = {k for k in resnet.state_dict() if ".bn" in k or k.startswith("bn1")
               or ".downsample.1." in k}
    assert set(s.norm) == bn_keys
    assert set(s.shared) | set(s.norm) == set(resnet.state_dict())
    ctx_resnet = torchvision.models.resnet18(num_classes=10,
                                             norm_layer=norm_layer("context", num_contexts=3))
    assert {k.rsplit(".", 1)[1] for k in split_state(ctx_resnet).norm} == {
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    cnn = make_model("digits-cnn", norm="context", num_contexts=4, width=4)
    s = split_state(cnn)
    assert all(cnn.state_dict()[k].shape[0] == 4 for k in s.norm)
    assert not any(k.startswith("features.0.") for k in s.norm)


def test_weighted_average_keeps_integers_integer() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(7)}
    out = weighted_average([a, b], [1, 2])
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 6.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 7


def _model_and_state() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = OddNames()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _norm_values(split, value: float) -> dict[str, torch.Tensor]:
    _, state = _model_and_state()
    return {k: (torch.full_like(state[k], value) if state[k].is_floating_point()
                else torch.tensor(int(value))) for k in split.norm}


def test_average_policy() -> None:
    model, init = _model_and_state()
    split = split_state(model)
    server = ServerNormState(NormPolicy.AVERAGE, split, init)
    server.update([NormUpdate(0, 10, _norm_values(split, 1.0)),
                   NormUpdate(1, 30, _norm_values(split, 5.0))])
    for k in split.norm_affine:
        assert torch.all(server.outgoing(0)[k] == 4.0) and torch.all(server.outgoing(7)[k] == 4.0)
    assert int(server.outgoing(0)["scaler.num_batches_tracked"]) == 5
    assert server.for_evaluation(1) is not None


def test_per_context_policy_bank() -> None:
    model, init = _model_and_state()
    split = split_state(model)
    server = ServerNormState(NormPolicy.PER_CONTEXT, split, init)
    w = "scaler.weight"
    # unseen context before any update: the initial state
    torch.testing.assert_close(server.outgoing(0)[w], init[w])
    server.update([NormUpdate(0, 10, _norm_values(split, 1.0)),
                   NormUpdate(0, 30, _norm_values(split, 3.0)),
                   NormUpdate(1, 5, _norm_values(split, 8.0))])
    assert torch.all(server.outgoing(0)[w] == 2.5)   # (10*1 + 30*3) / 40
    assert torch.all(server.outgoing(1)[w] == 8.0)
    # a context never seen starts from the mean of the known entries
    assert torch.all(server.outgoing(2)[w] == 5.25)
    # a round with only context 1: context 0 keeps its entry
    server.update([NormUpdate(1, 5, _norm_values(split, 2.0))])
    assert torch.all(server.outgoing(0)[w] == 2.5) and torch.all(server.outgoing(1)[w] == 2.0)
    # evaluation of context k uses entry k
    assert torch.all(server.for_evaluation(1)[w] == 2.0)


def test_local_policy_never_sends_norm() -> None:
    model, init = _model_and_state()
    split = split_state(model)
    server = ServerNormState(NormPolicy.LOCAL, split, init)
    assert server.expected_reply_keys() == ()
    trained = _norm_values(split, 9.0)
    sent, kept = client_split_reply(NormPolicy.LOCAL, split, trained)
    assert sent == {} and kept == trained
    received = server.outgoing(0)
    merged = merge_client_norm(NormPolicy.LOCAL, split, received, kept)
    assert all(torch.equal(merged[k], kept[k]) for k in split.norm)
    # first participation: nothing kept yet, the client starts from what it received
    assert merge_client_norm(NormPolicy.LOCAL, split, received, None) is received
    assert server.for_evaluation(0) is None


def test_stats_local_policy() -> None:
    model, init = _model_and_state()
    split = split_state(model)
    server = ServerNormState(NormPolicy.STATS_LOCAL, split, init)
    assert set(server.expected_reply_keys()) == set(split.norm_affine)
    a, b = _norm_values(split, 2.0), _norm_values(split, 6.0)
    sent_a, kept_a = client_split_reply(NormPolicy.STATS_LOCAL, split, a)
    sent_b, _ = client_split_reply(NormPolicy.STATS_LOCAL, split, b)
    assert set(sent_a) == set(split.norm_affine) and set(kept_a) == set(split.norm_stats)
    server.update([NormUpdate(0, 1, sent_a), NormUpdate(1, 3, sent_b)])
    out = server.outgoing(0)
    assert torch.all(out["scaler.weight"] == 5.0)  # (1*2 + 3*6) / 4
    torch.testing.assert_close(out["scaler.running_mean"], init["scaler.running_mean"])
    merged = merge_client_norm(NormPolicy.STATS_LOCAL, split, out, kept_a)
    assert torch.all(merged["scaler.weight"] == 5.0)
    assert torch.all(merged["scaler.running_mean"] == 2.0)


@pytest.mark.parametrize("policy", list(NormPolicy))
def test_policy_names(policy: NormPolicy) -> None:
    assert NormPolicy(str(policy)) is policy


def test_every_fedctx_norm_is_classified_as_norm() -> None:
    """Whatever the norm layer, the digits CNN's conv/linear tensors are shared and every tensor
    of the norm layers (affine, statistics, banks, mixture parameters) is normalization."""
    from fedctx.norm import available

    for name in available():
        model = make_model("digits-cnn", norm=name, num_contexts=2, width=4)
        layers = dict(model.named_modules())
        s = split_state(model)
        for key in s.shared:
            owner = layers[key.rsplit(".", 1)[0]]
            assert isinstance(owner, nn.Conv2d | nn.Linear), (name, key)
        for key in s.norm:
            assert not isinstance(layers[key.split(".")[0] + "." + key.split(".")[1]],
                                  nn.Conv2d | nn.Linear), (name, key)
        if name != "none":
            assert s.norm, name


class TwoContexts(nn.Module):
    """A ContextNorm (rows by context, K = 2) and a BatchNorm (one state per client)."""

    def __init__(self) -> None:
        super().__init__()
        self.ctx = ContextNorm1d(3, num_contexts=2)
        self.bn = nn.BatchNorm1d(3)


def _client_norm(split, value: float) -> dict[str, torch.Tensor]:
    """Every float norm tensor full of ``value``, row k of the ContextNorm's ``value + k``."""
    state = TwoContexts().state_dict()
    out = {}
    for key in split.norm:
        t = state[key]
        if not t.is_floating_point():
            out[key] = torch.full_like(t, int(value))
        elif key in split.by_context:
            out[key] = torch.stack([torch.full_like(t[k], value + k) for k in range(2)])
        else:
            out[key] = torch.full_like(t, value)
    return out


def test_per_context_weighted_by_context_counts_exact() -> None:
    """Client A holds 30 samples of context 0 and 10 of context 1; client B 20 of context 1.
    Row 0 is A's alone, row 1 = (10 A + 20 B) / 30; the BatchNorm's entry k averages the
    holders of k weighted by their count of k; every entry carries both rows."""
    model = TwoContexts()
    split = split_state(model)
    assert set(split.by_context) == {f"ctx.{n}" for n in (
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    server = ServerNormState(NormPolicy.PER_CONTEXT, split, model.state_dict())
    a, b = _client_norm(split, 1.0), _client_norm(split, 4.0)
    server.update([NormUpdate(0, 40, a, context_counts=[30, 10]),
                   NormUpdate(1, 20, b, context_counts=[0, 20])])
    row0, row1 = 1.0 + 0, (10 * (1.0 + 1) + 20 * (4.0 + 1)) / 30
    for k in (0, 1):
        entry = server.outgoing(k)
        for key in ("ctx.weight", "ctx.running_mean", "ctx.running_var"):
            torch.testing.assert_close(entry[key][0], torch.full((3,), row0))
            torch.testing.assert_close(entry[key][1], torch.full((3,), row1))
        assert entry["ctx.num_batches_tracked"].tolist() == [1, 4]
    torch.testing.assert_close(server.outgoing(0)["bn.running_mean"], torch.full((3,), 1.0))
    torch.testing.assert_close(server.outgoing(1)["bn.running_mean"],
                               torch.full((3,), (10 * 1.0 + 20 * 4.0) / 30))
    # a later round with only context-1 holders leaves row 0 (and entry 0's BatchNorm) alone
    server.update([NormUpdate(1, 20, _client_norm(split, 7.0), context_counts=[0, 20])])
    torch.testing.assert_close(server.outgoing(0)["ctx.weight"][0], torch.full((3,), row0))
    torch.testing.assert_close(server.outgoing(0)["ctx.weight"][1], torch.full((3,), 8.0))
    torch.testing.assert_close(server.outgoing(0)["bn.running_mean"], torch.full((3,), 1.0))


def test_without_context_counts_a_client_counts_its_examples_at_its_context() -> None:
    model = TwoContexts()
    split = split_state(model)
    with_counts = ServerNormState(NormPolicy.PER_CONTEXT, split, model.state_dict())
    without = ServerNormState(NormPolicy.PER_CONTEXT, split, model.state_dict())
    a, b = _client_norm(split, 1.0), _client_norm(split, 4.0)
    with_counts.update([NormUpdate(0, 40, a, [40, 0]), NormUpdate(1, 20, b, [0, 20])])
    without.update([NormUpdate(0, 40, a), NormUpdate(1, 20, b)])
    for k in (0, 1):
        for key in split.norm:
            torch.testing.assert_close(with_counts.outgoing(k)[key], without.outgoing(k)[key])
    # the row a context's clients use is theirs, as with one bank entry per context
    assert torch.all(without.outgoing(1)["ctx.weight"][1] == 5.0)
