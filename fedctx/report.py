"""Statistics for comparing runs as researchers compare them: mean ± 95% confidence interval
over seeds, and the paired difference of two methods run with the same seeds.

Intervals use Student's t distribution with ``n - 1`` degrees of freedom (seeds are few); with
one value the interval is undefined (``nan``) and printed as such, never as ``± 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values with the half-width of its 95% confidence interval."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below zero (for a difference)."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def format(self, scale: float = 1.0, digits: int = 3) -> str:
        """``"0.837 ± 0.012"`` (values multiplied by ``scale``, e.g. 100 for percent)."""
        if self.n == 0:
            return "–"
        hw = "n/a" if math.isnan(self.half_width) else f"{self.half_width * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {hw}"


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean and the t-interval half-width ``t_{(1+c)/2, n-1} * s / sqrt(n)`` of ``values``."""
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = float(stats.t.ppf((1 + confidence) / 2, n - 1))
    return Estimate(mean, t * sd / math.sqrt(n), n)


def paired_difference(a: dict[int, float], b: dict[int, float],
                      confidence: float = 0.95) -> Estimate:
    """Mean ± CI of ``a[seed] - b[seed]`` over the seeds both have (a paired comparison)."""
    seeds = sorted(set(a) & set(b))
    return mean_ci([a[s] - b[s] for s in seeds], confidence)


def verdict(diff: Estimate, name: str, baseline: str) -> str:
    """A sentence that claims only what the interval of ``diff`` supports."""
    if diff.n < 2:
        return f"{name} vs {baseline}: too few paired seeds to compare."
    if not diff.excludes_zero():
        return (f"{name} and {baseline} are not distinguishable at this budget (paired "
                f"difference {diff.format(100, 1)} points, 95% CI contains 0).")
    word = "higher" if diff.mean > 0 else "lower"
    return (f"{name} is {word} than {baseline} by {abs(diff.mean) * 100:.1f} points (95% CI "
            f"{diff.low * 100:+.1f} to {diff.high * 100:+.1f}, {diff.n} paired seeds).")
