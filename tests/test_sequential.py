"""The always-valid statistics (mondrian/ab/sequential.py): the p-value and the interval are
one test; under no difference, looking after every batch keeps the false-positive rate at
alpha where the fixed-horizon z-test (scipy) does not; a real difference is found."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mondrian.ab.sequential import diff_cs, half_width, mean_cs, p_value, rho_for


def test_rho_is_tightest_at_n_star():
    rho = rho_for(1000, 0.05)
    widths = {r: half_width(1000, 1.0, 0.05, r) for r in (rho * 0.5, rho * 0.8, rho, rho * 1.25, rho * 2)}
    assert min(widths, key=widths.get) == rho
    # wider than the fixed-horizon interval at every n: the price of looking at will
    for n in (10, 100, 1000, 100_000):
        assert half_width(n, 1.0, 0.05, rho) > stats.norm.ppf(0.975) / math.sqrt(n)
    with pytest.raises(ValueError, match="alpha"):
        rho_for(10, 1.5)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 100_000), d=st.floats(-1, 1), var=st.floats(1e-4, 4), alpha=st.floats(0.001, 0.3))
def test_p_value_and_interval_are_one_test(n, d, var, alpha):
    rho = rho_for(500, alpha)
    w = half_width(n, var, alpha, rho)
    p = p_value(n, d, var, rho)
    if abs(abs(d) - w) > 1e-9 * max(1.0, w):  # away from the boundary, they agree
        assert (p < alpha) == (abs(d) > w)


def test_diff_matches_the_formula_on_known_counts():
    a = [1] * 80 + [0] * 20  # control: 80%
    b = [1] * 90 + [0] * 10  # candidate: 90%
    r = diff_cs(a, b, alpha=0.05, n_star=200)
    n, var = 200, 200 * (0.8 * 0.2 / 100 + 0.9 * 0.1 / 100)
    rho2 = (-2 * math.log(0.05) + math.log(-2 * math.log(0.05) + 1)) / 200
    w = math.sqrt(var) * math.sqrt(2 * (n * rho2 + 1) / (n * n * rho2) * math.log(math.sqrt(n * rho2 + 1) / 0.05))
    assert r.estimate == pytest.approx(0.1) and r.high - r.estimate == pytest.approx(w)
    assert not r.excludes(0) and r.p_value > 0.05  # 10 points on 100 a side is not yet enough
    one = mean_cs([1] * 3 + [0] * 97)
    assert one.estimate == pytest.approx(0.03) and one.low < 0.03 < one.high and one.p_value is None
    assert diff_cs([], b).estimate is None and mean_cs([]).n == 0


def _ever_rejects(rng, p_a: float, p_b: float, sims: int, looks: int, step: int, alpha: float = 0.05):
    """Share of simulated experiments in which each test rejects at some look."""
    rho = rho_for(looks * step * 2, alpha)
    z_crit = stats.norm.ppf(1 - alpha / 2)
    seq = fixed = 0
    for _ in range(sims):
        a = rng.random(looks * step) < p_a
        b = rng.random(looks * step) < p_b
        ca, cb = np.cumsum(a), np.cumsum(b)
        hit_seq = hit_fixed = False
        for k in range(1, looks + 1):
            m = k * step
            pa, pb = ca[m - 1] / m, cb[m - 1] / m
            var_unit = 2 * m * (pa * (1 - pa) / m + pb * (1 - pb) / m)
            hit_seq |= p_value(2 * m, pb - pa, var_unit, rho) < alpha
            pool = (ca[m - 1] + cb[m - 1]) / (2 * m)
            se = math.sqrt(pool * (1 - pool) * 2 / m)
            hit_fixed |= se > 0 and abs(pb - pa) / se > z_crit
        seq += hit_seq
        fixed += hit_fixed
    return seq / sims, fixed / sims


def test_peeking_keeps_the_error_rate_where_a_fixed_test_does_not():
    rng = np.random.default_rng(7)
    seq, fixed = _ever_rejects(rng, 0.8, 0.8, sims=300, looks=50, step=20)
    assert fixed > 0.15  # the z-test looked at 50 times: its 5% is long gone
    assert seq <= 0.08  # 5% plus simulation noise (300 runs: sd 1.3 points)
    power, _ = _ever_rejects(rng, 0.8, 0.9, sims=100, looks=50, step=20)
    assert power >= 0.8  # and a 10-point gain is found within 1000 requests an arm
