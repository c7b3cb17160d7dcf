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


def fisher_two_sided(ours: tuple[int, int], paper: tuple[int, int]) -> TestResult:
    """Two-sided Fisher exact test that two rates (each (k, n)) differ.

    `scipy.stats.fisher_exact` on [[k_ours, n_ours − k_ours], [k_paper, n_paper − k_paper]];
    both counts are samples, so neither rate is taken as exact. The statistic is the sample
    odds ratio (NaN or inf where a row or column is empty).

    >>> round(fisher_two_sided((0, 10), (1, 10)).p_value, 6)  # paper 1/10, ours 0/10
    1.0
    """
    for k, n in (ours, paper):
        _check_counts(k, n)
    table = [[ours[0], ours[1] - ours[0]], [paper[0], paper[1] - paper[0]]]
    result = stats.fisher_exact(table, alternative="two-sided")
    return TestResult("Fisher exact (two-sided)", float(result.statistic), float(result.pvalue))


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
    (`scipy.stats.norm.sf`). The table is the observed one: `Table`'s default
    ``shift_zeros=True`` would add 0.5 to every empty cell (a 0/n or n/n arm) and test counts
    nobody observed. When every group has the same outcome the test has no variance: z = 0
    and p = 1 (no evidence of a trend).

    >>> round(linear_by_linear_increasing([(0, 10), (3, 10), (3, 10)]).p_value, 4)
    0.0496
    """
    from statsmodels.stats.contingency_tables import Table

    for k, n in counts:
        _check_counts(k, n)
    table = np.array([[n - k, k] for k, n in counts], dtype=float)
    if table[:, 0].sum() == 0 or table[:, 1].sum() == 0:
        return TestResult("linear-by-linear (one-sided)", 0.0, 1.0)
    result = Table(table, shift_zeros=False).test_ordinal_association(
        row_scores=np.arange(1, len(counts) + 1, dtype=float), col_scores=np.array([0.0, 1.0]))
    z = float(result.zscore)
    return TestResult("linear-by-linear (one-sided)", z, float(stats.norm.sf(z)))


def welch_from_stats(a: tuple[float, float, int], b: tuple[float, float, int]) -> TestResult:
    """Two-sided Welch t-test from (mean, sd, n) summaries (`ttest_ind_from_stats`).

    The p-value is NaN where the test is undefined (an n of 1, a NaN input): the judges call
    that undetermined. Both sds 0 with equal means is no difference at all: t = 0, p = 1
    (scipy's 0/0 would be NaN).
    """
    if a[1] == b[1] == 0 and a[0] == b[0]:
        return TestResult("Welch t-test", 0.0, 1.0)
    result = stats.ttest_ind_from_stats(*a, *b, equal_var=False)
    return TestResult("Welch t-test", float(result.statistic), float(result.pvalue))


def welch_greater(high: Sequence[float], low: Sequence[float]) -> TestResult:
    """One-sided Welch t-test that `high`'s mean exceeds `low`'s (`scipy.stats.ttest_ind`).

    NaN p where undefined (a NaN value, a group of one); two groups of one and the same
    finite value are no difference: t = 0, p = 1 (scipy warns and returns NaN).
    """
    values = [*high, *low]
    if all(map(math.isfinite, values)) and len(set(values)) == 1:
        return TestResult("Welch t-test (one-sided)", 0.0, 1.0)
    result = stats.ttest_ind(high, low, equal_var=False, alternative="greater")
    return TestResult("Welch t-test (one-sided)", float(result.statistic),
                      float(result.pvalue))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and standard deviation (ddof = 1; 0 for a single value), via numpy."""
    array = np.asarray(values, dtype=float)
    sd = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), sd


def _check_counts(k: int, n: int) -> None:
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"counts must satisfy 0 <= k <= n, n >= 1; got k={k}, n={n}")
