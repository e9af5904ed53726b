"""Confidence intervals and the sentences built from them (fedctx.report)."""

from __future__ import annotations

import math

import pytest

from fedctx.report import mean_ci, paired_difference, verdict


def test_mean_ci_is_the_t_interval() -> None:
    est = mean_ci([0.80, 0.84, 0.82])
    # mean 0.82, sample sd 0.02, t(0.975, 2) = 4.302653
    assert est.mean == pytest.approx(0.82)
    assert est.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert est.format(100, 1) == "82.0 ± 5.0"


def test_one_value_has_no_interval_and_says_so() -> None:
    est = mean_ci([0.5])
    assert math.isnan(est.half_width) and est.format() == "0.500 ± n/a"
    assert not est.excludes_zero()


def test_paired_difference_uses_common_seeds_only() -> None:
    a = {0: 0.90, 1: 0.92, 2: 0.94, 3: 0.5}
    b = {0: 0.80, 1: 0.81, 2: 0.85}
    diff = paired_difference(a, b)
    assert diff.n == 3 and diff.mean == pytest.approx((0.10 + 0.11 + 0.09) / 3)
    assert diff.excludes_zero()
    assert verdict(diff, "A", "B").startswith("A is higher than B by 10.0 points")


def test_verdict_does_not_claim_a_difference_the_interval_does_not_support() -> None:
    diff = paired_difference({0: 0.9, 1: 0.7, 2: 0.85}, {0: 0.8, 1: 0.8, 2: 0.8})
    assert not diff.excludes_zero()
    assert "not distinguishable" in verdict(diff, "A", "B")
