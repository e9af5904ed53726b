"""Issue #12 item 2: a held-out domain evaluated by the server under each rule, on tiny cases
whose answer is known; and one short run that records every rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fedctx.federated.unseen import context_view, evaluate_unseen, gaussian_kl, nearest_entry
from fedctx.norm import ContextNorm2d


def _sign_model() -> nn.Sequential:
    """Class 0 when the normalized input is positive, class 1 otherwise."""
    model = nn.Sequential(nn.BatchNorm1d(1, affine=False), nn.Linear(1, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[1].bias.zero_()
    return model


def _bn_entry(mean: float, var: float = 1.0) -> dict[str, torch.Tensor]:
    return {"0.running_mean": torch.tensor([mean]), "0.running_var": torch.tensor([var]),
            "0.num_batches_tracked": torch.tensor(1)}


def _shared(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("0.")}


def _signed(center: float, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points ``center ± 1``; label 0 above the center, 1 below."""
    sign = torch.tensor([1.0, -1.0]).repeat(n // 2)
    return (center + sign).unsqueeze(1), (sign < 0).long()


def test_bank_mean_uses_the_mean_of_the_entries() -> None:
    model = _sign_model()
    x, y = _signed(0.0)
    entries = {0: _bn_entry(-2.0), 1: _bn_entry(2.0)}  # mean 0: the test set's own center
    acc = evaluate_unseen(model, _shared(model), entries, None, x, y)
    assert acc["bank-mean"] == 1.0
    one = evaluate_unseen(model, _shared(model), {0: _bn_entry(-2.0)}, None, x, y)
    assert one["bank-mean"] == 0.5  # every point lands above -2: all class 0


def test_batch_stats_normalizes_each_batch_with_its_own_statistics() -> None:
    model = _sign_model()
    x, y = _signed(7.0)
    entries = {0: _bn_entry(10.0), 1: _bn_entry(12.0)}
    acc = evaluate_unseen(model, _shared(model), entries, None, x, y)
    assert acc["bank-mean"] == 0.5 and acc["batch-stats"] == 1.0
    assert float(entries[0]["0.running_mean"]) == 10.0  # nothing updated
    only_server = evaluate_unseen(model, _shared(model), None, _bn_entry(10.0), x, y)
    assert only_server == {"batch-stats": 1.0}
    assert evaluate_unseen(model, _shared(model), None, None, x, y) == {}


def test_nearest_picks_the_entry_of_the_same_domain() -> None:
    torch.manual_seed(0)
    model = _sign_model()
    domains = {0: (0.0, 1.0), 1: (5.0, 4.0), 2: (-3.0, 0.25)}
    entries = {}
    for k, (mean, var) in domains.items():  # each entry's statistics computed on its domain
        bn = nn.BatchNorm1d(1, affine=False, momentum=None)
        bn(mean + var ** 0.5 * torch.randn(2000, 1))
        entries[k] = {"0." + n: t.clone() for n, t in bn.state_dict().items()}
    for k, (mean, var) in domains.items():
        batch = mean + var ** 0.5 * torch.randn(256, 1)
        assert nearest_entry(model, entries, batch) == k
    x, y = _signed(5.0)  # a domain centred on entry 1's mean
    acc = evaluate_unseen(model, _shared(model), entries, None, x, y)
    assert acc["nearest"] == 1.0 and acc["bank-mean"] < 1.0


def test_nearest_with_context_norm_rows() -> None:
    """A context-aware layer's entry is seen through its own context: row k."""
    torch.manual_seed(1)
    model = nn.Sequential(ContextNorm2d(2, num_contexts=2))
    state = model.state_dict()
    state["0.running_mean"] = torch.tensor([[0.0, 0.0], [4.0, -4.0]])
    state["0.running_var"] = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    views = {k: context_view(model, state, k) for k in (0, 1)}
    assert torch.equal(views[1]["0.running_mean"], torch.tensor([[4.0, -4.0], [4.0, -4.0]]))
    batch = torch.randn(64, 2, 3, 3) * 2 ** 0.5 + torch.tensor([4.0, -4.0]).view(1, 2, 1, 1)
    assert nearest_entry(model, views, batch) == 1
    assert nearest_entry(model, views, torch.randn(64, 2, 3, 3)) == 0


def test_gaussian_kl() -> None:
    zero = torch.zeros(3)
    assert float(gaussian_kl(zero, zero + 1, zero, zero + 1)) == pytest.approx(0.0, abs=1e-9)
    # KL(N(0,1) || N(1,1)) = 1/2 per channel
    assert float(gaussian_kl(zero, zero + 1, zero + 1, zero + 1, eps=0)) == pytest.approx(1.5)


@pytest.mark.slow
def test_holdout_and_kmeans_run_records_every_rule(tmp_path: Path) -> None:
    from fedctx.simulate import main

    out = tmp_path / "run"
    rc = main(["--clients", "6", "--rounds", "1", "--fraction", "1", "--norm", "batch",
               "--holdout-domain", "mnist-inverted", "--unseen-rule", "nearest",
               "--contexts", "kmeans", "--backend", "inprocess", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    holdout = summary["holdout"]
    assert holdout["domain"] == "mnist-inverted" and holdout["rule"] == "nearest"
    assert set(holdout["accuracy_per_rule"]) == {"bank-mean", "batch-stats", "nearest"}
    assert holdout["accuracy"] == holdout["accuracy_per_rule"]["nearest"]
    assert 0.0 <= summary["context_ari"] <= 1.0
    assert summary["contexts"] == ["cluster0", "cluster1", "cluster2"]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(last["holdout_accuracy"]) == set(holdout["accuracy_per_rule"])
