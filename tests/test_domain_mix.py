"""Issue #12 items 1, 3 (data side) and 6: clients that hold several domains, the partition
options, unlabelled clients, and every new option's one-line refusal of a bad value."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedctx import scenarios
from fedctx.config import SimConfig
from fedctx.data import ClientData
from fedctx.data.partition import (
    domain_mix_split,
    domain_split,
    partition_clients,
    shards_split,
)
from fedctx.federated.run_config import RUNTIME_OPTIONS
from fedctx.federated.training import local_train
from fedctx.norm import ContextNorm2d, use_context

REPO = Path(__file__).resolve().parent.parent


def _build(name: str = "digits", **options: object):
    return scenarios.get_scenario(name).build(SimConfig(scenario=name, **options))


def _covers(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n


# -- partitioners ---------------------------------------------------------------------------------

def test_domain_mix_counts_exact_for_a_seed() -> None:
    """Client i's share of domain d is m_id / sum_j m_jd of its images, m_i ~ Dirichlet(A)
    drawn first from the generator: the counts follow from the same draw exactly."""
    domains = np.repeat(np.arange(3), [50, 80, 70])
    labels = np.arange(200) % 10
    parts = domain_mix_split(domains, labels, 5, 0.5, np.random.default_rng(7))
    _covers(parts, 200)
    mix = np.random.default_rng(7).dirichlet(np.full(3, 0.5), size=5)
    for d, n in enumerate((50, 80, 70)):
        cuts = (np.cumsum(mix[:, d] / mix[:, d].sum())[:-1] * n).astype(int)
        expected = np.diff([0, *cuts, n])
        got = [int(np.sum(domains[p] == d)) for p in parts]
        assert got == expected.tolist()


def test_domain_mix_concentration() -> None:
    domains = np.repeat(np.arange(4), 1000)
    labels = np.tile(np.arange(10), 400)

    def main_share(alpha: float) -> float:
        parts = domain_mix_split(domains, labels, 20, alpha, np.random.default_rng(0))
        return float(np.mean([np.bincount(domains[p], minlength=4).max() / len(p)
                              for p in parts]))

    assert main_share(0.1) > 0.75 and main_share(100.0) < 0.35


def test_domain_mix_label_skew_and_min_size() -> None:
    domains = np.repeat(np.arange(2), 300)
    labels = np.tile(np.arange(10), 60)
    parts = partition_clients(domains, labels, 6, np.random.default_rng(1), domain_alpha=1.0,
                              partition="dirichlet", alpha=0.1)
    _covers(parts, 600)
    skew = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(skew) > 0.3  # IID would give about 0.1
    with pytest.raises(ValueError, match="--domain-alpha 0.01: every draw"):
        domain_mix_split(domains, labels, 6, 0.01, np.random.default_rng(0), min_size=200)


def test_one_domain_per_client_iid_is_domain_split() -> None:
    domains = np.repeat(np.arange(3), [40, 30, 50])
    labels = np.arange(120) % 10
    a = partition_clients(domains, labels, 7, np.random.default_rng(3))
    b = domain_split(domains, 7, np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_shards_exact() -> None:
    labels = np.repeat(np.arange(4), 6)  # 24 samples, 4 classes: 8 shards of one class each
    parts = shards_split(labels, 4, 2, np.random.default_rng(0))
    _covers(parts, 24)
    assert [len(p) for p in parts] == [6, 6, 6, 6]
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert sorted(np.concatenate([np.unique(labels[p]) for p in parts]).tolist()) != [0, 1, 2, 3]
    one_domain = partition_clients(np.zeros(24, dtype=np.int64), labels, 4,
                                   np.random.default_rng(0), partition="shards")
    assert all(np.array_equal(x, y) for x, y in zip(parts, one_domain, strict=True))


def test_digits_default_is_one_domain_per_client() -> None:
    data = _build(clients=8)
    assert [c.context for c in data.clients] == [0, 1, 2, 3] * 2
    assert all(bool((c.contexts == c.context).all()) for c in data.clients)


def test_digits_domain_mix_keeps_the_pool() -> None:
    one = _build(clients=10)
    mixed = _build(clients=10, domain_alpha=1.0)
    assert one.context_counts().sum(0).tolist() == mixed.context_counts().sum(0).tolist()
    assert (mixed.context_counts() > 0).sum(1).float().mean() > 2  # several domains a client
    assert sum(len(c) for c in mixed.clients) == sum(len(c) for c in one.clients)


# -- a client with two contexts ------------------------------------------------------------------

def test_two_contexts_in_one_client_use_their_own_statistics() -> None:
    """Local training of a client holding two contexts: each context's samples are normalized
    with their own batch statistics, and each context's running statistics follow exactly those
    of a separate BatchNorm fed only that context's samples of every batch."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(40, 3, 4, 4), 3 + 2 * torch.randn(40, 3, 4, 4)])
    contexts = torch.tensor([0] * 40 + [1] * 40)
    shuffle = torch.randperm(80)  # contexts interleaved in every batch
    x, contexts = x[shuffle], contexts[shuffle]
    data = ClientData(x, torch.randint(0, 2, (80,)), contexts)
    norm = ContextNorm2d(3, num_contexts=2)
    model = nn.Sequential(norm, nn.Flatten(), nn.Linear(48, 2))
    separate = [nn.BatchNorm2d(3), nn.BatchNorm2d(3)]
    with torch.no_grad():  # train mode: outputs equal per context
        with use_context(model, contexts):
            mixed = norm(x)
        for k, bn in enumerate(separate):
            torch.testing.assert_close(mixed[contexts == k], bn(x[contexts == k]))
    norm.reset_running_stats()
    separate = [nn.BatchNorm2d(3), nn.BatchNorm2d(3)]
    local_train(model, data, epochs=2, batch_size=16, lr=0.0, momentum=0.0, weight_decay=0.0,
                generator=torch.Generator().manual_seed(1))
    order = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            perm = torch.randperm(80, generator=order)
            for start in range(0, 80, 16):
                idx = perm[start:start + 16]
                for k, bn in enumerate(separate):
                    bn(x[idx][contexts[idx] == k])
    for k, bn in enumerate(separate):
        torch.testing.assert_close(norm.running_mean[k], bn.running_mean)
        torch.testing.assert_close(norm.running_var[k], bn.running_var)
    assert not torch.allclose(norm.running_mean[0], norm.running_mean[1], atol=0.5)


# -- unlabelled clients --------------------------------------------------------------------------

def test_unlabelled_client_has_no_labels() -> None:
    data = _build(clients=8, unlabelled_domains="usps,mnistm")
    for c in data.clients:
        name = data.context_names[c.context]
        if name in ("usps", "mnistm"):
            assert c.y is None and not c.labelled
            tensors = {k for k, v in vars(c).items() if isinstance(v, torch.Tensor)}
            assert tensors == {"x", "contexts"}  # images and contexts, nothing else
            assert len(c) == len(c.x) > 0
        else:
            assert c.y is not None and len(c.y) == len(c)
    counts = data.label_counts()
    unlabelled = [i for i, c in enumerate(data.clients) if c.y is None]
    assert len(unlabelled) == 4 and counts[unlabelled].sum() == 0
    assert data.unlabelled_domains == ["usps", "mnistm"]
    assert all(len(y) for _, y in data.test.values())  # test sets keep their labels


def test_client_data_lengths() -> None:
    with pytest.raises(ValueError, match="same length"):
        ClientData(torch.zeros(3, 1), torch.zeros(2, dtype=torch.long), torch.zeros(3).long())
    assert len(ClientData(torch.zeros(3, 1), None, torch.zeros(3, dtype=torch.long))) == 3


def test_holdout_domain_has_no_clients() -> None:
    data = _build(clients=6, holdout_domain="mnistm")
    assert data.context_names == ["mnist", "usps", "mnist-inverted"]
    assert data.holdout is not None and data.holdout[0] == "mnistm"
    assert len(data.holdout[1]) == len(data.holdout[2]) == 300
    assert {c.context for c in data.clients} == {0, 1, 2}


# -- the options ---------------------------------------------------------------------------------

def test_run_config_table_matches_simconfig() -> None:
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = SimConfig()
    for key, value in table.items():
        assert value == getattr(defaults, key.replace("-", "_")), key
    deciding = {f.name for f in fields(SimConfig)} - RUNTIME_OPTIONS
    assert not sorted(deciding - {k.replace("-", "_") for k in table})
    # Flower refuses a --run-config key the table lacks: only the options that choose how
    # `python -m fedctx.simulate` itself runs are left out (the README says which)
    left_out = {f.name for f in fields(SimConfig)} - {k.replace("-", "_") for k in table}
    assert left_out == {"backend", "num_cpus", "ray_address", "verbose"}


def _refused(capsys: pytest.CaptureFixture, tmp_path: Path, *argv: str) -> str:
    from fedctx.simulate import main

    out = tmp_path / "out"
    rc = main([*argv, "--backend", "inprocess", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("error: "), (rc, err)
    assert not out.exists()  # nothing touched
    return err


@pytest.mark.parametrize("argv,message", [
    (["--domain-alpha", "-1"], "--domain-alpha: invalid value -1.0; must be >= 0.0"),
    (["--domain-alpha", "x"], "--domain-alpha: invalid value 'x'; expected float"),
    (["--partition", "pathological"], "--partition: invalid value 'pathological'; valid "
                                      "choices: iid, dirichlet, shards"),
    (["--alpha", "0"], "--alpha: invalid value 0.0; must be > 0.0"),
    (["--alpha", "nan"], "--alpha: invalid value 'nan'; must be a finite number"),
    (["--holdout-domain", "svhn"], "--holdout-domain: 'svhn' is no domain of scenario 'digits'; "
                                   "valid choices: mnist, usps, mnistm, mnist-inverted"),
    (["--unseen-rule", "oracle"], "--unseen-rule: invalid value 'oracle'; valid choices: "
                                  "bank-mean, batch-stats, nearest"),
    (["--unlabelled-domains", "usps,nope"], "--unlabelled-domains: 'nope' is no domain"),
    (["--unlabelled-domains", "usps,,mnistm"], "--unlabelled-domains: invalid value"),
    (["--unlabelled-domains", "usps,usps"], "--unlabelled-domains: invalid value"),
    (["--unlabelled-domains", "mnist,usps,mnistm,mnist-inverted"], "no training domain would "
                                                                   "keep its labels"),
    (["--holdout-domain", "usps", "--unlabelled-domains", "usps"],
     "--holdout-domain usps is also in --unlabelled-domains"),
    (["--unlabelled-domains", "usps", "--domain-alpha", "1"], "needs one domain per client"),
    (["--partition", "shards", "--domain-alpha", "1"], "--partition shards deals label shards"),
    (["--contexts", "cluster"], "--contexts: invalid value 'cluster'; valid choices: domain, "
                                "kmeans"),
    (["--num-contexts", "3"], "--num-contexts 3 applies to --contexts kmeans only"),
    (["--contexts", "kmeans", "--num-contexts", "-2"], "--num-contexts: invalid value -2"),
    (["--scenario", "cifar10-dirichlet", "--domain-alpha", "1"],
     "--domain-alpha 1.0: scenario 'cifar10-dirichlet' has one domain"),
    (["--scenario", "cifar10-dirichlet", "--contexts", "kmeans"],
     "--contexts kmeans: scenario 'cifar10-dirichlet' has one domain"),
    (["--scenario", "mnist-usps", "--holdout-domain", "mnistm"],
     "--holdout-domain: 'mnistm' is no domain of scenario 'mnist-usps'; valid choices: mnist, "
     "usps"),
])
def test_bad_values_one_line(capsys: pytest.CaptureFixture, tmp_path: Path, argv: list[str],
                             message: str) -> None:
    assert message in _refused(capsys, tmp_path, *argv)


def test_bad_value_in_config_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('domain-alpha = -0.5\n')
    assert "--domain-alpha: invalid value -0.5" in _refused(capsys, tmp_path, "--config",
                                                            str(path))


def test_real_pair_domain_options(real_data: Path) -> None:
    """The real-data digit scenarios honour the domain options (``federate``)."""
    mixed = _build("mnist-usps", clients=4, domain_alpha=1.0, data_dir=str(real_data))
    assert sum(len(c) for c in mixed.clients) == 4 * 743
    assert mixed.context_counts().sum(0).tolist() == [2 * 743, 2 * 743]
    unlabelled = _build("mnist-usps", clients=4, unlabelled_domains="usps",
                        data_dir=str(real_data))
    assert [c.y is None for c in unlabelled.clients] == [False, True, False, True]
    held = _build("mnist-usps", clients=3, holdout_domain="usps", data_dir=str(real_data))
    assert held.context_names == ["mnist"] and held.holdout[0] == "usps"
    assert [len(c) for c in held.clients] == [743] * 3 and len(held.holdout[2]) == 2000
