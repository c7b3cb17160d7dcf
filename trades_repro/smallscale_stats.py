"""The small-scale study's statistics: cells, the paper's directions, FOSC's separation
and Algorithm 1, computed from `smallscale.RunSummary` records (the evidence alone).

`smallscale.load_runs` reads the evidence; `smallscale_report.write_report` prints these.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from trades_repro import stats
from trades_repro.smallscale import FOSC_SKIP_EPOCHS, RunSummary

FOSC_QUANTILE = 0.95  # the threshold: this quantile of the regular runs' per-epoch FOSC


@dataclass(frozen=True)
class Cell:
    key: tuple  # RunSummary.cell
    runs: tuple[RunSummary, ...]

    @property
    def k(self) -> int:
        return sum(r.flagged for r in self.runs)

    @property
    def n(self) -> int:
        return len(self.runs)

    def interval(self) -> tuple[float, float]:
        return stats.clopper_pearson(self.k, self.n)

    def mean(self, field: str) -> float | None:
        values = [getattr(r, field) for r in self.runs if getattr(r, field) is not None]
        return statistics.fmean(values) if values else None


def cells(runs: Iterable[RunSummary]) -> list[Cell]:
    groups: dict[tuple, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(run.cell, []).append(run)
    return [Cell(key, tuple(rs)) for key, rs in sorted(groups.items())]


@dataclass(frozen=True)
class Direction:
    """A direction on flagged counts: one of the paper's within one dataset and ε, or the
    issue's ε direction within one dataset."""

    factor: str  # "batch", "beta", "lr" or "eps"
    order: tuple  # the factor's levels in the claimed increasing-risk order
    counts: tuple[tuple[int, int], ...]  # (k, n) per level, pooled over the other factors
    test: stats.TestResult


DIRECTIONS = {  # factor -> levels in the paper's increasing-risk order
    "batch": lambda levels: sorted(levels, reverse=True),  # smaller batch: more flagged
    "beta": lambda levels: sorted(levels, reverse=True),  # smaller β: more flagged
    "lr": sorted,  # larger LR: more flagged
}
PAPER_FACTORS = ("batch", "beta", "lr")
# Not the paper's: the early measurements, overestimation only above the usual ε.
DIRECTIONS["eps"] = sorted  # larger ε: more flagged


def directions(runs: list[RunSummary]) -> dict[tuple[str, float], list[Direction]]:
    """Fisher (two levels) or linear-by-linear (three) tests of the paper's directions per
    (dataset, ε), on TRADES runs without Algorithm 1, pooled over the other two factors."""
    out: dict[tuple[str, float], list[Direction]] = {}
    base = [r for r in runs if not r.healed]
    for group in sorted({(r.dataset, r.eps) for r in base}):
        mine = [r for r in base if (r.dataset, r.eps) == group]
        out[group] = [d for f in PAPER_FACTORS if (d := _direction(mine, f)) is not None]
    return out


def by_eps(runs: Iterable[RunSummary]) -> list[Cell]:
    """TRADES runs without Algorithm 1 per (dataset, ε), pooled over β, batch and LR."""
    groups: dict[tuple, list[RunSummary]] = {}
    for run in runs:
        if not run.healed:
            groups.setdefault((run.dataset, run.eps), []).append(run)
    return [Cell(key, tuple(rs)) for key, rs in sorted(groups.items())]


FLAGGED_CELL_SEEDS = 3  # the issue: at least 3 seeds in every cell with a flagged run


def short_cells(runs: Iterable[RunSummary]) -> list[Cell]:
    """Cells with a flagged run but fewer than `FLAGGED_CELL_SEEDS` runs: the sweep owes
    them seeds before their rates mean much."""
    return [c for c in cells(runs) if c.k and c.n < FLAGGED_CELL_SEEDS]


def eps_directions(runs: list[RunSummary]) -> dict[str, Direction]:
    """Per dataset with two or more ε: is a larger ε flagged more often (pooled over the
    other factors, so only as balanced as the grid's seeds)?"""
    base = [r for r in runs if not r.healed]
    found = {data: _direction([r for r in base if r.dataset == data], "eps")
             for data in sorted({r.dataset for r in base})}
    return {data: d for data, d in found.items() if d is not None}


def _direction(runs: list[RunSummary], factor: str) -> Direction | None:
    levels = DIRECTIONS[factor]({getattr(r, factor) for r in runs})
    if len(levels) < 2:
        return None
    counts = tuple((sum(r.flagged for r in runs if getattr(r, factor) == v),
                    sum(getattr(r, factor) == v for r in runs)) for v in levels)
    test = (stats.fisher_increasing(counts[0], counts[-1]) if len(levels) == 2
            else stats.linear_by_linear_increasing(counts))
    return Direction(factor, tuple(levels), counts, test)


@dataclass(frozen=True)
class Separation:
    """FOSC of flagged vs regular runs (one dataset and ε, without Algorithm 1)."""

    statistic: str  # "peak" (max over epochs) or "selected" (at the evaluated epoch)
    flagged: tuple[float, ...]
    regular: tuple[float, ...]
    u: float
    p_value: float  # one-sided Mann-Whitney: flagged runs' FOSC is larger
    auc: float  # ROC AUC of FOSC as a score for flagged (sklearn)


def separation(runs: list[RunSummary], statistic: str) -> Separation | None:
    from scipy.stats import mannwhitneyu
    from sklearn.metrics import roc_auc_score

    value = {"peak": lambda r: r.peak_fosc,
             "selected": lambda r: r.fosc[r.selected_epoch - 1]}[statistic]
    flagged = tuple(value(r) for r in runs if r.flagged)
    regular = tuple(value(r) for r in runs if not r.flagged)
    if not flagged or not regular:
        return None
    test = mannwhitneyu(flagged, regular, alternative="greater")
    auc = roc_auc_score([1] * len(flagged) + [0] * len(regular), flagged + regular)
    return Separation(statistic, flagged, regular, float(test.statistic), float(test.pvalue),
                      float(auc))


def fosc_threshold(regular: Iterable[RunSummary]) -> float | None:
    """Algorithm 1's threshold from regular runs: the `FOSC_QUANTILE` quantile of their
    per-epoch validation FOSC after the first `FOSC_SKIP_EPOCHS` epochs (numpy, linear)."""
    values = [v for r in regular for v in r.fosc[FOSC_SKIP_EPOCHS:]]
    return float(np.quantile(values, FOSC_QUANTILE)) if values else None


@dataclass(frozen=True)
class HealingRow:
    """Algorithm 1 on one cell: baseline flagged seeds vs the same seeds healed."""

    key: tuple  # the baseline cell's key
    flagged_seeds: tuple[int, ...]
    fixed_flagged: int  # of those seeds, still flagged with Algorithm 1
    fixed_flagged_at_best: int  # ... when read at the best-PGD-10 checkpoint instead
    fired: int  # of those seeds, healed runs in which Algorithm 1 noised any batch
    fixed_total: tuple[int, int]  # (k, n) flagged among every healed seed
    fixed_clean: float | None  # mean clean accuracy of the healed flagged seeds
    regular_clean: float | None  # mean clean accuracy of the baseline's regular runs
    regular_n: int = 0  # how many regular runs that mean is over


def healing_rows(runs: list[RunSummary]) -> list[HealingRow]:
    by_cell = {c.key: c for c in cells(runs)}
    rows = []
    for key, cell in by_cell.items():
        base = by_cell.get((key[0], key[1], False, *key[3:]))
        if not key[2] or base is None:
            continue
        fixed = {r.seed: r for r in cell.runs}
        seeds = tuple(r.seed for r in base.runs if r.flagged and r.seed in fixed)
        healed = [fixed[s].clean for s in seeds]
        regular = [r.clean for r in base.runs if not r.flagged]
        rows.append(HealingRow(base.key, seeds, sum(fixed[s].flagged for s in seeds),
                               sum(bool(fixed[s].flagged_at_best) for s in seeds),
                               sum(bool(fixed[s].noised_epochs) for s in seeds),
                               (cell.k, cell.n), statistics.fmean(healed) if healed else None,
                               statistics.fmean(regular) if regular else None, len(regular)))
    return rows


def pooled_healing(rows: list[HealingRow]) -> HealingRow | None:
    """Every cell's row added up (clean accuracies weighted by their seeds); None for
    fewer than two rows."""
    if len(rows) < 2:
        return None

    def mean(pairs: list[tuple[float | None, int]]) -> float | None:
        kept = [(v, n) for v, n in pairs if v is not None and n]
        return sum(v * n for v, n in kept) / sum(n for _, n in kept) if kept else None

    seeds = tuple(s for r in rows for s in r.flagged_seeds)
    return HealingRow(
        ("all",) * 6, seeds, sum(r.fixed_flagged for r in rows),
        sum(r.fixed_flagged_at_best for r in rows), sum(r.fired for r in rows),
        (sum(r.fixed_total[0] for r in rows), sum(r.fixed_total[1] for r in rows)),
        mean([(r.fixed_clean, len(r.flagged_seeds)) for r in rows]),
        mean([(r.regular_clean, r.regular_n) for r in rows]),
        sum(r.regular_n for r in rows))
