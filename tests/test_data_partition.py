"""Partitioners: disjoint, complete, sizes, reproducible, label skew growing as alpha shrinks."""

from __future__ import annotations

import numpy as np
import pytest

from fedctx.data.partition import (
    assign_domains,
    classes_split,
    dirichlet_split,
    domain_dirichlet_split,
    domain_split,
    iid_split,
)

LABELS = np.random.default_rng(0).integers(0, 10, 3000)
DOMAINS = np.repeat(np.arange(3), 1000)


def _check_disjoint_complete(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == n, "parts overlap or miss samples"
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def _rng(seed: int = 1) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_iid_split() -> None:
    parts = iid_split(1003, 10, _rng())
    _check_disjoint_complete(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}


def test_dirichlet_split_invariants_and_seed() -> None:
    parts = dirichlet_split(LABELS, 12, 0.3, _rng(), min_size=5)
    _check_disjoint_complete(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 5
    again = dirichlet_split(LABELS, 12, 0.3, _rng(), min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_split(LABELS, 12, 0.3, _rng(2), min_size=5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def _skew(parts: list[np.ndarray]) -> float:
    """Mean over clients of the share of their most frequent class (0.1 = balanced, 1 = one)."""
    return float(np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skews = [np.mean([_skew(dirichlet_split(LABELS, 10, a, _rng(s))) for s in range(3)])
             for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.2 and skews[2] > 0.5


def test_dirichlet_errors() -> None:
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_split(LABELS, 4, 0.0, _rng())
    with pytest.raises(ValueError, match="raise alpha"):
        dirichlet_split(LABELS[:30], 10, 0.01, _rng(), min_size=3, max_tries=3)


@pytest.mark.parametrize("num_parts,k", [(10, 2), (7, 3), (20, 1), (3, 10)])
def test_classes_split(num_parts: int, k: int) -> None:
    parts = classes_split(LABELS, num_parts, k, _rng())
    _check_disjoint_complete(parts, len(LABELS))
    assert all(len(np.unique(LABELS[p])) == k for p in parts)


def test_classes_split_too_few_clients_leaves_classes_out() -> None:
    parts = classes_split(LABELS, 3, 2, _rng())
    assert len(np.unique(LABELS[np.concatenate(parts)])) == 6
    with pytest.raises(ValueError, match="classes per client must be in 1..10"):
        classes_split(LABELS, 3, 11, _rng())


def test_domain_split() -> None:
    parts = domain_split(DOMAINS, 7, _rng())
    _check_disjoint_complete(parts, len(DOMAINS))
    for i, p in enumerate(parts):
        assert set(DOMAINS[p]) == {i % 3}
    sizes = [len(p) for p in parts]
    assert sizes[0::3] == [334, 333, 333] and sizes[1::3] == [500, 500]
    with pytest.raises(ValueError, match="--clients >= 3"):
        domain_split(DOMAINS, 2, _rng())


def test_domain_dirichlet_split() -> None:
    parts = domain_dirichlet_split(DOMAINS, LABELS, 9, 0.2, _rng())
    _check_disjoint_complete(parts, len(DOMAINS))
    assert [set(DOMAINS[p]) for p in parts] == [{i % 3} for i in range(9)]
    again = domain_dirichlet_split(DOMAINS, LABELS, 9, 0.2, _rng())
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert _skew(parts) > _skew(domain_split(DOMAINS, 9, _rng()))


def test_assign_domains_round_robin() -> None:
    assert assign_domains(5, 2).tolist() == [0, 1, 0, 1, 0]
