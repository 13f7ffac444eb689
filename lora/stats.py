"""Paired statistics for comparing two arms (base vs adapter) on the same rows.

- `mcnemar`: McNemar's test on paired binary outcomes (right / wrong per row). Only the
  discordant pairs carry information: b = rows only arm A gets right, c = rows only arm B
  gets right. With few discordant pairs (b + c < `EXACT_BELOW`) the exact two-sided
  binomial test (b ~ Binomial(b + c, 1/2)) is used, else the chi-square statistic with
  continuity correction, (|b - c| - 1)^2 / (b + c), on one degree of freedom.
- `bootstrap_diff`: a seeded paired bootstrap percentile interval for the difference
  B - A of a ratio statistic (sum of per-row numerators / sum of per-row denominators;
  a plain rate is numerator 0/1, denominator 1). Rows are resampled together, so the
  pairing is kept.
- small helpers: `set_f1`, `mae`, `r2`, `percentile`.

Pure Python plus numpy; no scipy needed at run time (the tests compare against scipy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

EXACT_BELOW = 25  # discordant pairs below this: exact binomial test


@dataclass(frozen=True)
class McNemar:
    a_only: int  # rows arm A gets right and arm B wrong (b)
    b_only: int  # rows arm B gets right and arm A wrong (c)
    both: int
    neither: int
    method: str  # "exact" | "chi2" | "none" (no discordant pairs)
    statistic: float | None  # chi-square value (chi2 method only)
    p_value: float

    @property
    def discordant(self) -> int:
        return self.a_only + self.b_only

    def to_dict(self) -> dict:
        return asdict(self) | {"discordant": self.discordant}


def binom_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n trials with p = 1/2 (symmetric, so the
    two-sided value is twice the smaller tail, capped at 1)."""
    if n == 0:
        return 1.0
    lo = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(lo + 1))
    # Exact integer arithmetic, one division at the end.
    return min(1.0, 2 * tail / 2**n)


def chi2_sf_1df(x: float) -> float:
    """Survival function of the chi-square distribution with one degree of freedom."""
    return math.erfc(math.sqrt(max(x, 0.0) / 2))


def mcnemar(a: Sequence[bool], b: Sequence[bool], exact_below: int = EXACT_BELOW) -> McNemar:
    """McNemar's test for paired outcomes `a[i]`, `b[i]` of two arms on the same rows."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    both = sum(1 for x, y in zip(a, b, strict=True) if x and y)
    neither = len(a) - a_only - b_only - both
    n = a_only + b_only
    if n == 0:
        return McNemar(a_only, b_only, both, neither, "none", None, 1.0)
    if n < exact_below:
        return McNemar(a_only, b_only, both, neither, "exact", None, binom_two_sided_p(a_only, n))
    stat = (abs(a_only - b_only) - 1) ** 2 / n
    return McNemar(a_only, b_only, both, neither, "chi2", stat, chi2_sf_1df(stat))


@dataclass(frozen=True)
class Interval:
    estimate: float | None  # B - A on all rows
    low: float | None
    high: float | None
    level: float
    resamples: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(num: np.ndarray, den: np.ndarray) -> float | None:
    d = float(den.sum())
    return float(num.sum()) / d if d > 0 else None


def bootstrap_diff(num_a: Sequence[float], den_a: Sequence[float], num_b: Sequence[float],
                   den_b: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                   level: float = 0.95) -> Interval:
    """Percentile interval for ratio_B - ratio_A, rows resampled with replacement (paired).

    `num_x[i] / den_x[i]` is row i's contribution to arm x's statistic; a resample where an
    arm's denominator sums to zero is dropped. Deterministic for a given seed.
    """
    arrays = [np.asarray(v, dtype=np.float64) for v in (num_a, den_a, num_b, den_b)]
    n = len(arrays[0])
    if any(len(v) != n for v in arrays):
        raise ValueError("bootstrap_diff: all four sequences need the same length")
    ra, rb = _ratio(arrays[0], arrays[1]), _ratio(arrays[2], arrays[3])
    estimate = None if ra is None or rb is None else rb - ra
    if n == 0 or estimate is None:
        return Interval(estimate, None, None, level, resamples, seed)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    sums = [v[idx].sum(axis=1) for v in arrays]
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = sums[2] / sums[3] - sums[0] / sums[1]
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return Interval(estimate, None, None, level, resamples, seed)
    alpha = (1 - level) / 2
    low, high = np.quantile(diff, [alpha, 1 - alpha])
    return Interval(estimate, float(low), float(high), level, resamples, seed)


def set_f1(predicted: Sequence, reference: Sequence) -> float:
    """F1 of two sets (duplicates ignored); two empty sets agree perfectly."""
    p, r = set(predicted), set(reference)
    if not p and not r:
        return 1.0
    hit = len(p & r)
    if hit == 0:
        return 0.0
    precision, recall = hit / len(p), hit / len(r)
    return 2 * precision * recall / (precision + recall)


def mae(pred: Sequence[float], ref: Sequence[float]) -> float | None:
    if not pred:
        return None
    return sum(abs(p - r) for p, r in zip(pred, ref, strict=True)) / len(pred)


def r2(pred: Sequence[float], ref: Sequence[float]) -> float | None:
    """Coefficient of determination of `pred` against `ref`; None when `ref` is constant
    (or there are fewer than two pairs), where R^2 is undefined."""
    if len(ref) < 2:
        return None
    mean = sum(ref) / len(ref)
    ss_tot = sum((r - mean) ** 2 for r in ref)
    if ss_tot == 0:
        return None
    ss_res = sum((r - p) ** 2 for p, r in zip(pred, ref, strict=True))
    return 1 - ss_res / ss_tot


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation), None for no values."""
    if not len(values):
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
