"""Always-valid inference for the A/B report and the rollout: confidence sequences that stay
valid however often they are looked at (an analyst refreshing the report every hour, or the
service deciding after every request), where a fixed-horizon test's error rate grows with
each look.

Method: the asymptotic confidence sequence (AsympCS) of Waudby-Smith, Arbour, Sinha, Kennedy
and Ramdas, "Time-uniform central limit theory and asymptotic confidence sequences", Annals of
Statistics 52(6), 2024 (arXiv:2103.06476), with Robbins' normal mixture, the method
GrowthBook's sequential testing uses. For an estimate `d` after `n` units with
estimated variance `var` of one unit's contribution (so Var(d) ~ var / n), the two-sided
(1 - alpha) sequence is

    d +- sqrt(var) * sqrt(2 (n rho^2 + 1) / (n^2 rho^2) * log(sqrt(n rho^2 + 1) / alpha))

`rho` sets where the sequence is tightest; `rho_for(n_star, alpha)` picks the rho that
(approximately) minimises the width at `n_star` units:
rho^2 = (-2 log alpha + log(-2 log alpha + 1)) / n_star. The always-valid p-value is the
smallest alpha whose sequence excludes 0:

    p = min(1, sqrt(n rho^2 + 1) * exp(-n^2 rho^2 d^2 / (2 var (n rho^2 + 1))))

For two arms (difference of means b - a), n = n_a + n_b and var = n * (var_a / n_a + var_b / n_b),
as GrowthBook does. Units are requests; the guarantee is asymptotic (it needs a few dozen
units per arm before it means much).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

DEFAULT_N_STAR = 1000  # the sequence is tightest around this many units


def rho_for(n_star: int, alpha: float) -> float:
    """The mixture parameter that makes the sequence tightest at `n_star` units."""
    if n_star < 1:
        raise ValueError(f"n_star must be >= 1, got {n_star}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    a = -2 * math.log(alpha)
    return math.sqrt((a + math.log(a + 1)) / n_star)


def half_width(n: int, var: float, alpha: float, rho: float) -> float:
    """Half the width of the (1 - alpha) sequence after `n` units of per-unit variance `var`."""
    if n < 1:
        return math.inf
    r2 = rho * rho
    return math.sqrt(max(var, 0.0)) * math.sqrt(2 * (n * r2 + 1) / (n * n * r2) * math.log(math.sqrt(n * r2 + 1) / alpha))


def p_value(n: int, estimate: float, var: float, rho: float) -> float:
    """The always-valid p-value of `estimate` against 0 (see the module docstring)."""
    if n < 1:
        return 1.0
    if var <= 0:
        return 1.0 if estimate == 0 else 0.0
    r2 = rho * rho
    log_p = 0.5 * math.log(n * r2 + 1) - n * n * r2 * estimate * estimate / (2 * var * (n * r2 + 1))
    return min(1.0, math.exp(log_p))


@dataclass(frozen=True)
class SequentialResult:
    """An always-valid estimate: the interval holds at every look at once, with probability
    at least 1 - alpha."""

    n: int
    estimate: float | None
    low: float | None
    high: float | None
    p_value: float | None
    alpha: float
    n_star: int
    method: str = "asymptotic confidence sequence, normal mixture (Waudby-Smith et al. 2024)"

    def to_dict(self) -> dict:
        return asdict(self)

    def excludes(self, value: float = 0.0) -> bool:
        return self.low is not None and (self.low > value or self.high < value)


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, sum((v - mean) ** 2 for v in values) / n


def mean_cs(values: Sequence[float], alpha: float = 0.05, n_star: int = DEFAULT_N_STAR) -> SequentialResult:
    """Always-valid interval for one mean (e.g. an arm's error rate from 0/1 values)."""
    n = len(values)
    if n == 0:
        return SequentialResult(0, None, None, None, None, alpha, n_star)
    rho = rho_for(n_star, alpha)
    mean, var = _mean_var(values)
    w = half_width(n, var, alpha, rho)
    return SequentialResult(n, mean, mean - w, mean + w, None, alpha, n_star)


def diff_cs(a: Sequence[float], b: Sequence[float], alpha: float = 0.05,
            n_star: int = DEFAULT_N_STAR) -> SequentialResult:
    """Always-valid interval and p-value for mean(b) - mean(a) (b: the candidate, a: control)."""
    if not a or not b:
        return SequentialResult(len(a) + len(b), None, None, None, None, alpha, n_star)
    rho = rho_for(n_star, alpha)
    (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
    n = len(a) + len(b)
    var = n * (va / len(a) + vb / len(b))
    d = mb - ma
    w = half_width(n, var, alpha, rho)
    return SequentialResult(n, d, d - w, d + w, p_value(n, d, var, rho), alpha, n_star)
