"""Intervals for comparisons over seeds: a claim that one method beats another needs more than one run.

`mean_ci` is the Student-t 95% interval of a mean over independent runs (seeds); `paired_ci` the same for the
per-seed differences of two arms run on the same seeds (same data order and student init), which removes the
seed-to-seed variance the two share and is the interval to quote for "A beats B".
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.3f} (n=1)"
        return f"{self.mean:.3f} ± {self.half_width:.3f}"


def t_quantile(level: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def mean_ci(values: list[float], level: float = 0.95) -> Interval:
    """Mean of `values` with its two-sided Student-t interval; NaNs are refused (a failed seed is not a zero)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci: no values")
    if any(math.isnan(x) for x in xs):
        raise ValueError(f"mean_ci: NaN among {xs}")
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return Interval(m, float("nan"), float("nan"), n)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return Interval(m, m - h, m + h, n)


def paired_ci(a: dict, b: dict, level: float = 0.95) -> Interval:
    """Interval of mean(a[s] - b[s]) over the seeds `s` both have; `a`, `b`: seed -> value."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("paired_ci: the two arms share no seed")
    return mean_ci([a[s] - b[s] for s in common], level)
