import math
import statistics

import numpy as np
import pytest
from scipy.stats import binomtest

from tunelab.metrics.stats import (
    bootstrap_interval,
    bootstrap_mean_interval,
    holm,
    mcnemar_exact,
    mean_std,
    paired_bootstrap_pvalue,
    wilson_interval,
)


def _covers(interval, truth):
    lo, hi = interval
    return lo <= truth <= hi


# --- coverage: a 95% interval must contain the truth in about 95% of repeated experiments ---------------------
# 200 seeded draws: the coverage estimate has sd ≈ 1.5 points, so [90%, 99%] is ≈ 3 sd wide on each side, yet an
# interval at the wrong level (a 90% or 99% one) or the wrong width (e.g. using sd instead of sd/√n) fails.


@pytest.mark.parametrize("p", [0.5, 0.8])
def test_mean_bootstrap_and_wilson_coverage(p):
    rng = np.random.default_rng(1234)
    draws = rng.random((200, 400)) < p  # 200 synthetic eval runs of 0/1 correctness on 400 rows
    boot = np.mean([_covers(bootstrap_mean_interval(row, n_boot=1000, seed=i), p) for i, row in enumerate(draws)])
    wil = np.mean([_covers(wilson_interval(int(row.sum()), row.size), p) for row in draws])
    assert 0.90 <= boot <= 0.99, boot
    assert 0.90 <= wil <= 0.99, wil


def test_generic_bootstrap_coverage_for_a_non_mean_statistic():
    # Pearson correlation: a ratio statistic, not a mean of per-row values. y = ρx + √(1-ρ²)ε has correlation ρ.
    rho, n = 0.6, 400
    rng = np.random.default_rng(7)
    hits = []
    for i in range(200):
        x = rng.normal(size=n)
        y = rho * x + math.sqrt(1 - rho**2) * rng.normal(size=n)
        interval = bootstrap_interval(lambda idx, x=x, y=y: np.corrcoef(x[idx], y[idx])[0, 1], n, n_boot=300, seed=i)
        hits.append(_covers(interval, rho))
    assert 0.90 <= np.mean(hits) <= 0.99, np.mean(hits)


def test_vectorised_mean_matches_generic_bootstrap():
    # Same seed → same resampled indices → the same interval; n=5000 makes the fast path draw in several blocks.
    values = (np.random.default_rng(3).random(5000) < 0.7).astype(float)
    fast = bootstrap_mean_interval(values, n_boot=1000, seed=11)
    slow = bootstrap_interval(lambda idx: values[idx].mean(), values.size, n_boot=1000, seed=11)
    assert fast == pytest.approx(slow, abs=1e-12)
    assert fast[0] < values.mean() < fast[1]


def test_bootstrap_drops_nan_resamples():
    n = 400
    # P(row 0 is in a resample of 400) = 1 - (399/400)^400 ≈ 0.63.
    nan_if_row0 = lambda idx: math.nan if (idx == 0).any() else 0.5  # ~37% survive
    nan_unless_row0 = lambda idx: 0.5 if (idx == 0).any() else math.nan  # ~63% survive
    assert all(math.isnan(v) for v in bootstrap_interval(nan_if_row0, n, n_boot=200))
    assert bootstrap_interval(nan_unless_row0, n, n_boot=200) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_mean_interval([0.0, math.nan, 1.0] * 10, n_boot=200))


# --- McNemar --------------------------------------------------------------------------------------------------


def _paired(b, c, both=0, neither=0):
    """Correctness vectors with b rows only A gets right, c rows only B gets right, plus concordant rows."""
    a = [1] * b + [0] * c + [1] * both + [0] * neither
    bb = [0] * b + [1] * c + [1] * both + [0] * neither
    return np.array(a), np.array(bb)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (3, 17), (17, 3), (40, 60), (50, 50), (1000, 1100), (2400, 2600)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    res = mcnemar_exact(*_paired(b, c, both=30, neither=20))
    assert (res["a_only"], res["b_only"]) == (b, c)
    # For p = 1/2 the binomial is symmetric, so scipy's two-sided test (sum of all outcomes no likelier than the
    # observed one) equals min(1, 2·CDF(min(b, c))).
    expected = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
    assert res["p"] == pytest.approx(expected, rel=1e-9, abs=0)


def test_mcnemar_shape_mismatch():
    with pytest.raises(ValueError):
        mcnemar_exact([1, 0], [1, 0, 1])


# --- paired bootstrap -----------------------------------------------------------------------------------------


def _accuracy(correct):
    return lambda idx: float(correct[idx].mean())


def test_paired_bootstrap_identical_systems():
    a = (np.random.default_rng(0).random(400) < 0.7).astype(float)
    assert paired_bootstrap_pvalue(_accuracy(a), _accuracy(a.copy()), 400) == 1.0


def test_paired_bootstrap_large_difference():
    a, b = _paired(70, 10, both=200, neither=120)  # A right on 60 more of 400 rows
    assert paired_bootstrap_pvalue(_accuracy(a), _accuracy(b), a.size) < 0.01


def test_paired_bootstrap_small_difference():
    a, b = _paired(12, 10, both=250, neither=128)  # 2 rows of 400
    assert paired_bootstrap_pvalue(_accuracy(a), _accuracy(b), a.size) > 0.2


def test_paired_bootstrap_agrees_with_mcnemar():
    # For accuracy both test the same H0 on the same discordant rows: exact McNemar gives 0.108 for (b, c) = (25, 14),
    # the bootstrap (a normal-like approximation) about 0.09-0.1. A factor of 2 either way catches a one-sided
    # p, a missing shift (d* compared with 0 gives p ≈ 1) or an unpaired resample, while allowing that gap and
    # the Monte Carlo noise of 2000 resamples.
    a, b = _paired(25, 14, both=230, neither=131)
    exact = mcnemar_exact(a, b)["p"]
    boot = paired_bootstrap_pvalue(_accuracy(a), _accuracy(b), a.size, n_boot=2000, seed=5)
    assert 0.5 < boot / exact < 2.0, (boot, exact)


def test_paired_bootstrap_nan_difference():
    a = np.ones(10)
    assert math.isnan(paired_bootstrap_pvalue(lambda idx: math.nan, _accuracy(a), 10))


# --- Wilson, mean/std, Holm -----------------------------------------------------------------------------------


def test_wilson_hand_computed():
    # p = 69/128 = 0.5390625, z = 1.959964, z² = 3.841459:
    # centre = (p + z²/256) / (1 + z²/128) = 0.5540682 / 1.0300114 = 0.5379244
    # half   = z·sqrt(p(1-p)/128 + z²/65536) / 1.0300114 = 1.959964 · 0.0447193 / 1.0300114 = 0.0850945
    lo, hi = wilson_interval(69, 128)
    assert (lo, hi) == pytest.approx((0.452830, 0.623019), abs=2e-6)
    ci = binomtest(69, 128).proportion_ci(0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-12)
    lo90, hi90 = wilson_interval(69, 128, confidence=0.90)
    assert lo < lo90 < hi90 < hi


@pytest.mark.parametrize("k,n", [(0, 50), (50, 50), (0, 1), (1, 1)])
def test_wilson_edges(k, n):
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo < hi <= 1.0
    assert lo == pytest.approx(0.0, abs=1e-12) if k == 0 else hi == pytest.approx(1.0, abs=1e-12)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=95)


def test_mean_std():
    xs = [0.71, 0.68, 0.74, 0.70]
    assert mean_std(xs) == pytest.approx((statistics.mean(xs), statistics.stdev(xs)), rel=1e-12)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_holm_hand_worked():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → raised to 0.06 by the running max.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # 0.5·2 capped at 1; 0.6 raised to 1 to stay monotone
    assert holm([0.2]) == [0.2]
    assert holm([]) == []
