"""Statistics for comparison reports: confidence intervals, paired significance tests, multiple-comparison
correction. Pure numpy + math, so a report can be recomputed anywhere from its per-row results."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np

Statistic = Callable[[np.ndarray], float]


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n: with p = k/n and z the two-sided normal quantile,
    (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n). (nan, nan) when n == 0."""
    z = _z(confidence)
    if n <= 0:
        return (math.nan, math.nan)
    p, z2 = k / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp only float noise: mathematically the interval already lies in [0, 1] (and touches 0 at k=0, 1 at k=n).
    return (max(0.0, center - half), min(1.0, center + half))


def _percentile_interval(stats: np.ndarray, n_boot: int, confidence: float) -> tuple[float, float]:
    _z(confidence)  # validates confidence
    stats = stats[~np.isnan(stats)]
    # Degenerate resamples (constant column for MCC/Pearson) give NaN; too many means no honest interval.
    if stats.size == 0 or stats.size < n_boot / 2:
        return (math.nan, math.nan)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def bootstrap_interval(
    statistic: Statistic, n: int, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Seeded percentile bootstrap over n rows: draw n row indices with replacement n_boot times, call
    statistic(idx) on each, return the (α/2, 1-α/2) quantiles of the non-NaN results (α = 1 - confidence).
    (nan, nan) if fewer than half of the resamples give a number."""
    if n <= 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(n_boot)], dtype=float)
    return _percentile_interval(stats, n_boot, confidence)


def bootstrap_mean_interval(
    values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """bootstrap_interval for the mean of a per-row array (e.g. 0/1 correctness), vectorised: the resamples are
    drawn as an [n_boot, n] index matrix. Same seed, same indices, same result as the generic version."""
    values = np.asarray(values, dtype=float)
    n = values.size
    if n <= 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    # Drawn in row blocks (≈ 4M indices each) so a big eval set does not need n_boot·n int64s at once; the
    # generator yields the same stream whether drawn as one matrix, in blocks, or row by row.
    block = max(1, 4_000_000 // n)
    means = [values[rng.integers(0, n, size=(min(block, n_boot - s), n))].mean(axis=1) for s in range(0, n_boot, block)]
    return _percentile_interval(np.concatenate(means) if means else np.array([]), n_boot, confidence)


def paired_bootstrap_pvalue(stat_a: Statistic, stat_b: Statistic, n: int, n_boot: int = 1000, seed: int = 0) -> float:
    """Two-sided paired bootstrap p-value for H0: metric(A) == metric(B) on the same n rows.

    Shift method (Efron & Tibshirani 1993 §16.4; the test of Berg-Kirkpatrick et al. 2012, whose one-sided rule
    δ(x*) > 2δ(x) is d* - d̂ > d̂): with d̂ = stat_a(all) - stat_b(all) and d* the same difference on each
    resample (both systems scored on the same resampled rows), the centred d* - d̂ approximates the null
    distribution of d, so p = (#{|d* - d̂| >= |d̂|} + 1) / (B + 1) over the B resamples whose d* is not NaN.
    The +1 keeps p > 0 (a finite bootstrap cannot show p = 0). nan if d̂ is NaN or fewer than half survive."""
    if n <= 0:
        return math.nan
    full = np.arange(n)
    d_hat = float(stat_a(full)) - float(stat_b(full))
    if math.isnan(d_hat):
        return math.nan
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, size=n)
        diffs[i] = float(stat_a(idx)) - float(stat_b(idx))
    diffs = diffs[~np.isnan(diffs)]
    if diffs.size == 0 or diffs.size < n_boot / 2:
        return math.nan
    # A tiny tolerance so d̂ = 0 (identical systems) counts every resample despite float rounding in the metric.
    count = int(np.sum(np.abs(diffs - d_hat) >= abs(d_hat) - 1e-12))
    return (count + 1) / (diffs.size + 1)


def _binom_half_cdf(k: int, m: int) -> float:
    """P(X <= k) for X ~ Binomial(m, 1/2), exactly: sum_{i<=k} C(m, i) / 2^m in integers. Python's int / int is
    correctly rounded (underflowing to 0.0 for tails below ~1e-308), so no overflow at any m."""
    term, total = 1, 1  # C(m, 0)
    for i in range(k):
        term = term * (m - i) // (i + 1)  # C(m, i+1), exact
        total += term
    return total / (1 << m)


def mcnemar_exact(a_correct: Sequence[bool] | np.ndarray, b_correct: Sequence[bool] | np.ndarray) -> dict:
    """Exact (binomial) McNemar test on paired 0/1 correctness. Only discordant rows carry information:
    b = #(A right, B wrong), c = #(A wrong, B right); under H0 b ~ Binomial(b + c, 1/2), so the two-sided
    p = min(1, 2 · P(X <= min(b, c))), and p = 1 when b + c = 0. Returns {"p", "a_only": b, "b_only": c}."""
    a, b_ = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"a_correct and b_correct differ in shape: {a.shape} vs {b_.shape}")
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    p = 1.0 if b + c == 0 else min(1.0, 2.0 * _binom_half_cdf(min(b, c), b + c))
    return {"p": p, "a_only": b, "b_only": c}


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation sqrt(Σ(x - x̄)² / (n - 1)) (e.g. over seeds); std is 0.0 for a single
    value and (nan, nan) is returned for none."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    return (float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order: with p_(1) <= ... <= p_(m) sorted,
    adj_(i) = min(1, max_{j<=i} (m - j + 1) · p_(j)). Rejecting adj <= α controls the family-wise error rate
    at α over the m comparisons of a report, under any dependence between them."""
    if any(math.isnan(p) for p in pvalues):
        raise ValueError("holm() needs numeric p-values, got NaN")
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))  # the running max keeps the order monotone
        adjusted[i] = running
    return adjusted
