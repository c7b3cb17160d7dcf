"""Thin wrappers over scipy (and statsmodels where scipy has none): the tests claims use.

Nothing here computes a statistic by hand; each function names the library call it wraps,
so a reader can check our verdicts with the same call on the same counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class TestResult:
    """A test's outcome: its name, statistic, p-value (one- or two-sided as named)."""

    name: str
    statistic: float
    p_value: float


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (`binomtest(...).proportion_ci`)."""
    _check_counts(k, n)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def binomial_test(k: int, n: int, p: float) -> TestResult:
    """Two-sided exact binomial test of k/n against the rate p (`scipy.stats.binomtest`)."""
    _check_counts(k, n)
    result = stats.binomtest(k, n, p=p)
    return TestResult("exact binomial", k / n, float(result.pvalue))


def fisher_increasing(low: tuple[int, int], high: tuple[int, int]) -> TestResult:
    """One-sided Fisher exact test that `high`'s rate exceeds `low`'s (each (k, n)).

    `scipy.stats.fisher_exact` on [[k_high, n_high − k_high], [k_low, n_low − k_low]] with
    ``alternative="greater"``; the statistic is the sample odds ratio.
    """
    for k, n in (low, high):
        _check_counts(k, n)
    table = [[high[0], high[1] - high[0]], [low[0], low[1] - low[0]]]
    result = stats.fisher_exact(table, alternative="greater")
    return TestResult("Fisher exact (one-sided)", float(result.statistic), float(result.pvalue))


def linear_by_linear_increasing(counts: Sequence[tuple[int, int]]) -> TestResult:
    """Ordinal trend test that the rate rises along `counts` ((k, n) per ordered group).

    The linear-by-linear association test (Agresti; for a binary outcome it is the
    Cochran–Armitage trend test) from statsmodels' `Table.test_ordinal_association`, with
    group scores 1..G; the one-sided p-value is the normal tail of its z-score
    (`scipy.stats.norm.sf`). When every group has the same outcome the test has no variance:
    z = 0 and p = 1 (no evidence of a trend).
    """
    from statsmodels.stats.contingency_tables import Table

    for k, n in counts:
        _check_counts(k, n)
    table = np.array([[n - k, k] for k, n in counts], dtype=float)
    if table[:, 0].sum() == 0 or table[:, 1].sum() == 0:
        return TestResult("linear-by-linear (one-sided)", 0.0, 1.0)
    result = Table(table).test_ordinal_association(
        row_scores=np.arange(1, len(counts) + 1, dtype=float), col_scores=np.array([0.0, 1.0]))
    z = float(result.zscore)
    return TestResult("linear-by-linear (one-sided)", z, float(stats.norm.sf(z)))


def welch_from_stats(a: tuple[float, float, int], b: tuple[float, float, int]) -> TestResult:
    """Two-sided Welch t-test from (mean, sd, n) summaries (`ttest_ind_from_stats`)."""
    result = stats.ttest_ind_from_stats(*a, *b, equal_var=False)
    return TestResult("Welch t-test", float(result.statistic), _finite_p(result.pvalue))


def welch_greater(high: Sequence[float], low: Sequence[float]) -> TestResult:
    """One-sided Welch t-test that `high`'s mean exceeds `low`'s (`scipy.stats.ttest_ind`)."""
    result = stats.ttest_ind(high, low, equal_var=False, alternative="greater")
    return TestResult("Welch t-test (one-sided)", float(result.statistic),
                      _finite_p(result.pvalue))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and standard deviation (ddof = 1; 0 for a single value), via numpy."""
    array = np.asarray(values, dtype=float)
    sd = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), sd


def _finite_p(p: float) -> float:
    """scipy returns NaN when both samples have zero variance: no evidence either way."""
    return 1.0 if math.isnan(p) else float(p)


def _check_counts(k: int, n: int) -> None:
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"counts must satisfy 0 <= k <= n, n >= 1; got k={k}, n={n}")
