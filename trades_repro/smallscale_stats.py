"""The small-scale study read from its evidence alone: one `RunSummary` per evaluated run
(`load_runs`), then cells, the paper's directions, FOSC's separation and Algorithm 1.

`smallscale.py` runs the sweeps that make the evidence; `smallscale_report.write_report`
prints what this module computes. Nothing here trains or attacks.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from trades_repro import stats, store
from trades_repro.spec import ExperimentSpec
from trades_repro.verdict import DIAGNOSE_RULE, PRIMARY_RULE

FOSC_SKIP_EPOCHS = 1  # epoch 1's FOSC is the untrained model's, in every run: left out
# The second budget: a 1,000-query Square is said to hide most of what 5,000 find.
PROBE_QUERIES = 1000
FOSC_QUANTILE = 0.95  # the threshold: this quantile of the regular runs' per-epoch FOSC


# ----------------------------------------------------------------------------- evidence


def policies_of(spec: ExperimentSpec) -> tuple[str, ...]:
    """The checkpoints evaluated: best PGD-10, and Algorithm 1's own when it heals."""
    return ("best_pgd10", "best_pgd10_fosc_ok") if spec.healing.enabled else ("best_pgd10",)


@dataclass(frozen=True)
class RunSummary:
    """One evaluated run of the study, reduced to the numbers the report uses."""

    digest: str
    dataset: str
    eps: float
    beta: float
    batch: int
    lr: float
    healed: bool
    seed: int
    clean: float
    pgd10: float
    square: float
    autoattack: float | None
    flagged: bool  # rule pgd10_minus_square_v1 (the paper's)
    outcome: str | None  # rule pgd10_minus_square_v2: flagged / clear / inconclusive
    ci: tuple[float, float] | None  # its 95 % interval for the paired margin
    fosc: tuple[float, ...]  # validation FOSC per epoch
    pgd10_curve: tuple[float, ...]  # validation PGD-10 per epoch
    gap: tuple[float, ...]  # train clean − TPGD accuracy per epoch (Fig. 3)
    selected_epoch: int  # the evaluated checkpoint's epoch (1-based)
    policy: str  # its selection policy (a healed run without a FOSC-ok epoch: best_pgd10)
    noised_epochs: tuple[int, ...]  # epochs in which Algorithm 1 added noise
    # provenance.json's wall time (training + validation); a resumed run's is its last part
    train_seconds: float | None = None
    resumed: bool = False
    eval_seconds: float | None = None  # the evaluation record's wall time (every attack)
    square_probe: float | None = None  # Square at PROBE_QUERIES, where probed
    probe_flagged: bool | None = None  # the paper's rule with that Square instead
    fosc_threshold: float | None = None  # Algorithm 1's, where it ran
    # with Algorithm 1: the paper's rule on the best-PGD-10 checkpoint instead of the FOSC-ok
    # one (what the noise did, without lines 17-18's gate); None without Algorithm 1
    flagged_at_best: bool | None = None
    # where it trained (provenance.json: platform, CPU dispatch level and vector units): the
    # same seed on another machine rounds differently and is another run
    # (platform, dispatch level, vector units), None where provenance.json lacks it
    machine: tuple[str | None, str | None, str | None] = (None, None, None)

    @property
    def cell(self) -> tuple:  # cell_of(its spec)
        return (self.dataset, self.eps, self.healed, self.batch, self.beta, self.lr)

    @property
    def margin(self) -> float:
        return self.pgd10 - self.square

    @property
    def peak_fosc(self) -> float:
        """The largest validation FOSC after the first `FOSC_SKIP_EPOCHS` epochs."""
        return max(self.fosc[FOSC_SKIP_EPOCHS:] or self.fosc)

    @property
    def final_fosc(self) -> float:
        return self.fosc[-1]


def load_runs(evidence_dir: Path) -> list[RunSummary]:
    """Every evaluated run under `evidence_dir` with PGD-10, Square and FOSC, as summaries.

    Runs that monitored App. G's step metrics are left out: they are the Figs. 1/4 claims'
    arm (claims/small_scale.yaml), not a cell of the grid, and since monitoring leaves
    training unchanged they would count a grid cell's seeds a second time.
    """
    from trades_repro.spec import parse_spec
    from trades_repro.verify import Evidence

    evidence = Evidence(evidence_dir)
    specs = [parse_spec(store.read_json(folder / store.SPEC_FILE))
             for folder in evidence.index().values()]
    runs = [summarize(evidence, spec) for spec in specs if not spec.monitor.batch_metrics]
    return sorted((r for r in runs if r is not None), key=lambda r: (r.cell, r.seed))


def left_out(evidence_dir: Path, runs: list[RunSummary]) -> list[str]:
    """The evidence folders of grid runs (not App. G's arm) that `load_runs` could not use:
    an export stopped midway (no provenance.json or eval.json yet), a run whose evaluation
    is incomplete or lacks PGD-10 or Square, or one that logged no FOSC."""
    from trades_repro.spec import parse_spec

    used = {r.digest for r in runs}
    missing = []
    for spec_file in sorted(evidence_dir.glob(f"*/{store.SPEC_FILE}")):
        spec = parse_spec(store.read_json(spec_file), source=str(spec_file))
        if not spec.monitor.batch_metrics and spec.digest() not in used:
            missing.append(spec_file.parent.name)
    return missing


def summarize(evidence, spec: ExperimentSpec) -> RunSummary | None:
    """The spec's run in `evidence` (a `verify.Evidence`), read at Algorithm 1's checkpoint
    when it has one; None unless it was evaluated with PGD-10 and Square and logged FOSC."""
    needs = frozenset({"clean", "pgd10", "square"})
    for policy in reversed(policies_of(spec)):
        run = evidence.run(spec, policy)
        if run is not None and run.has(needs) and run.fosc():
            at_best = evidence.run(spec, "best_pgd10") if policy != "best_pgd10" else None
            extra = ({"flagged_at_best": bool(at_best.flagged(PRIMARY_RULE.name))}
                     if at_best is not None and at_best.has(needs) else {})
            return _summary(run, policy, {**_probe(run, policy), **extra})
    return None


def _probe(run, policy: str) -> dict:
    """The run's Square at PROBE_QUERIES (same checkpoint and test images), and the paper's
    rule applied with it; empty where not probed."""
    from trades_repro.verdict import apply_rule
    from trades_repro.verify import policy_record

    probe = run.spec.evaluation.model_copy(update={"square_queries": PROBE_QUERIES})
    record = policy_record(run.folder, policy, probe)
    square = record.attacks.get("square") if record is not None else None
    if square is None:
        return {}
    attacks = {"pgd10": run.evaluation.attacks["pgd10"], "square": square}
    return {"square_probe": square.accuracy,
            "probe_flagged": apply_rule(PRIMARY_RULE, attacks).flagged}


def _summary(run, policy: str, extra: dict | None = None) -> RunSummary:
    spec, records = run.spec, run.records
    v2 = next((v for v in run.evaluation.verdicts if v.rule == DIAGNOSE_RULE.name), None)
    provenance = store.read_json(run.folder / store.PROVENANCE_FILE)
    flag_field = "best_pgd10" if policy == "best_pgd10" else "best_pgd10_fosc_ok"
    selected = max((r.epoch for r in records if getattr(r, flag_field)), default=len(records))
    return RunSummary(
        digest=run.digest, dataset=spec.data.dataset, eps=spec.method.attack.eps,
        beta=spec.method.beta, batch=spec.optim.batch_size, lr=spec.optim.lr,
        healed=spec.healing.enabled, seed=spec.seed, clean=run.metric("clean"),
        pgd10=run.metric("pgd10"), square=run.metric("square"),
        autoattack=run.metric("autoattack"), flagged=bool(run.flagged(PRIMARY_RULE.name)),
        outcome=v2.outcome if v2 else None,
        ci=(v2.ci_low, v2.ci_high) if v2 and v2.ci_low is not None else None,
        fosc=tuple(run.fosc()), pgd10_curve=tuple(r.val_pgd10_acc for r in records),
        gap=tuple(r.train_gap for r in records), selected_epoch=selected, policy=policy,
        noised_epochs=tuple(r.epoch for r in records if r.noised_batches),
        train_seconds=provenance.get("wall_time_s"), resumed=bool(provenance.get("resumed")),
        eval_seconds=run.evaluation.seconds,
        fosc_threshold=spec.healing.fosc_threshold if spec.healing.enabled else None,
        machine=machine_of(provenance), **(extra or {}))


def machine_of(provenance: dict) -> tuple[str | None, str | None, str | None]:
    """What decides a CPU run's rounding, as recorded: the platform (with the kernel build)
    and, since 2026-11-28, torch's CPU dispatch level and the vector units present."""
    flags = provenance.get("cpu_flags")
    return (provenance.get("platform"), provenance.get("cpu_capability"),
            ",".join(flags) if flags is not None else None)


def other_machine(a: tuple, b: tuple) -> bool:
    """Two runs' machines differ in a part both recorded (runs from before a part was
    recorded are not told apart by it)."""
    return any(x is not None and y is not None and x != y for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------- statistics


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
    holm_p: float | None = None  # its p adjusted over the report's family (`family`)


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


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the same order
    (`statsmodels.stats.multitest.multipletests(..., method="holm")`)."""
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(p_values, method="holm")[1]] if p_values else []


Family = tuple[dict[tuple[str, float], list[Direction]], dict[str, Direction]]


def family(runs: list[RunSummary]) -> Family:
    """`directions` and `eps_directions`, the report's one-sided tests of a rise, as one
    family: each Direction carries its Holm-adjusted p over all of them, since a report that
    prints many tests at 0.05 shows some rise by chance alone."""
    found, eps = directions(runs), eps_directions(runs)
    tests = [d for rows in found.values() for d in rows] + list(eps.values())
    adjusted = dict(zip(map(id, tests), holm([d.test.p_value for d in tests]), strict=True))

    def fix(d: Direction) -> Direction:
        return replace(d, holm_p=adjusted[id(d)])

    return ({g: [fix(d) for d in rows] for g, rows in found.items()},
            {data: fix(d) for data, d in eps.items()})


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
    # healed runs (of every seed with a baseline run) trained on another machine than their
    # baseline: where Algorithm 1 never fired these are replicates, not the same run
    other_machine: tuple[int, int] = (0, 0)


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
        paired = [(r, fixed[r.seed]) for r in base.runs if r.seed in fixed]
        moved = sum(other_machine(b.machine, h.machine) for b, h in paired)
        rows.append(HealingRow(base.key, seeds, sum(fixed[s].flagged for s in seeds),
                               sum(bool(fixed[s].flagged_at_best) for s in seeds),
                               sum(bool(fixed[s].noised_epochs) for s in seeds),
                               (cell.k, cell.n), statistics.fmean(healed) if healed else None,
                               statistics.fmean(regular) if regular else None, len(regular),
                               (moved, len(paired))))
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
        sum(r.regular_n for r in rows),
        (sum(r.other_machine[0] for r in rows), sum(r.other_machine[1] for r in rows)))
