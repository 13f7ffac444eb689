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
from statistics import NormalDist

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


# --- Unpaired proportions (A/B arms) and the sample-ratio-mismatch check ---

def _z(level: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - level) / 2)


def norm_sf(z: float) -> float:
    """Upper tail of the standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def wilson_interval(x: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion x / n (None for n = 0)."""
    if n == 0:
        return None
    z = _z(level)
    p = x / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At x = 0 (x = n) the bound is 0 (1) exactly; the formula leaves rounding dust.
    return (0.0 if x == 0 else max(0.0, center - half)), (1.0 if x == n else min(1.0, center + half))


@dataclass(frozen=True)
class TwoProportions:
    """B vs A on unpaired rows: diff = p_b - p_a.

    - `ci_newcombe`: Newcombe's hybrid score interval (his method 10: Wilson intervals of
      each rate, combined). The one to read: it keeps near-nominal coverage when rates
      are close to 0 or 1 (as compliance rates are) and never has zero width.
    - `ci_wald`: the unpooled Wald interval diff +- z * sqrt(pa(1-pa)/na + pb(1-pb)/nb),
      for comparison with textbooks; it under-covers near 0/1 and collapses to a point
      when both rates are 0 or 1.
    - `p_value`: two-sided two-proportion z-test with the pooled rate under H0 (equal rates).
    """

    x_a: int
    n_a: int
    x_b: int
    n_b: int
    p_a: float | None
    p_b: float | None
    diff: float | None
    ci_wald: tuple[float, float] | None
    ci_newcombe: tuple[float, float] | None
    z: float | None
    p_value: float | None
    level: float

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("ci_wald", "ci_newcombe"):
            d[key] = list(d[key]) if d[key] is not None else None
        return d


def two_proportion_ztest(x_a: int, n_a: int, x_b: int, n_b: int,
                         level: float = 0.95) -> TwoProportions:
    """Compare rate B (x_b / n_b) with rate A (x_a / n_a); see `TwoProportions`.

    Rates, difference, intervals and p-value are None when either arm has no rows. When
    the pooled rate is 0 or 1 both arms agree exactly: z is None and the p-value 1."""
    for name, x, n in (("a", x_a, n_a), ("b", x_b, n_b)):
        if n < 0 or x < 0 or x > n:
            raise ValueError(f"two_proportion_ztest: need 0 <= x_{name} <= n_{name}, got {x} of {n}")
    if n_a == 0 or n_b == 0:
        return TwoProportions(x_a, n_a, x_b, n_b, x_a / n_a if n_a else None,
                              x_b / n_b if n_b else None, None, None, None, None, None, level)
    pa, pb = x_a / n_a, x_b / n_b
    diff = pb - pa
    zc = _z(level)
    se = math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)
    wald = (diff - zc * se, diff + zc * se)
    la, ua = wilson_interval(x_a, n_a, level)
    lb, ub = wilson_interval(x_b, n_b, level)
    newcombe = (diff - math.sqrt((pb - lb) ** 2 + (ua - pa) ** 2),
                diff + math.sqrt((ub - pb) ** 2 + (pa - la) ** 2))
    pooled = (x_a + x_b) / (n_a + n_b)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se0 == 0:
        z, p = None, 1.0
    else:
        z = diff / se0
        p = min(1.0, 2 * norm_sf(abs(z)))
    return TwoProportions(x_a, n_a, x_b, n_b, pa, pb, diff, wald, newcombe, z, p, level)


def chi2_sf(x: float, df: int) -> float:
    """Survival function of the chi-square distribution with an integer df >= 1 (closed
    forms: a Poisson tail for even df, erfc plus a finite sum for odd df)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"chi2_sf: df must be a positive integer, got {df}")
    if x <= 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    h = x / 2
    if df % 2 == 0:
        terms = (i * math.log(h) - math.lgamma(i + 1) - h for i in range(df // 2))
        return min(1.0, sum(math.exp(t) for t in terms))
    terms = ((i - 0.5) * math.log(h) - math.lgamma(i + 0.5) - h for i in range(1, (df + 1) // 2))
    return min(1.0, math.erfc(math.sqrt(h)) + sum(math.exp(t) for t in terms))


SRM_ALPHA = 0.001  # the usual sample-ratio-mismatch threshold: p below it flags a broken split


@dataclass(frozen=True)
class SRM:
    observed: list[int]
    expected: list[float]
    chi2: float  # inf when a cell with zero expected count was observed
    df: int
    p_value: float
    alpha: float
    srm: bool  # p_value < alpha
    min_expected: float | None  # below ~5 the chi-square approximation is rough

    def to_dict(self) -> dict:
        d = asdict(self)
        if math.isinf(self.chi2):
            d["chi2"] = None  # JSON has no infinity; p_value 0 says it
        return d


def srm_chi2(observed: Sequence[int], weights: Sequence[float], alpha: float = SRM_ALPHA) -> SRM:
    """Sample-ratio-mismatch check: chi-square goodness of fit of the observed counts per
    arm against the shares the weights ask for (df = cells with expected > 0, minus 1).

    An arm with weight 0 that was observed anyway is a mismatch outright (chi2 inf, p 0).
    No observations: p 1, no SRM."""
    if len(observed) != len(weights):
        raise ValueError(f"srm_chi2: {len(observed)} observed counts for {len(weights)} weights")
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError("srm_chi2: weights must be >= 0 and not all 0")
    n = sum(observed)
    total = float(sum(weights))
    expected = [n * w / total for w in weights]
    cells = [(o, e) for o, e in zip(observed, expected, strict=True) if e > 0]
    live = [e for _, e in cells]
    if n == 0 or len(cells) < 1:
        return SRM(list(observed), expected, 0.0, max(len(cells) - 1, 0), 1.0, alpha, False, None)
    if any(o > 0 and e == 0 for o, e in zip(observed, expected, strict=True)):
        return SRM(list(observed), expected, math.inf, max(len(cells) - 1, 1), 0.0, alpha, True,
                   min(live))
    df = len(cells) - 1
    if df == 0:  # one arm with all the weight, and everything in it
        return SRM(list(observed), expected, 0.0, 0, 1.0, alpha, False, min(live))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    p = chi2_sf(stat, df)
    return SRM(list(observed), expected, stat, df, p, alpha, p < alpha, min(live))
