"""judges.py's decision rules, every field of each Judgement pinned (issue 21, mutation).

Each test fabricates run folders (claimsutil), judges one claim and compares the whole
`Judgement` with one written here by hand: the verdict at the boundary of its rule (a
tolerance met exactly, an α equal to the p-value, a rate at the interval's edge), and the
numbers from scipy/statsmodels called directly on the same values, never through `stats`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from claimsutil import arm, claim, claims_folder, write_run
from scipy import stats
from statsmodels.stats.contingency_tables import Table

from trades_repro import events
from trades_repro import stats as stats_module
from trades_repro.claims import load_catalogue
from trades_repro.verify import Context, Evidence, judge

V1 = "pgd10_minus_square_v1"
V2 = "pgd10_minus_square_v2"
FLAGGED = {"square": 0.20}  # PGD-10 0.40 − Square 0.20 = 0.20 ≥ 0.08: flagged by v1 and v2
REGULAR = {"square": 0.38}  # margin 0.02: clear by both
INCONCLUSIVE = {"square": 0.32}  # margin 0.08 on 100 examples: v2's interval straddles 0.08
RATE = {"test": {"name": "fisher_exact"}}
FLOATS = ("statistic", "p_value")


def _catalogue(tmp_path: Path, arms: dict, claims: list[dict]):
    return load_catalogue(claims_folder(tmp_path, arms, claims))


def _judge(tmp_path: Path, catalogue, claim_id: str, partial: bool = False) -> dict:
    ctx = Context(catalogue, Evidence(tmp_path / "runs"), "full", partial)
    return judge(catalogue.by_id[claim_id], ctx).model_dump()


def _runs(tmp_path: Path, catalogue, name: str, *per_seed: dict) -> list[Path]:
    """One run per dict, for the arm's seeds in order (fewer dicts: fewer runs)."""
    specs = catalogue.specs(name, "full")
    return [
        write_run(tmp_path / "runs", spec, **kw) for spec, kw in zip(specs, per_seed, strict=False)
    ]


def _label(catalogue, name: str, index: int) -> str:
    spec = catalogue.specs(name, "full")[index]
    return f"seed {spec.seed} ({spec.digest()[:8]})"


def _set_series(run: Path, **series: list) -> None:
    """Overwrite per-epoch fields of a run's metrics.jsonl (e.g. val_pgd10_acc)."""
    path = run / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for key, values in series.items():
        for line, value in zip(lines, values, strict=True):
            line[key] = value
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _expect(claim_id: str, kind: str, status: str, paper: str, **fields) -> dict:
    base = {
        "id": claim_id,
        "artefact": "table_9",
        "kind": kind,
        "tier": "full",
        "status": status,
        "paper": paper,
        "ours": "—",
        "test": "",
        "statistic": None,
        "p_value": None,
        "interval": None,
        "detail": "",
        "n_required": 0,
        "n_found": 0,
        "partial": False,
        "series": {},
        "line": None,
        "sgcs": {},
        "steps": {},
    }
    return {**base, **fields}


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key in FLOATS and value is not None:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        elif key == "interval" and value is not None:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        elif key == "line" and value is not None:
            assert (got[key][0], got[key][1]) == (value[0], pytest.approx(value[1])), key
        else:
            assert got[key] == value, key


# ----------------------------------------------------------------------------- table_cell


def _cell_claim(test, *, expected=None, metric="clean", **extra) -> dict:
    return claim(
        "table_9.cell",
        "table_cell",
        arm="a",
        metric=metric,
        test=test,
        expected=expected or {"mean": 0.5},
        **extra,
    )


def _tolerance(abs_: float) -> dict:
    return {"name": "tolerance", "abs": abs_}


def _cell(tmp_path, values, test, **fields):
    c = _cell_claim(test, **fields)
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=len(values))}, [c])
    _runs(tmp_path, catalogue, "a", *({"clean": v} for v in values))
    return catalogue


@pytest.mark.parametrize(
    ("values", "status", "ours", "diff"),
    [
        ((0.5, 0.75, 1.0), "held", "0.7500 ± 0.2500 (n = 3)", 0.25),  # |diff| = abs: held (≤)
        ((0.25, 0.25, 0.25), "held", "0.2500 ± 0.0000 (n = 3)", -0.25),  # below, at the edge
        ((1.0, 1.0, 1.0), "failed", "1.0000 ± 0.0000 (n = 3)", 0.5),
        ((0.0, 0.0, 0.0), "failed", "0.0000 ± 0.0000 (n = 3)", -0.5),  # far below: |·| matters
    ],
)
def test_tolerance_cell_holds_iff_the_absolute_difference_is_at_most_abs(
    tmp_path, values, status, ours, diff
):
    catalogue = _cell(tmp_path, values, {"name": "tolerance", "abs": 0.25})
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.cell"),
        _expect(
            "table_9.cell",
            "table_cell",
            status,
            "0.5000",
            ours=ours,
            statistic=diff,
            test="|ours − paper| ≤ 0.25",
            detail=f"difference {diff:+.4f}",
            n_required=3,
            n_found=3,
        ),
    )


@pytest.mark.parametrize(
    ("values", "ours"), [((0.75,), "0.7500 (n = 1)"), ((0.5, 1.0), "0.7500 ± 0.3536 (n = 2)")]
)
def test_a_cell_prints_its_spread_from_two_runs_on(tmp_path, values, ours):
    catalogue = _cell(tmp_path, values, {"name": "tolerance", "abs": 0.5})
    got = _judge(tmp_path, catalogue, "table_9.cell")
    assert (got["status"], got["ours"]) == ("held", ours)


def _welch_reference(values):
    ours = np.array(values)
    return stats.ttest_ind_from_stats(
        0.90, 0.01, 5, ours.mean(), ours.std(ddof=1), len(ours), equal_var=False
    )


@pytest.mark.parametrize("at_alpha", [True, False])
def test_welch_cell_holds_unless_p_is_below_alpha(tmp_path, at_alpha):
    values = (0.85, 0.86, 0.87)
    ref = _welch_reference(values)
    assert 0 < ref.pvalue < 0.5 and ref.statistic > 0  # paper first: 0.90 − 0.86 > 0
    alpha = float(ref.pvalue) if at_alpha else float(np.nextafter(ref.pvalue, 1))
    catalogue = _cell(
        tmp_path,
        values,
        {"name": "welch", "alpha": alpha},
        expected={"mean": 0.90, "sd": 0.01, "n": 5},
    )
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.cell"),
        _expect(
            "table_9.cell",
            "table_cell",
            "held" if at_alpha else "failed",
            "0.9000 ± 0.0100 (n = 5)",
            ours="0.8600 ± 0.0100 (n = 3)",
            test=f"Welch t-test, held unless p < {alpha:g}",
            statistic=ref.statistic,
            p_value=ref.pvalue,
            detail="difference -0.0400",
            n_required=3,
            n_found=3,
        ),
    )


def test_welch_cell_needs_two_runs_and_two_are_enough(tmp_path):
    welch = {"name": "welch"}
    paper = {"mean": 0.90, "sd": 0.01, "n": 5}
    catalogue = _cell(tmp_path / "one", (0.85,), welch, expected=paper)
    _assert_same(
        _judge(tmp_path / "one", catalogue, "table_9.cell"),
        _expect(
            "table_9.cell",
            "table_cell",
            "undetermined",
            "0.9000 ± 0.0100 (n = 5)",
            ours="0.8500 (n = 1)",
            test="Welch t-test",
            n_required=1,
            n_found=1,
            detail="a Welch test needs at least 2 of our runs",
        ),
    )
    catalogue = _cell(tmp_path / "two", (0.85, 0.87), welch, expected=paper)
    got = _judge(tmp_path / "two", catalogue, "table_9.cell")
    ref = _welch_reference((0.85, 0.87))
    assert got["status"] == ("held" if ref.pvalue >= 0.05 else "failed")
    assert got["p_value"] == pytest.approx(ref.pvalue)


@pytest.mark.parametrize(("which", "mean"), [("flagged", 0.25), ("regular", 0.75)])
def test_a_subset_cell_averages_only_its_runs(tmp_path, which, mean):
    c = _cell_claim(_tolerance(0.01), expected={"mean": mean}, subset=which, rule=V1)
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=3)}, [c])
    _runs(
        tmp_path,
        catalogue,
        "a",
        {"clean": 0.25, **FLAGGED},
        {"clean": 0.75, **REGULAR},
        {"clean": 0.75, **REGULAR},
    )
    got = _judge(tmp_path, catalogue, "table_9.cell")
    n = 1 if which == "flagged" else 2
    sd = "" if n == 1 else " ± 0.0000"
    assert (got["status"], got["ours"]) == ("held", f"{mean:.4f}{sd} (n = {n})")


def test_an_empty_subset_is_undetermined_with_the_counts(tmp_path):
    c = _cell_claim(_tolerance(0.1), subset="flagged", rule=V1)
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=2)}, [c])
    _runs(tmp_path, catalogue, "a", REGULAR, REGULAR)
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.cell"),
        _expect(
            "table_9.cell",
            "table_cell",
            "undetermined",
            "0.5000",
            n_required=2,
            n_found=2,
            detail="no flagged run with 'clean' among 2",
        ),
    )


def test_a_partial_cell_says_so_with_required_and_found(tmp_path):
    c = _cell_claim(_tolerance(0.5))
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=3)}, [c])
    _runs(tmp_path, catalogue, "a", {"clean": 0.5})
    got = _judge(tmp_path, catalogue, "table_9.cell", partial=True)
    assert (got["status"], got["partial"], got["n_required"], got["n_found"]) == (
        "held",
        True,
        3,
        1,
    )


def test_a_gap_cell_waits_for_autoattack(tmp_path):
    """Table 3's Gap needs PGD-10 and AutoAttack: a run without AutoAttack is no evidence."""
    c = _cell_claim(_tolerance(0.001), expected={"mean": 0.03}, metric="gap")
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=1)}, [c])
    (run,) = _runs(tmp_path, catalogue, "a", {"drop": ("autoattack",)})
    assert _judge(tmp_path, catalogue, "table_9.cell")["status"] == "not run"
    write_run(tmp_path / "runs", catalogue.specs("a", "full")[0])  # AA = 0.37: gap 0.03
    assert _judge(tmp_path, catalogue, "table_9.cell")["ours"] == "0.0300 (n = 1)"


# ----------------------------------------------------------------------- instability_rate


def _rate(tmp_path, paper_k, paper_n, flagged, n, alpha=None, rule=V1):
    test = {"name": "fisher_exact"} | ({"alpha": alpha} if alpha else {})
    c = claim(
        "table_9.rate",
        "instability_rate",
        arm="a",
        rule=rule,
        expected={"k": paper_k, "n": paper_n},
        test=test,
    )
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=n)}, [c])
    _runs(tmp_path, catalogue, "a", *([FLAGGED] * flagged + [REGULAR] * (n - flagged)))
    return _judge(tmp_path, catalogue, "table_9.rate")


def _exact(k, n, confidence=0.95):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return ci.low, ci.high


@pytest.mark.parametrize("at_alpha", [True, False])
def test_a_rate_at_p_equal_to_alpha_holds(tmp_path, at_alpha):
    """Ours 1/6 against the paper's 6/6: two-sided Fisher p = 0.0152; held iff p ≥ α (0/6
    reaches p = 0.0022, so the claim can fail at these α)."""
    p = stats.fisher_exact([[1, 5], [6, 0]], alternative="two-sided").pvalue
    assert 0.01 < p < 0.05
    alpha = float(p) if at_alpha else float(np.nextafter(p, 1))
    got = _rate(tmp_path, 6, 6, 1, 6, alpha)
    ours, paper = _exact(1, 6, 1 - alpha), _exact(6, 6, 1 - alpha)
    _assert_same(
        got,
        _expect(
            "table_9.rate",
            "instability_rate",
            "held" if at_alpha else "failed",
            "6/6",
            ours="1/6",
            test=f"Fisher exact (two-sided) against the paper's count, held unless p < {alpha:g}",
            statistic=1 / 6,
            p_value=p,
            interval=ours,
            n_required=6,
            n_found=6,
            detail=f"exact {1 - alpha:.0%} intervals: ours [{ours[0]:.3f}, {ours[1]:.3f}], "
            f"the paper's 6/6 [{paper[0]:.3f}, {paper[1]:.3f}]",
        ),
    )


@pytest.mark.parametrize(("paper", "ours"), [((1, 10), (0, 10)), ((4, 5), (5, 5)),
                                             ((1, 6), (0, 6))])
def test_a_rate_next_to_the_papers_is_held_where_its_interval_stopped_short(tmp_path, paper,
                                                                         ours):
    """Ours was a fixed point against the paper's exact interval: 0/10 lies outside 1/10's
    [0.0025, 0.445] and failed, though the two samples do not differ (Fisher p = 1)."""
    assert not _exact(*paper)[0] <= ours[0] / ours[1] <= _exact(*paper)[1]
    got = _rate(tmp_path, *paper, *ours)
    assert (got["status"], got["p_value"]) == ("held", 1.0)


@pytest.mark.parametrize("at_floor", [True, False])
def test_a_rate_whose_smallest_attainable_p_is_alpha_is_undetermined(tmp_path, at_floor):
    """Paper 4/5 against 5 runs: 0/5 is as far as a count of ours can differ, p = 0.0476.
    At α equal to it no count could fail (held unless p < α); a bit above it 0/5 fails."""
    floor = min(stats.fisher_exact([[j, 5 - j], [4, 1]]).pvalue for j in range(6))
    p = stats.fisher_exact([[0, 5], [4, 1]]).pvalue
    assert floor == p and 0.04 < p < 0.05
    alpha = float(p) if at_floor else float(np.nextafter(p, 1))
    ours, paper = _exact(0, 5, 1 - alpha), _exact(4, 5, 1 - alpha)
    intervals = (
        f"exact {1 - alpha:.0%} intervals: ours [{ours[0]:.3f}, {ours[1]:.3f}], "
        f"the paper's 4/5 [{paper[0]:.3f}, {paper[1]:.3f}]"
    )
    undecidable = (
        f"no count of 5 runs could differ from 4/5 at {alpha:g} (smallest "
        f"attainable p {p:.3g}): more seeds decide; {intervals}"
    )
    _assert_same(
        _rate(tmp_path, 4, 5, 0, 5, alpha),
        _expect(
            "table_9.rate",
            "instability_rate",
            "undetermined" if at_floor else "failed",
            "4/5",
            ours="0/5",
            test=f"Fisher exact (two-sided) against the paper's count, held unless p < {alpha:g}",
            statistic=0.0,
            p_value=p,
            interval=ours,
            n_required=5,
            n_found=5,
            detail=undecidable if at_floor else intervals,
        ),
    )


def test_a_rate_with_an_undecided_run_is_undetermined(tmp_path):
    c = claim(
        "table_9.rate", "instability_rate", arm="a", rule=V2, expected={"k": 1, "n": 2}, **RATE
    )
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=2)}, [c])
    _runs(tmp_path, catalogue, "a", FLAGGED, INCONCLUSIVE)
    got = _judge(tmp_path, catalogue, "table_9.rate")
    _assert_same(
        got,
        _expect(
            "table_9.rate",
            "instability_rate",
            "undetermined",
            "1/2",
            n_found=2,
            detail=f"rule {V2} needs attacks some runs lack",
        ),
    )


# ----------------------------------------------------------------------------------- trend


def _trend(tmp_path, flagged, *, partial=False, missing=(), **fields):
    names = [f"a{i}" for i in range(len(flagged))]
    arms = {n: arm(seeds=4, **{"method.beta": i + 1}) for i, n in enumerate(names)}
    c = claim("table_9.trend", "trend", arms=names, **fields)
    catalogue = _catalogue(tmp_path, arms, [c])
    for name, k in zip(names, flagged, strict=True):
        if name not in missing:
            _runs(tmp_path, catalogue, name, *([FLAGGED] * k + [REGULAR] * (4 - k)))
    return _judge(tmp_path, catalogue, "table_9.trend", partial)


def _ordinal(counts):
    """One-sided linear-by-linear p for a rise along `counts`, from statsmodels directly."""
    table = np.array([[n - k, k] for k, n in counts], dtype=float)
    z = (
        Table(table, shift_zeros=False)  # its default adds 0.5 to empty cells
        .test_ordinal_association(
            row_scores=np.arange(1.0, len(counts) + 1), col_scores=np.array([0.0, 1])
        )
        .zscore
    )
    return z, stats.norm.sf(z)


PAPER_COUNTS = [{"k": 1, "n": 10}, {"k": 5, "n": 10}, {"k": 9, "n": 10}]


@pytest.mark.parametrize(
    ("flagged", "direction", "status"),
    [
        ([0, 2, 4], "increasing", "held"),
        ([4, 2, 0], "increasing", "failed"),
        ([0, 2, 4], "not_decreasing", "held"),
        ([4, 2, 0], "not_decreasing", "failed"),  # a significant fall
    ],
)
def test_an_ordinal_trend_in_either_direction(tmp_path, flagged, direction, status):
    paper = PAPER_COUNTS if direction == "increasing" else PAPER_COUNTS[::-1]
    got = _trend(
        tmp_path, flagged, direction=direction, expected=paper, test={"name": "linear_by_linear"}
    )
    rising = flagged if direction == "increasing" else flagged[::-1]
    z, p = _ordinal([(k, 4) for k in rising])
    _, paper_p = _ordinal([(1, 10), (5, 10), (9, 10)])  # the paper's, read in its direction
    what = (
        "a rise along the arms"
        if direction == "increasing"
        else "no significant fall along the arms"
    )
    counts = ", ".join(f"{r['k']}/{r['n']}" for r in paper)
    _assert_same(
        got,
        _expect(
            "table_9.trend",
            "trend",
            status,
            f"{counts} ({direction})",
            ours=", ".join(f"{k}/4" for k in flagged),
            statistic=z,
            p_value=p,
            test=f"linear-by-linear (one-sided), α = 0.05: {what}",
            n_required=12,
            n_found=12,
            detail=f"the same test on the paper's counts: p = {paper_p:.3g}",
        ),
    )


@pytest.mark.parametrize("direction", ["increasing", "not_decreasing"])
def test_a_trend_at_p_equal_to_alpha_is_not_significant(tmp_path, direction):
    flagged = [1, 2, 3] if direction == "increasing" else [3, 2, 1]
    _, p = _ordinal([(1, 4), (2, 4), (3, 4)])
    assert 0 < p < 0.5
    got = _trend(
        tmp_path, flagged, direction=direction, test={"name": "linear_by_linear", "alpha": float(p)}
    )
    assert got["status"] == ("failed" if direction == "increasing" else "held")
    assert got["detail"] == ""  # no paper counts given


def test_a_two_arm_trend_is_fisher_on_the_ordered_arms(tmp_path):
    got = _trend(tmp_path, [1, 4], test={"name": "fisher"})
    ref = stats.fisher_exact([[4, 0], [1, 3]], alternative="greater")
    assert (got["status"], got["statistic"], got["p_value"]) == (
        "held" if ref.pvalue < 0.05 else "failed",
        ref.statistic,
        pytest.approx(ref.pvalue),
    )


def test_the_papers_p_uses_the_claims_own_test(tmp_path):
    got = _trend(
        tmp_path, [1, 4], expected=[{"k": 1, "n": 10}, {"k": 9, "n": 10}], test={"name": "fisher"}
    )
    paper = stats.fisher_exact([[9, 1], [1, 9]], alternative="greater")
    assert got["detail"] == f"the same test on the paper's counts: p = {paper.pvalue:.3g}"


def test_a_trend_with_an_empty_arm_is_undetermined(tmp_path):
    got = _trend(
        tmp_path, [0, 2, 4], partial=True, missing=("a1",), test={"name": "linear_by_linear"}
    )
    _assert_same(
        got,
        _expect(
            "table_9.trend",
            "trend",
            "undetermined",
            "increasing",
            detail="an arm has no finished run",
        ),
    )


def test_a_partial_trend_counts_what_it_found(tmp_path):
    names = ["a0", "a1"]
    arms = {n: arm(seeds=4, **{"method.beta": i + 1}) for i, n in enumerate(names)}
    c = claim("table_9.trend", "trend", arms=names, test={"name": "fisher"})
    catalogue = _catalogue(tmp_path, arms, [c])
    _runs(tmp_path, catalogue, "a0", REGULAR, REGULAR)
    _runs(tmp_path, catalogue, "a1", FLAGGED, FLAGGED, FLAGGED)
    got = _judge(tmp_path, catalogue, "table_9.trend", partial=True)
    assert (got["partial"], got["n_found"], got["n_required"], got["ours"]) == (
        True,
        5,
        8,
        "0/2, 3/3",
    )


def _metric_trend(tmp_path, low, high, direction="increasing", drop=()):
    arms = {"lo": arm(seeds=len(low)), "hi": arm(seeds=len(high), **{"method.beta": 2})}
    c = claim(
        "table_9.trend",
        "trend",
        arms=["lo", "hi"],
        measure="square",
        direction=direction,
        test={"name": "welch_one_sided"},
    )
    catalogue = _catalogue(tmp_path, arms, [c])
    _runs(tmp_path, catalogue, "lo", *({"square": v, "pgd10": 0.9} for v in low))
    _runs(tmp_path, catalogue, "hi", *({"square": v, "pgd10": 0.9, "drop": drop} for v in high))
    return _judge(tmp_path, catalogue, "table_9.trend")


def _sd_text(values):
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


@pytest.mark.parametrize(
    ("low", "high", "direction", "status"),
    [
        ((0.5, 0.55, 0.6), (0.7, 0.75, 0.8), "increasing", "held"),
        ((0.7, 0.75, 0.8), (0.5, 0.55, 0.6), "increasing", "failed"),
        ((0.5, 0.55, 0.6), (0.7, 0.75, 0.8), "not_decreasing", "held"),
        ((0.7, 0.75, 0.8), (0.5, 0.55, 0.6), "not_decreasing", "failed"),  # a significant fall
    ],
)
def test_a_metric_trend_is_a_one_sided_welch_test(tmp_path, low, high, direction, status):
    got = _metric_trend(tmp_path, low, high, direction)
    first, second = (high, low) if direction == "increasing" else (low, high)
    ref = stats.ttest_ind(first, second, equal_var=False, alternative="greater")
    what = (
        "a rise along the arms"
        if direction == "increasing"
        else "no significant fall along the arms"
    )
    _assert_same(
        got,
        _expect(
            "table_9.trend",
            "trend",
            status,
            direction,
            ours=f"{_sd_text(low)}, {_sd_text(high)}",
            statistic=ref.statistic,
            p_value=ref.pvalue,
            n_required=6,
            n_found=6,
            test=f"Welch t-test (one-sided), α = 0.05: {what}",
        ),
    )


def test_a_metric_trend_needs_two_runs_per_arm(tmp_path):
    assert _metric_trend(tmp_path / "two", (0.5, 0.52), (0.8, 0.82))["status"] == "held"
    _assert_same(
        _metric_trend(tmp_path / "one", (0.5, 0.6), (0.7,)),
        _expect(
            "table_9.trend",
            "trend",
            "undetermined",
            "increasing",
            detail="each group needs 2 evaluated runs; found 2, 1",
        ),
    )


def test_a_metric_trend_waits_for_the_metrics_attack(tmp_path):
    got = _metric_trend(tmp_path, (0.5, 0.6), (0.7, 0.8), drop=("square",))
    assert (got["status"], got["n_found"], got["n_required"]) == ("incomplete", 2, 4)


# ----------------------------------------------------------------------------------- event


def _event(
    tmp_path,
    event,
    fosc_per_run,
    *,
    min_rate=1.0,
    subset="all",
    arm_set=None,
    extra_arms=None,
    **run_kw,
):
    arms = {"a": arm(seeds=len(fosc_per_run), **(arm_set or {})), **(extra_arms or {})}
    c = claim(
        "table_9.event",
        "event",
        arms=["a"],
        subset=subset,
        event=event,
        # min_runs 1: these tests pin each event's mechanics on one or two runs; the
        # default floor of 3 judged runs has tests of its own
        test={"name": "rate_at_least", "min_rate": min_rate, "min_runs": 1},
    )
    catalogue = _catalogue(tmp_path, arms, [c])
    runs = _runs(tmp_path, catalogue, "a", *({"fosc": f, **run_kw} for f in fosc_per_run))
    return catalogue, runs


HEALS = [0.01, 0.2, 0.01]
HEALS_TEXT = "FOSC above 0.05 at epochs 2–2, back below at 3"
STAYS = [0.01, 0.2, 0.2]


def test_an_event_judgement_lists_runs_series_and_the_threshold_line(tmp_path):
    catalogue, _ = _event(
        tmp_path, {"name": "self_healing", "within": 1}, [HEALS, HEALS], min_rate=0.5
    )
    low, high = _exact(2, 2)
    labels = [_label(catalogue, "a", i) for i in range(2)]
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.event"),
        _expect(
            "table_9.event",
            "event",
            "held",
            "rate ≥ 0.5",
            ours="2/2 runs",
            test="share of runs with the event ≥ 0.5",
            statistic=1.0,
            interval=(low, high),
            n_found=2,
            n_required=2,
            series={lab: HEALS for lab in labels},
            line=("FOSC threshold", 0.05),
            detail="; ".join(f"{lab}: yes ({HEALS_TEXT})" for lab in labels),
        ),
    )


@pytest.mark.parametrize(("min_rate", "status"), [(0.5, "held"), (0.51, "failed")])
def test_an_event_holds_iff_its_share_is_at_least_min_rate(tmp_path, min_rate, status):
    catalogue, _ = _event(
        tmp_path, {"name": "self_healing", "within": 1}, [HEALS, STAYS], min_rate=min_rate
    )
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["ours"], got["statistic"]) == (status, "1/2 runs", 0.5)
    assert got["detail"].endswith("no (1 FOSC spike(s) above 0.05, none healed within 1 epoch(s))")


@pytest.mark.parametrize(("max_rate", "status"), [(0.5, "held"), (0.49, "failed"),
                                                 (0.0, "failed")])
def test_an_event_with_rate_at_most_holds_iff_its_share_is_at_most_max_rate(tmp_path,
                                                                          max_rate, status):
    arms = {"a": arm(seeds=2)}
    c = claim("table_9.event", "event", arms=["a"], event={"name": "self_healing", "within": 1},
              test={"name": "rate_at_most", "max_rate": max_rate, "min_runs": 1})
    catalogue = _catalogue(tmp_path, arms, [c])
    _runs(tmp_path, catalogue, "a", {"fosc": HEALS}, {"fosc": STAYS})
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["ours"], got["test"]) == (
        status, "1/2 runs", f"share of runs with the event ≤ {max_rate:g}")
    assert got["paper"] == f"rate ≤ {max_rate:g}"


def test_an_event_detail_names_at_most_six_runs(tmp_path):
    catalogue, _ = _event(tmp_path, {"name": "self_healing", "within": 1}, [HEALS] * 7)
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert got["ours"] == "7/7 runs" and len(got["series"]) == 7
    assert got["detail"].count(": yes") == 6 and _label(catalogue, "a", 6) not in got["detail"]


def test_a_run_without_fosc_is_left_out_of_an_event(tmp_path):
    catalogue, runs = _event(tmp_path, {"name": "self_healing", "within": 1}, [HEALS, HEALS])
    _set_series(runs[1], val_fosc=[None] * 3)
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["ours"], got["n_found"], list(got["series"])) == (
        "1/1 runs",
        2,  # runs found, as every kind counts them; the share's n is those judged
        [_label(catalogue, "a", 0)],
    )
    _set_series(runs[0], val_fosc=[None] * 3)
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.event"),
        _expect(
            "table_9.event",
            "event",
            "undetermined",
            "rate ≥ 1",
            n_found=2,
            detail="no all run with FOSC",
        ),
    )


@pytest.mark.parametrize(
    ("event", "fosc", "status", "line"),
    [
        # the event's own threshold (0.1) over the spec's (0.05): 0.08 is no spike
        (
            {"name": "self_healing", "within": 1, "fosc_threshold": 0.1},
            [0.01, 0.08, 0.01],
            "failed",
            0.1,
        ),
        ({"name": "self_healing", "within": 1}, [0.01, 0.08, 0.01], "held", 0.05),
        ({"name": "self_healing", "within": 2}, [0.01, 0.2, 0.2, 0.01], "held", 0.05),
        ({"name": "self_healing", "within": 1}, [0.01, 0.2, 0.2, 0.01], "failed", 0.05),
        ({"name": "spike_duration_at_most", "max_epochs": 2}, [0.01, 0.2, 0.2, 0.01], "held", 0.05),
        (
            {"name": "spike_duration_at_most", "max_epochs": 1},
            [0.01, 0.2, 0.2, 0.01],
            "failed",
            0.05,
        ),
        (  # three epochs above 0.05, one above 0.3
            {"name": "spike_duration_at_most", "max_epochs": 1, "fosc_threshold": 0.3},
            [0.01, 0.2, 0.4, 0.2, 0.01],
            "held",
            0.3,
        ),
    ],
)
def test_each_event_uses_its_own_parameters(tmp_path, event, fosc, status, line):
    catalogue, _ = _event(tmp_path, event, [fosc])
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["line"]) == (status, ("FOSC threshold", line))


def test_without_its_own_threshold_an_event_uses_the_runs_algorithm_1_threshold(tmp_path):
    catalogue, _ = _event(
        tmp_path,
        {"name": "self_healing", "within": 1},
        [[0.01, 0.08, 0.01]],
        arm_set={"healing.fosc_threshold": 0.1},
    )
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["line"]) == ("failed", ("FOSC threshold", 0.1))


@pytest.mark.parametrize(("window", "happened"), [(2, True), (5, False)])
def test_a_gap_drop_is_measured_over_its_window(tmp_path, window, happened):
    """Gap 0.1, 0.5, 0.5 then 0.2 at the spike: over 2 epochs it fell 0.3, over all three
    (window 5) from a mean of 0.3667, only 0.1667."""
    catalogue, _ = _event(
        tmp_path,
        {"name": "gap_drop_at_spike", "min_drop": 0.25, "window": window},
        [[0.01, 0.01, 0.01, 0.2]],
        gap=[0.1, 0.5, 0.5, 0.2],
    )
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert got["status"] == ("held" if happened else "failed")
    before = statistics.fmean([0.1, 0.5, 0.5][-window:])
    assert got["detail"].endswith(
        f"(gap 0.2000 at the first spike vs {before:.4f} before (drop {before - 0.2:.4f}))"
    )


SPIKE = {"name": "fosc_spike", "ratio": 3, "pgd10_max_change": 0.02}


def _spike_runs(tmp_path, event, regular_fosc):
    catalogue, runs = _event(
        tmp_path, event, [[0.01, 0.01, 0.1, 0.01]] + regular_fosc, subset="flagged"
    )
    write_run(
        tmp_path / "runs", catalogue.specs("a", "full")[0], square=0.2, fosc=[0.01, 0.01, 0.1, 0.01]
    )
    _set_series(runs[0], val_pgd10_acc=[0.4, 0.4, 0.41, 0.4])
    return catalogue


@pytest.mark.parametrize(("max_change", "happened"), [(0.02, True), (0.005, False)])
def test_a_fosc_spike_is_against_the_median_of_the_regular_runs_fosc(
    tmp_path, max_change, happened
):
    # pooled regular FOSC: four 0.01, then 0.02, 0.02, 0.03, 0.04: median 0.015 (with the
    # flagged run's values 0.01; their mean 0.01875; the median of run medians 0.0175)
    catalogue = _spike_runs(
        tmp_path, {**SPIKE, "pgd10_max_change": max_change}, [[0.01] * 4, [0.02, 0.02, 0.03, 0.04]]
    )
    got = _judge(tmp_path, catalogue, "table_9.event")
    label = _label(catalogue, "a", 0)
    word = "yes" if happened else "no"
    _assert_same(
        got,
        _expect(
            "table_9.event",
            "event",
            "held" if happened else "failed",
            "rate ≥ 1",
            ours=f"{int(happened)}/1 runs",
            test="share of runs with the event ≥ 1",
            statistic=float(happened),
            interval=_exact(int(happened), 1),
            n_found=3,
            n_required=3,
            series={label: [0.01, 0.01, 0.1, 0.01]},
            line=("3x the reference median", 0.045),
            detail=f"{label}: {word} (peak FOSC 0.1 = 6.7x the reference median 0.015; PGD-10 "
            f"moved 0.0100)",
        ),
    )


@pytest.mark.parametrize(
    ("subset", "status", "median"), [("all", "held", 0.03), ("regular", "failed", 0.04)]
)
def test_a_fosc_spike_can_take_another_arm_as_reference(tmp_path, subset, status, median):
    """Reference arm runs at FOSC 0.02 (flagged) and 0.04 (regular); the peak is 0.1."""
    ref_arm = {"ref": arm(seeds=2, **{"method.beta": 2})}
    event = {**SPIKE, "reference_arm": "ref", "reference_subset": subset}
    catalogue, _ = _event(
        tmp_path, event, [[0.01, 0.01, 0.1, 0.01]], extra_arms=ref_arm, square=0.2
    )
    _runs(
        tmp_path, catalogue, "ref", {"fosc": [0.02] * 4, **FLAGGED}, {"fosc": [0.04] * 4, **REGULAR}
    )
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["n_required"], got["line"]) == (
        status,
        1,
        ("3x the reference median", pytest.approx(3 * median)),
    )


def test_a_fosc_spike_without_a_reference_run_is_undetermined(tmp_path):
    catalogue = _spike_runs(tmp_path, SPIKE, [])
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.event"),
        _expect(
            "table_9.event",
            "event",
            "undetermined",
            "rate ≥ 1",
            n_found=1,
            detail="no reference run to compare FOSC with",
        ),
    )


def test_a_flagged_event_waits_for_the_rules_attacks(tmp_path):
    catalogue, _ = _event(
        tmp_path,
        {"name": "self_healing", "within": 1},
        [HEALS],
        subset="flagged",
        square=0.2,
        drop=("square",),
    )
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["detail"]) == (
        "not run", "0 of 1 runs finished with pgd10, square evaluated (1 finished without)")


def test_a_partial_event_says_so(tmp_path):
    c = claim(
        "table_9.event",
        "event",
        arms=["a"],
        event={"name": "self_healing", "within": 1},
        test={"name": "rate_at_least", "min_rate": 1.0, "min_runs": 1},
    )
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=3)}, [c])
    _runs(tmp_path, catalogue, "a", {"fosc": HEALS})
    got = _judge(tmp_path, catalogue, "table_9.event", partial=True)
    assert (got["status"], got["partial"], got["n_found"], got["n_required"]) == (
        "held",
        True,
        1,
        3,
    )


@pytest.mark.parametrize(("healed", "min_runs", "status"), [(3, 3, "held"), (2, 3, "undetermined"),
                                                        (2, 2, "held")])
def test_an_event_is_decided_on_min_runs_judged_runs_and_no_fewer(tmp_path, healed, min_runs,
                                                                   status):
    """Judged among the runs that spiked: two of four spike here when `healed` is 2."""
    c = claim("table_9.event", "event", arms=["a"], event={"name": "spike_duration_at_most",
              "max_epochs": 1}, test={"name": "rate_at_least", "min_rate": 1.0,
                                      "min_runs": min_runs})
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=4)}, [c])
    _runs(tmp_path, catalogue, "a", *([{"fosc": HEALS}] * healed
                                      + [{"fosc": [0.01] * 3}] * (4 - healed)))
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["ours"], got["n_found"], got["n_required"]) == (
        status, f"{healed}/{healed} runs", 4, 4)
    assert got["interval"] == pytest.approx(_exact(healed, healed))
    said = f"judged among {healed} run(s) with FOSC rising above the threshold; a share needs "
    assert got["detail"].startswith(said) == (status == "undetermined")


def test_the_event_floor_is_three_judged_runs_unless_a_claim_says_otherwise(tmp_path):
    c = claim("table_9.event", "event", arms=["a"], event={"name": "self_healing", "within": 1},
              test={"name": "rate_at_least", "min_rate": 1.0})
    catalogue = _catalogue(tmp_path / "default", {"a": arm(seeds=2)}, [c])
    _runs(tmp_path / "default", catalogue, "a", {"fosc": HEALS}, {"fosc": HEALS})
    got = _judge(tmp_path / "default", catalogue, "table_9.event")
    assert got["status"] == "undetermined" and "needs at least 3" in got["detail"]


def _nan_test(name):
    return lambda *args: stats_module.TestResult(name, float("nan"), float("nan"))


def test_a_nan_p_from_a_welch_cell_is_undetermined_not_held(tmp_path, monkeypatch):
    monkeypatch.setattr(stats_module, "welch_from_stats", _nan_test("Welch t-test"))
    catalogue = _cell(tmp_path, (0.85, 0.86), {"name": "welch"},
                      expected={"mean": 0.90, "sd": 0.01, "n": 5})
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.cell"),
        _expect(
            "table_9.cell",
            "table_cell",
            "undetermined",
            "0.9000 ± 0.0100 (n = 5)",
            ours="0.8550 ± 0.0071 (n = 2)",
            test="Welch t-test, held unless p < 0.05",
            n_required=2,
            n_found=2,
            detail="the Welch test is undefined on these summaries (p is NaN)",
        ),
    )


@pytest.mark.parametrize("direction", ["increasing", "not_decreasing"])
def test_a_nan_p_from_a_metric_trend_is_undetermined_not_held(tmp_path, monkeypatch,
                                                              direction):
    monkeypatch.setattr(stats_module, "welch_greater", _nan_test("Welch t-test (one-sided)"))
    _assert_same(
        _metric_trend(tmp_path, (0.5, 0.55), (0.7, 0.75), direction),
        _expect(
            "table_9.trend",
            "trend",
            "undetermined",
            direction,
            ours="0.5250 ± 0.0354, 0.7250 ± 0.0354",
            detail="the Welch test is undefined on these values (p is NaN)",
        ),
    )


def test_a_non_finite_metric_leaves_a_cell_undetermined_with_its_counts(tmp_path):
    c = _cell_claim(_tolerance(0.5), metric="roughness")
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=4)}, [c])
    _runs(tmp_path, catalogue, "a", *({"roughness": v} for v in (0.5, math.inf, math.nan)))
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.cell", partial=True),
        _expect(
            "table_9.cell",
            "table_cell",
            "undetermined",
            "0.5000",
            n_required=4,
            n_found=3,
            partial=True,
            detail="2 of 3 runs' roughness not finite: no test applies",
        ),
    )


def test_a_non_finite_metric_leaves_a_metric_trend_undetermined(tmp_path):
    arms = {"lo": arm(seeds=2), "hi": arm(seeds=2, **{"method.beta": 2})}
    c = claim(
        "table_9.trend",
        "trend",
        arms=["lo", "hi"],
        measure="roughness",
        test={"name": "welch_one_sided"},
    )
    catalogue = _catalogue(tmp_path, arms, [c])
    _runs(tmp_path, catalogue, "lo", {"roughness": 0.5}, {"roughness": math.nan})
    _runs(tmp_path, catalogue, "hi", {"roughness": 0.7}, {"roughness": 0.75})
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.trend"),
        _expect(
            "table_9.trend",
            "trend",
            "undetermined",
            "increasing",
            detail="1 of 4 runs' roughness not finite: no test applies",
        ),
    )


# --------------------------------------------------------------------------------- healing


def _healing_catalogue(tmp_path, seeds, *, rule=V1, **test):
    """A healing claim `table_9.fix` over arms `base` and `fixed` (Algorithm 1) of `seeds`."""
    arms = {
        "base": arm(seeds=seeds),
        "fixed": arm(seeds=seeds, **{"healing.enabled": True}),
    }
    c = claim(
        "table_9.fix",
        "healing",
        arms={"baseline": "base", "fixed": "fixed"},
        rule=rule,
        test={"name": "healing", "clean_tolerance": 0.25, **test},
    )
    return _catalogue(tmp_path, arms, [c])


def _edit_clean(run, edit):
    """Apply `edit` to each checkpoint record's `clean` entry in the run's eval.json."""
    path = run / "eval.json"
    evals = json.loads(path.read_text())
    for record in evals["checkpoints"].values():
        record["clean"] = edit(record["clean"])
    path.write_text(json.dumps(evals))


def _healing(tmp_path, base, fixed, *, rule=V1, partial=False, **test):
    catalogue = _healing_catalogue(tmp_path, len(base), rule=rule, **test)
    _runs(tmp_path, catalogue, "base", *base)
    _runs(tmp_path, catalogue, "fixed", *fixed)
    return _judge(tmp_path, catalogue, "table_9.fix", partial)


BASE = [
    {"clean": 0.9, **FLAGGED},
    {"clean": 0.9, **FLAGGED},
    {"clean": 0.75, **REGULAR},
    {"clean": 0.75, **REGULAR},
]  # seeds 0, 1 flagged without Algorithm 1


def _fixed(clean, still_flagged=0):
    """Seeds 0, 1 at `clean` (the first `still_flagged` of them flagged); 2, 3 at 1.0, which
    must not count: only the seeds flagged without Algorithm 1 are compared."""
    return [{"clean": clean, **(FLAGGED if i < still_flagged else REGULAR)} for i in (0, 1)] + [
        {"clean": 1.0, **REGULAR}
    ] * 2


@pytest.mark.parametrize(
    ("clean", "status"),
    [
        (0.5, "held"),
        (1.0, "held"),  # |±0.25| edge
        (0.25, "failed"),
    ],
)
def test_healing_holds_within_the_clean_tolerance_of_the_regular_runs(tmp_path, clean, status):
    got = _healing(tmp_path, BASE, _fixed(clean))
    diff = clean - 0.75
    _assert_same(
        got,
        _expect(
            "table_9.fix",
            "healing",
            status,
            "fixed not flagged, clean as regular",
            ours=f"0/2 fixed flagged; clean {diff:+.4f} vs regular",
            statistic=diff,
            test="fixed flagged ≤ 0, |clean − regular| ≤ 0.25",
            n_found=8,
            detail=f"seeds flagged without Algorithm 1: [0, 1]; fixed clean {clean:.4f}, "
            f"regular clean 0.7500",
        ),
    )


@pytest.mark.parametrize(("allowed", "status"), [(0, "failed"), (1, "held")])
def test_healing_allows_at_most_max_fixed_flagged(tmp_path, allowed, status):
    got = _healing(tmp_path, BASE, _fixed(0.75, still_flagged=1), max_fixed_flagged=allowed)
    assert (got["status"], got["ours"]) == (status, "1/2 fixed flagged; clean +0.0000 vs regular")


@pytest.mark.parametrize(
    ("base", "detail"),
    [
        ([{"clean": 0.75, **REGULAR}] * 2, "no baseline run was flagged: nothing to heal"),
        (
            [{"clean": 0.75, **FLAGGED}] * 2,
            "no regular baseline run to compare clean accuracy with",
        ),
    ],
)
def test_healing_without_flagged_or_regular_runs_is_undetermined(tmp_path, base, detail):
    _assert_same(
        _healing(tmp_path, base, _fixed(0.75)[:2]),
        _expect(
            "table_9.fix",
            "healing",
            "undetermined",
            "fixed not flagged, clean as regular",
            n_found=4,
            detail=detail,
        ),
    )


def test_healing_compares_only_seeds_present_in_both_arms(tmp_path):
    got = _healing(tmp_path, BASE, [{"clean": 0.5, **REGULAR}], partial=True)
    assert (got["status"], got["partial"], got["n_found"]) == ("held", True, 5)
    assert got["detail"].startswith("seeds flagged without Algorithm 1: [0];")


def test_healing_waits_for_clean_accuracy(tmp_path):
    catalogue = _healing_catalogue(tmp_path, 2)
    _runs(tmp_path, catalogue, "base", {"clean": 0.9, **FLAGGED}, {"clean": 0.75, **REGULAR})
    fixed = _runs(tmp_path, catalogue, "fixed", {"clean": 0.75}, {"clean": 0.75})
    _edit_clean(fixed[0], lambda clean: None)
    got = _judge(tmp_path, catalogue, "table_9.fix")
    assert (got["status"], got["detail"]) == (
        "incomplete", "incomplete (3 of 4 seeds) with clean, pgd10, square evaluated (1 finished "
        "without)")


def test_a_non_finite_clean_accuracy_leaves_healing_undetermined(tmp_path):
    """A fixed run's clean accuracy read as NaN from its eval.json: no difference to judge."""
    catalogue = _healing_catalogue(tmp_path, 3)
    _runs(tmp_path, catalogue, "base", *BASE[1:])  # seed 0 flagged, seeds 1 and 2 regular
    fixed = _runs(tmp_path, catalogue, "fixed", *[{"clean": 0.75, **REGULAR}] * 3)
    _edit_clean(fixed[0], lambda clean: {**clean, "accuracy": math.nan})
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.fix"),
        _expect(
            "table_9.fix",
            "healing",
            "undetermined",
            "fixed not flagged, clean as regular",
            n_found=6,
            detail="1 of 3 runs' clean accuracy not finite: no test applies",
        ),
    )


def test_healing_regular_runs_are_those_the_rule_clears(tmp_path):
    """Rule v2: an inconclusive baseline run is neither healed nor a regular reference."""
    base = [{"clean": 0.9, **FLAGGED}, {"clean": 0.5, **INCONCLUSIVE}, {"clean": 0.75, **REGULAR}]
    got = _healing(tmp_path, base, [{"clean": 0.75, **REGULAR}] * 3, rule=V2)
    assert got["status"] == "held"
    assert got["detail"] == (
        "seeds flagged without Algorithm 1: [0]; fixed clean 0.7500, regular clean 0.7500"
    )


# -------------------------------------------------------------------------------- property


@pytest.mark.parametrize(
    ("record", "status", "ours", "detail"),
    [
        (
            {"outcome": "passed", "finished": "2026-11-27T10:00:00", "git_sha": "0123456789abcdef"},
            "held",
            "passed",
            "ran 2026-11-27T10:00:00 at git 0123456789",
        ),
        ({"outcome": "failed"}, "failed", "failed", "ran ? at git None"),
        # neither passed nor failed: the property is undecided (exit 3), not failed (exit 1)
        ({"outcome": "skipped"}, "undetermined", "skipped", "ran ? at git None"),
        ({"outcome": "error (pytest exit 3)"}, "undetermined", "error (pytest exit 3)",
         "ran ? at git None"),
        ({}, "undetermined", "?", "ran ? at git None"),
    ],
)
def test_a_property_claim_holds_only_when_its_test_passed(tmp_path, record, status, ours, detail):
    node = "tests/test_metrics.py::test_sgcs"
    c = claim("table_9.prop", "property", test={"name": "pytest", "node": node})
    catalogue = _catalogue(tmp_path, {"a": arm()}, [c])
    folder = tmp_path / "runs" / "_properties"
    folder.mkdir(parents=True)
    (folder / "table_9.prop.json").write_text(json.dumps(record))
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.prop"),
        _expect(
            "table_9.prop",
            "property",
            status,
            "holds",
            ours=ours,
            test=f"pytest {node}",
            n_required=1,
            n_found=1,
            detail=detail,
        ),
    )


@pytest.mark.parametrize(
    ("said", "status", "ours"),
    [
        # the pinned counterexample still stands: the statement is false
        ("passed", "failed", "counterexample found"),
        # it no longer stands (the code changed): that proves nothing either way
        ("failed", "undetermined", "counterexample failed"),
        ("skipped", "undetermined", "counterexample skipped"),
    ],
)
def test_a_counterexample_node_that_passes_fails_its_claim(tmp_path, said, status, ours):
    node = "tests/test_metrics.py::test_sgcs"
    c = claim("table_9.prop", "property",
              test={"name": "pytest", "node": node, "shows": "counterexample"})
    catalogue = _catalogue(tmp_path, {"a": arm()}, [c])
    folder = tmp_path / "runs" / "_properties"
    folder.mkdir(parents=True)
    (folder / "table_9.prop.json").write_text(json.dumps(
        {"outcome": said, "finished": "2026-11-28T10:00:00", "git_sha": "0123456789abc"}))
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.prop"),
        _expect("table_9.prop", "property", status, "holds", ours=ours,
                test=f"pytest {node} (a counterexample)", n_required=1, n_found=1,
                detail="ran 2026-11-28T10:00:00 at git 0123456789"),
    )


def test_an_unrecorded_property_claim_is_not_run(tmp_path):
    c = claim(
        "table_9.prop",
        "property",
        test={"name": "pytest", "node": "tests/test_metrics.py::test_sgcs"},
    )
    catalogue = _catalogue(tmp_path, {"a": arm()}, [c])
    _assert_same(
        _judge(tmp_path, catalogue, "table_9.prop"),
        _expect(
            "table_9.prop",
            "property",
            "not run",
            "holds",
            n_required=1,
            detail="property test not run",
        ),
    )


# ----------------------------------------------------------- Fig. 1: one arm, two subsets


def _roughness_trend(tmp_path, regular, flagged, **run_kw):
    arms = {"a": arm(seeds=len(regular) + len(flagged))}
    c = claim("table_9.rough", "trend", arms=["a", "a"], subsets=["regular", "flagged"],
              measure="roughness", test={"name": "welch_one_sided"})
    catalogue = _catalogue(tmp_path, arms, [c])
    runs = _runs(tmp_path, catalogue, "a",
                 *({"roughness": v, **REGULAR, **run_kw} for v in regular),
                 *({"roughness": v, **FLAGGED, **run_kw} for v in flagged))
    return catalogue, runs


@pytest.mark.parametrize(("regular", "flagged", "status"), [
    ((0.5, 0.6, 0.55), (0.9, 1.0, 1.2, 1.1), "held"),
    ((0.9, 1.0, 1.2), (0.5, 0.6, 0.55, 0.52), "failed"),
])
def test_a_subset_trend_compares_one_arms_regular_and_flagged_runs(tmp_path, regular,
                                                                   flagged, status):
    catalogue, _ = _roughness_trend(tmp_path, regular, flagged)
    ref = stats.ttest_ind(flagged, regular, equal_var=False, alternative="greater")
    _assert_same(_judge(tmp_path, catalogue, "table_9.rough"), _expect(
        "table_9.rough", "trend", status, "increasing",
        ours=f"{_sd_text(regular)}, {_sd_text(flagged)}", statistic=ref.statistic,
        p_value=ref.pvalue, n_required=7, n_found=7,  # the arm counts once
        test="Welch t-test (one-sided), α = 0.05: a rise along the arms"))


def test_a_landscape_over_another_radius_is_not_the_arms(tmp_path):
    # evaluated before the radius followed ε: ±8/255 on a run whose ε is digits' 0.1
    catalogue, runs = _roughness_trend(tmp_path, (0.5, 0.6), (0.9, 1.0))
    spec = catalogue.specs("a", "full")[0]
    assert spec.landscape().radius == spec.validation.eps == 0.1
    evals = json.loads((runs[0] / "eval.json").read_text())
    (record,) = evals["checkpoints"].values()
    record["landscape"]["radius"] = 8 / 255
    (runs[0] / "eval.json").write_text(json.dumps(evals))
    got = _judge(tmp_path, catalogue, "table_9.rough")
    assert (got["status"], got["n_found"], got["n_required"]) == ("incomplete", 3, 4)
    got = _judge(tmp_path, catalogue, "table_9.rough", partial=True)
    assert (got["status"], got["detail"]) == ("undetermined",
                                              "each group needs 2 evaluated runs; found 1, 2")


def test_a_run_without_a_landscape_leaves_a_roughness_trend_incomplete(tmp_path):
    catalogue, runs = _roughness_trend(tmp_path, (0.5, 0.6), (0.9, 1.0))
    write_run(tmp_path / "runs", catalogue.specs("a", "full")[3], **FLAGGED)  # no landscape
    got = _judge(tmp_path, catalogue, "table_9.rough")
    assert (got["status"], got["n_found"]) == ("incomplete", 3)


# ------------------------------------------------------ Fig. 4: App. G at FOSC's first rise

W = [1.0, 1.1, 5.0, 1.2, 1.0, 6.0, 1.1, 0.9]  # two spikes (steps 3 and 6)
KL_SPIKES = [0.5, 0.6, 4.0, 0.7, 0.5, 5.0, 0.6, 0.4]  # spikes with W: ρ(W, KL) = 1
CE_STEADY = [0.5, 0.5, 0.6, 0.5, 0.5, 0.6, 0.5, 0.5]  # ties: ranks with W below KL
COS_DROPS = [0.9, 0.9, 0.1, 0.85, 0.9, 0.0, 0.88, 0.92]  # falls where W spikes
OFF_BEAT = [0.6, 0.5, 0.5, 0.6, 0.5, 0.5, 0.5, 0.6]  # high where W is not: ρ(W, ·) < 0
FIRST_RISE = [0.01, 0.02, 0.2, 0.01]  # FOSC passes digits' 0.05 first at epoch 3


def _coupling(tmp_path, relation, batches_per_run, *, min_rho=0.5, monitored=True,
              fosc=FIRST_RISE, **event):
    """An event claim on arm "a", one run per entry of `batches_per_run` (None: no
    batches.jsonl), each with the FOSC series `fosc`."""
    arm_set = {"monitor.batch_metrics": True} if monitored else {}
    catalogue, _ = _event(tmp_path, {"name": "batch_gradient_coupling", "relation": relation,
                                     "min_rho": min_rho, **event},
                          [fosc] * len(batches_per_run), arm_set=arm_set, min_rate=0.5)
    for spec, series in zip(catalogue.specs("a", "full"), batches_per_run, strict=True):
        write_run(tmp_path / "runs", spec, fosc=fosc, batches=series)
    return catalogue


def _series(**kw):
    return {3: {"w_grad_norm": W, "kl_norm": KL_SPIKES, "ce_norm": CE_STEADY,
                "grad_cosine_similarity": COS_DROPS, **kw}}


def _rho(a, b):
    return stats.spearmanr(a, b).statistic


def test_kl_norm_coupling_at_the_first_fosc_rise(tmp_path):
    # run 0: W's spikes are KL's; run 1: CE spikes with W instead (ρ(W, CE) 1 > ρ(W, KL))
    batches = [_series(), _series(ce_norm=KL_SPIKES, kl_norm=CE_STEADY)]
    catalogue = _coupling(tmp_path, "kl_with_w", batches)
    got = _judge(tmp_path, catalogue, "table_9.event")
    first = (f"epoch 3: ρ(W_grad_norm, KL_norm) {_rho(W, KL_SPIKES):+.2f}, ρ(W_grad_norm, "
             f"CE_norm) {_rho(W, CE_STEADY):+.2f} over 8 steps")
    second = (f"epoch 3: ρ(W_grad_norm, KL_norm) {_rho(W, CE_STEADY):+.2f}, ρ(W_grad_norm, "
              f"CE_norm) {_rho(W, KL_SPIKES):+.2f} over 8 steps")
    assert (got["status"], got["ours"]) == ("held", "1/2 runs")
    assert got["detail"] == (f"{_label(catalogue, 'a', 0)}: yes ({first}); "
                             f"{_label(catalogue, 'a', 1)}: no ({second})")


@pytest.mark.parametrize(("kl", "ce", "min_rho", "happened"), [
    (KL_SPIKES, CE_STEADY, 0.5, True),  # ρ(W, KL) 1.00 ≥ 0.5 and above ρ(W, CE) 0.77
    (KL_SPIKES, KL_SPIKES, 0.5, False),  # CE ranks with W as much: not KL's spikes alone
    (CE_STEADY, OFF_BEAT, 0.8, False),  # ρ(W, KL) 0.77 short of 0.8
    (CE_STEADY, OFF_BEAT, 0.7, True),  # and clear of 0.7, with a CE off the spikes
    ([1 - k for k in KL_SPIKES], CE_STEADY, 0.5, False),  # KL falls where W rises
])
def test_kl_coupling_needs_w_to_rank_with_kl_above_min_rho_and_above_ce(kl, ce, min_rho,
                                                                       happened):
    result = events.kl_with_w(W, kl, ce, min_rho=min_rho)
    assert result.happened is happened
    assert result.detail == (f"ρ(W_grad_norm, KL_norm) {_rho(W, kl):+.2f}, ρ(W_grad_norm, "
                             f"CE_norm) {_rho(W, ce):+.2f} over 8 steps")


@pytest.mark.parametrize(("cosine", "min_rho", "happened"), [
    (COS_DROPS, 0.5, True),
    ([1 - c for c in COS_DROPS], 0.5, False),  # rises with W instead
    (COS_DROPS, 0.97, False),  # ρ is −0.963 here: a fall, but short of 0.97
])
def test_cosine_coupling_needs_a_fall_of_at_least_min_rho(tmp_path, cosine, min_rho, happened):
    batches = [_series(grad_cosine_similarity=cosine)]
    catalogue = _coupling(tmp_path, "cosine_against_w", batches, min_rho=min_rho)
    got = _judge(tmp_path, catalogue, "table_9.event")
    rho = _rho(W, cosine)
    assert got["status"] == ("held" if happened else "failed")
    assert got["detail"].endswith(f"(epoch 3: ρ(W_grad_norm, grad_cosine_similarity) "
                                  f"{rho:+.2f} over 8 steps)")


def test_coupling_is_read_at_the_first_rise_only(tmp_path):
    # epoch 4's records would hold; epoch 3 (FOSC's first rise) has none
    batches = [{4: _series()[3]}]
    catalogue = _coupling(tmp_path, "kl_with_w", batches)
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert got["status"] == "failed" and got["detail"].endswith("(no step records for epoch 3)")


def test_coupling_without_a_fosc_rise_did_not_happen(tmp_path):
    batches = [_series()]
    catalogue = _coupling(tmp_path, "kl_with_w", batches, fosc=[0.01] * 4)
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert got["status"] == "failed" and got["detail"].endswith("(FOSC never above 0.05)")


def test_coupling_leaves_out_runs_that_did_not_monitor_app_g(tmp_path):
    catalogue = _coupling(tmp_path, "kl_with_w", [None, None], monitored=False)
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["n_found"], got["detail"]) == (
        "undetermined", 2, "no all run with FOSC and App. G metrics "
        "(monitor.batch_metrics)")


def test_coupling_needs_three_steps_to_rank():
    for check in (lambda n: events.kl_with_w(W[:n], KL_SPIKES[:n], CE_STEADY[:n], min_rho=0.1),
                  lambda n: events.cosine_against_w(W[:n], COS_DROPS[:n], min_rho=0.1)):
        assert check(2) == events.EventResult(False, "2 step(s): too few to rank")
        assert check(3).happened


def test_a_constant_series_ranks_nothing_and_warns_nothing(recwarn):
    flat = [1.0] * 8
    result = events.kl_with_w(W, flat, CE_STEADY, min_rho=0.1)
    assert not result.happened and "KL_norm) +0.00" in result.detail
    result = events.cosine_against_w(flat, COS_DROPS, min_rho=0.1)
    assert not result.happened and "+0.00" in result.detail
    assert not recwarn.list


def test_a_cut_step_record_is_named_with_its_line(tmp_path):
    from trades_repro import store

    catalogue = _coupling(tmp_path, "kl_with_w", [_series()])
    (run,) = (tmp_path / "runs").iterdir()
    path = run / "batches.jsonl"
    assert {e: [r.step for r in rs] for e, rs in store.read_batches(run).items()} == {
        3: list(range(1, 9))}
    assert store.read_batches(run / "elsewhere") == {}
    path.write_text(path.read_text()[:-20])
    with pytest.raises(store.CorruptFile, match=r"batches\.jsonl, line 8: not a step record"):
        _judge(tmp_path, catalogue, "table_9.event")


def test_a_run_evaluated_again_is_read_at_its_new_landscape(tmp_path):
    # the old record (±8/255) first, the new one (±ε) after: same attacks, new landscape wins
    catalogue, runs = _roughness_trend(tmp_path, (0.5, 0.6), (0.9, 1.0))
    evals = json.loads((runs[0] / "eval.json").read_text())
    (new,) = evals["checkpoints"].values()
    old = json.loads(json.dumps(new))
    old["key"], old["landscape"]["radius"], old["landscape"]["roughness"] = "old", 8 / 255, 9.0
    evals["checkpoints"] = {"old": old, new["key"]: new}
    (runs[0] / "eval.json").write_text(json.dumps(evals))
    got = _judge(tmp_path, catalogue, "table_9.rough")
    assert (got["status"], got["ours"].split(", ")[0]) == ("held", _sd_text((0.5, 0.6)))


def test_a_coupling_judgement_carries_each_runs_steps_at_its_first_rise(tmp_path):
    # seed 0 rose at epoch 3 with records; seed 1 never rose; seed 2 rose without records
    catalogue = _coupling(tmp_path, "kl_with_w", [_series(), _series(), {4: _series()[3]}])
    never = catalogue.specs("a", "full")[1]
    write_run(tmp_path / "runs", never, fosc=[0.01] * 4, batches=_series())
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert got["steps"] == {f"{_label(catalogue, 'a', 0)}, epoch 3": {
        "w_grad_norm": W, "kl_norm": KL_SPIKES, "ce_norm": CE_STEADY,
        "grad_cosine_similarity": COS_DROPS}}


def test_the_report_draws_fig_4_for_a_judgement_with_steps(tmp_path):
    from trades_repro.report import write_markdown

    catalogue = _coupling(tmp_path, "kl_with_w", [_series()])
    ctx = Context(catalogue, Evidence(tmp_path / "runs"), "full")
    judgement = judge(catalogue.by_id["table_9.event"], ctx)
    report = tmp_path / "out" / "report.md"
    write_markdown(report, [judgement], catalogue.titles, tier="full", runs_dir=tmp_path)
    png = report.parent / "report_table_9.event_steps.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert (f"![App. G per step at the first FOSC rise, table_9.event]({png.name})"
            in report.read_text())
    plain = judgement.model_copy(update={"steps": {}})
    write_markdown(tmp_path / "plain" / "report.md", [plain], catalogue.titles, tier="full",
                   runs_dir=tmp_path)
    assert not list((tmp_path / "plain").glob("*_steps.png"))


def test_a_coupling_with_its_own_threshold_is_read_and_drawn_at_that_rise(tmp_path):
    # FOSC 0.02 at epoch 2 passes the event's 0.015, not the spec's 0.05
    catalogue = _coupling(tmp_path, "kl_with_w", [{2: _series()[3]}], fosc_threshold=0.015)
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert got["status"] == "held" and "epoch 2: " in got["detail"]
    assert list(got["steps"]) == [f"{_label(catalogue, 'a', 0)}, epoch 2"]



# ------------------------------------------------- §5.3 / Fig. 5: the self-healing signature

HEAL_FOSC = [0.01, 0.2, 0.005, 0.01, 0.01]  # spike at epoch 2, back near zero at 3
HEAL_CLEAN = [0.5, 0.6, 0.55, 0.6, 0.6]  # dips at epoch 3
HEAL_W = [1.0, 1.0, 2.0, 1.5, 1.5]  # lower at epoch 4 than at 3


def _signature(tmp_path, runs, *, near_zero=0.25, monitored=True, **event):
    """A healing_signature claim on arm "a": one run per (fosc, clean, w) triple."""
    arm_set = {"monitor.batch_metrics": True} if monitored else {}
    catalogue, paths = _event(tmp_path, {"name": "healing_signature", "within": 2,
                                         "near_zero": near_zero, **event},
                              [f for f, _, _ in runs], arm_set=arm_set, min_rate=0.5)
    for path, (_, clean, w) in zip(paths, runs, strict=True):
        _set_series(path, train_clean_acc=clean, w_grad_norm=w)
    return catalogue


@pytest.mark.parametrize(("clean", "fosc_at_heal", "w_next", "near_zero", "happened"), [
    (HEAL_CLEAN, 0.005, 1.5, 0.25, True),
    ([0.5, 0.6, 0.6, 0.6, 0.6], 0.005, 1.5, 0.25, False),  # no dip in clean accuracy
    (HEAL_CLEAN, 0.02, 1.5, 0.25, False),  # back below 0.05 but not near zero (≤ 0.0125)
    (HEAL_CLEAN, 0.02, 1.5, 0.5, True),  # near enough at 0.5 × 0.05
    (HEAL_CLEAN, 0.005, 2.0, 0.25, False),  # W_grad_norm not lower the next epoch
])
def test_the_healing_signature_needs_a_dip_a_near_zero_fosc_and_a_lower_norm_next(
        tmp_path, clean, fosc_at_heal, w_next, near_zero, happened):
    fosc = [0.01, 0.2, fosc_at_heal, 0.01, 0.01]
    w = [1.0, 1.0, 2.0, w_next, 1.5]
    catalogue = _signature(tmp_path, [(fosc, clean, w)], near_zero=near_zero)
    got = _judge(tmp_path, catalogue, "table_9.event")
    line = (f"healed at epoch 3: clean {clean[1]:.4f} → {clean[2]:.4f}, FOSC "
            f"{fosc_at_heal:.4g} (near zero: ≤ {near_zero * 0.05:.4g}), W_grad_norm 2 → "
            f"{w_next:.4g}")
    assert (got["status"], got["ours"]) == (("held", "1/1 runs") if happened
                                            else ("failed", "0/1 runs"))
    assert got["detail"] == f"{_label(catalogue, 'a', 0)}: {'yes' if happened else 'no'} ({line})"


def test_the_healing_signature_is_judged_among_the_runs_that_healed(tmp_path):
    stays = [0.01, 0.2, 0.2, 0.2, 0.2]  # never back below: left out, not a "no"
    catalogue = _signature(tmp_path, [(HEAL_FOSC, HEAL_CLEAN, HEAL_W),
                                      (stays, HEAL_CLEAN, HEAL_W)])
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["ours"], got["n_found"]) == ("held", "1/1 runs", 2)
    catalogue = _signature(tmp_path / "none", [(stays, HEAL_CLEAN, HEAL_W)])
    got = _judge(tmp_path / "none", catalogue, "table_9.event")
    assert (got["status"], got["detail"]) == ("undetermined", "no all run with FOSC and App. G "
                                              "metrics (monitor.batch_metrics) that "
                                              "self-healed within 2 epoch(s)")


def test_a_run_healed_at_its_last_epoch_has_no_next_epoch_to_compare(tmp_path):
    from trades_repro import events

    late = [0.01, 0.01, 0.01, 0.2, 0.005]
    result = events.healing_signature(late, HEAL_CLEAN, HEAL_W, 0.05, within=2,
                                      near_zero=0.25)
    assert result == events.EventResult(False, "healed at the last epoch (5): no next "
                                               "epoch to compare")
    assert events.healing_signature([0.2] * 5, HEAL_CLEAN, HEAL_W, 0.05, within=2,
                                    near_zero=0.25).detail == (
        "no FOSC spike above 0.05 healed within 2 epoch(s)")


def test_a_later_healed_spike_can_show_the_signature(tmp_path):
    from trades_repro import events

    fosc = [0.2, 0.04, 0.2, 0.005, 0.01, 0.01]  # first heal not near zero, the second is
    clean = [0.6, 0.5, 0.6, 0.55, 0.6, 0.6]
    w = [1.0, 1.0, 1.0, 2.0, 1.5, 1.5]
    result = events.healing_signature(fosc, clean, w, 0.05, within=2, near_zero=0.25)
    assert result.happened and result.epoch == 4
    assert result.detail.startswith("healed at epoch 4: ")


def test_which_runs_healed_is_read_at_the_events_own_threshold(tmp_path):
    # a peak of 0.08 passes the spec's 0.05 but not the event's 0.1: no run healed
    low_peak = [0.01, 0.08, 0.005, 0.01, 0.01]
    catalogue = _signature(tmp_path, [(low_peak, HEAL_CLEAN, HEAL_W)], fosc_threshold=0.1)
    assert _judge(tmp_path, catalogue, "table_9.event")["status"] == "undetermined"


# ------------------------------------------- a spike is a rise, not the start of training


def test_a_stretch_from_the_first_epoch_is_not_a_spike():
    start_high = [0.2, 0.2, 0.01, 0.3, 0.01]
    assert events.spikes(start_high, 0.05) == [(3, 3)]
    assert events.first_spike_epoch(start_high, 0.05) == 4
    assert events.first_spike_epoch([0.2, 0.1, 0.1], 0.05) is None
    # a decaying start is not Fig. 5's self-healing, nor a long Fig. 6 spike
    assert not events.self_healing([0.2, 0.2, 0.01, 0.01], 0.05, within=3).happened
    assert events.spike_duration_at_most([0.2, 0.2, 0.2, 0.01, 0.3, 0.01], 0.05,
                                         max_epochs=1).happened
    # Fig. 3's onset is the rise at epoch 4, with the three epochs before as its baseline
    gap = [0.5, 0.4, 0.4, 0.1, 0.3]
    result = events.gap_drop_at_spike(start_high, gap, 0.05, min_drop=0.2, window=5)
    assert (result.happened, result.epoch) == (True, 4)


def test_fig_2s_peak_is_taken_from_the_second_epoch_on():
    result = events.fosc_spike([0.5, 0.01, 0.02, 0.01], [0.2, 0.3, 0.3, 0.3], 0.01,
                               ratio=3, pgd10_max_change=0.02)
    assert (result.happened, result.epoch) == (False, 3)  # 2x at epoch 3; epoch 1 ignored
    result = events.fosc_spike([0.5, 0.01, 0.04, 0.01], [0.2, 0.3, 0.3, 0.3], 0.01,
                               ratio=3, pgd10_max_change=0.02)
    assert (result.happened, result.epoch) == (True, 3)
    assert not events.fosc_spike([0.5], [0.2], 0.01, ratio=3, pgd10_max_change=1).happened


def test_fig_6s_duration_counts_only_runs_with_a_spike(tmp_path):
    no_spike, long_spike = [0.01] * 5, [0.01, 0.2, 0.2, 0.2, 0.01]
    catalogue, _ = _event(tmp_path, {"name": "spike_duration_at_most", "max_epochs": 1},
                          [no_spike, long_spike], min_rate=0.5)
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["ours"]) == ("failed", "0/1 runs")  # was 1/2: held


def test_fig_6s_duration_without_any_spike_is_undetermined(tmp_path):
    catalogue, _ = _event(tmp_path, {"name": "spike_duration_at_most", "max_epochs": 1},
                          [[0.01] * 5, [0.2, 0.01, 0.01]])
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["detail"]) == (
        "undetermined", "no all run with FOSC rising above the threshold")


def test_fig_6s_duration_reads_spikes_at_the_events_own_threshold(tmp_path):
    # above the spec's 0.05 for two epochs, never above the event's 0.3: no spike to judge
    catalogue, _ = _event(tmp_path, {"name": "spike_duration_at_most", "max_epochs": 1,
                                     "fosc_threshold": 0.3}, [[0.01, 0.2, 0.2, 0.01]])
    assert _judge(tmp_path, catalogue, "table_9.event")["status"] == "undetermined"


def test_square_lowest_without_flagged_runs_is_undetermined(tmp_path):
    c = claim("table_9.square", "event", arms=["a"], subset="flagged",
              rule="pgd10_minus_square_v1", event={"name": "square_lowest"},
              test={"name": "rate_at_least", "min_rate": 0.5, "min_runs": 1})
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=1)}, [c])
    write_run(tmp_path / "runs", catalogue.specs("a", "full")[0], pgd10=0.3, square=0.29,
              attacks={"apgd-ce": 0.19, "apgd-t": 0.18, "fab-t": 0.2})
    got = _judge(tmp_path, catalogue, "table_9.square")
    assert (got["status"], got["detail"]) == (
        "undetermined", "no flagged run with AutoAttack's breakdown")


# ------------------------------------------------ Table 1: Square is the main contributor


def test_square_lowest_compares_square_with_each_white_box_attack():
    white = {"apgd-ce": 0.19, "apgd-t": 0.18, "fab-t": 0.2}
    result = events.square_lowest(0.12, white, margin=0.05)
    assert result == events.EventResult(True, "Square 0.1200, lowest white-box apgd-t 0.1800 "
                                        "(margin +0.0600)")
    assert not events.square_lowest(0.14, white, margin=0.05).happened  # 0.04 below only
    assert events.square_lowest(0.18, white, margin=0).happened  # a tie is not above
    assert not events.square_lowest(0.181, white, margin=0).happened


def test_square_lowest_judges_flagged_runs_by_their_breakdown(tmp_path):
    c = claim("table_9.square", "event", arms=["a"], subset="flagged",
              rule="pgd10_minus_square_v1", event={"name": "square_lowest", "margin": 0.02},
              test={"name": "rate_at_least", "min_rate": 0.5, "min_runs": 1})
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=3)}, [c])
    masked, white_lower, regular = catalogue.specs("a", "full")
    write_run(tmp_path / "runs", masked, pgd10=0.3, square=0.12,
              attacks={"apgd-ce": 0.19, "apgd-t": 0.18, "fab-t": 0.2})
    write_run(tmp_path / "runs", white_lower, pgd10=0.3, square=0.12,
              attacks={"apgd-ce": 0.19, "apgd-t": 0.13, "fab-t": 0.2})
    write_run(tmp_path / "runs", regular, pgd10=0.3, square=0.29,
              attacks={"apgd-ce": 0.19, "apgd-t": 0.18, "fab-t": 0.2})
    got = _judge(tmp_path, catalogue, "table_9.square")
    assert (got["status"], got["ours"]) == ("held", "1/2 runs")  # the regular run not judged
    assert got["series"] == {} and got["line"] is None  # no FOSC plot for a breakdown


def test_square_lowest_without_the_breakdown_is_not_judged(tmp_path):
    c = claim("table_9.square", "event", arms=["a"], subset="flagged",
              rule="pgd10_minus_square_v1", event={"name": "square_lowest"},
              test={"name": "rate_at_least", "min_rate": 0.5, "min_runs": 1})
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=1)}, [c])
    (spec,) = catalogue.specs("a", "full")
    write_run(tmp_path / "runs", spec, pgd10=0.3, square=0.12)  # PGD-10 and Square only
    got = _judge(tmp_path, catalogue, "table_9.square")
    assert (got["status"], got["detail"]) == (
        "not run", "0 of 1 runs finished with apgd-ce, apgd-t, fab-t, pgd10, square evaluated "
        "(1 finished without)")


# --------------------------------------- Fig. 2: FOSC and SGCS change in the same epoch

FOSC_JUMP = [0.01, 0.012, 0.011, 0.08, 0.07]  # the sharpest rise is epoch 4's
SGCS_SAME = [0.6, 0.61, 0.6, 0.3, 0.35]  # the sharpest fall is epoch 4's too
SGCS_LATE = [0.6, 0.61, 0.6, 0.58, 0.2]  # epoch 5's


def test_sgcs_falls_with_fosc_compares_the_sharpest_changes():
    result = events.sgcs_falls_with_fosc(FOSC_JUMP, SGCS_SAME, within_epochs=0)
    assert result == events.EventResult(
        True, "FOSC's sharpest rise at epoch 4 (0.011 → 0.08), SGCS's sharpest fall at epoch 4 "
        "(0.6 → 0.3)", 4)
    assert not events.sgcs_falls_with_fosc(FOSC_JUMP, SGCS_LATE, within_epochs=0).happened
    assert events.sgcs_falls_with_fosc(FOSC_JUMP, SGCS_LATE, within_epochs=1).happened
    # a rise of SGCS is no fall: its largest "fall" is then the smallest rise
    assert not events.sgcs_falls_with_fosc(FOSC_JUMP, [0.1, 0.2, 0.3, 0.9, 0.9],
                                           within_epochs=0).happened
    assert not events.sgcs_falls_with_fosc([0.1], [0.5], within_epochs=3).happened


def test_fig_2s_sgcs_event_is_judged_per_run_and_drawn_beside_fosc(tmp_path):
    from trades_repro.report import write_markdown

    catalogue, _ = _event(tmp_path, {"name": "sgcs_falls_with_fosc"}, [FOSC_JUMP, FOSC_JUMP],
                          min_rate=0.5)
    same, late = catalogue.specs("a", "full")
    write_run(tmp_path / "runs", same, fosc=FOSC_JUMP, sgcs=SGCS_SAME)
    write_run(tmp_path / "runs", late, fosc=FOSC_JUMP, sgcs=SGCS_LATE)
    ctx = Context(catalogue, Evidence(tmp_path / "runs"), "full")
    judgement = judge(catalogue.by_id["table_9.event"], ctx)
    assert (judgement.status, judgement.ours, judgement.line) == ("held", "1/2 runs", None)
    assert sorted(judgement.sgcs.values()) == sorted([SGCS_SAME, SGCS_LATE])
    report = tmp_path / "out" / "report.md"
    write_markdown(report, [judgement], catalogue.titles, tier="full", runs_dir=tmp_path)
    with_sgcs = (report.parent / "report_table_9.event.png").stat().st_size
    plain = judgement.model_copy(update={"sgcs": {}})
    write_markdown(tmp_path / "plain" / "report.md", [plain], catalogue.titles, tier="full",
                   runs_dir=tmp_path)
    assert with_sgcs > (tmp_path / "plain" / "report_table_9.event.png").stat().st_size


def test_fig_2s_sgcs_event_skips_runs_without_sgcs(tmp_path):
    catalogue, runs = _event(tmp_path, {"name": "sgcs_falls_with_fosc"}, [FOSC_JUMP])
    lines = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    (runs[0] / "metrics.jsonl").write_text("".join(
        json.dumps({**x, "val_sgcs": None}) + "\n" for x in lines))
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["detail"]) == ("undetermined", "no all run with FOSC and SGCS")


# ------------------------------------------ §5.1: the gap at times turns negative


def test_gap_negative_counts_only_epochs_from_the_first_rise_on():
    fosc = [0.01, 0.01, 0.2, 0.1, 0.01]
    assert events.gap_negative_after_spike(fosc, [0.3, 0.2, 0.1, -0.02, 0.1], 0.05) == \
        events.EventResult(True, "lowest gap -0.0200 at epoch 4, from the first spike at 3 on", 4)
    # a negative gap before the rise, or none at all, is no event
    assert not events.gap_negative_after_spike(fosc, [-0.1, 0.2, 0.1, 0.05, 0.1],
                                               0.05).happened
    assert not events.gap_negative_after_spike(fosc, [0.3, 0.2, 0.0, 0.05, 0.1],
                                               0.05).happened  # zero is not below
    assert events.gap_negative_after_spike([0.01] * 5, [-0.1] * 5, 0.05) == \
        events.EventResult(False, "FOSC never rises above 0.05")


def test_gap_negative_is_judged_from_each_runs_gap_series(tmp_path):
    rises = [0.01, 0.01, 0.2, 0.1, 0.01]
    catalogue, _ = _event(tmp_path, {"name": "gap_negative_after_spike"}, [rises, rises],
                          min_rate=0.5)
    negative, positive = catalogue.specs("a", "full")
    write_run(tmp_path / "runs", negative, fosc=rises, gap=[0.3, 0.2, 0.1, -0.02, 0.1])
    write_run(tmp_path / "runs", positive, fosc=rises, gap=[0.3, 0.2, 0.1, 0.02, 0.1])
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["ours"]) == ("held", "1/2 runs")


# ------------------------------------ Fig. 6's baseline: without Algorithm 1 FOSC stays up


def test_spike_duration_at_least_reads_the_longest_rise():
    fosc = [0.01, 0.2, 0.01, 0.2, 0.3, 0.2, 0.01]
    assert events.spike_duration_at_least(fosc, 0.05, min_epochs=3) == events.EventResult(
        True, "2 spike(s) above 0.05, the longest 3 epoch(s)", 4)
    assert not events.spike_duration_at_least(fosc, 0.05, min_epochs=4).happened
    assert events.spike_duration_at_least([0.01, 0.2, 0.2], 0.05, min_epochs=2).happened  # open
    assert not events.spike_duration_at_least([0.3, 0.3, 0.3, 0.01], 0.05,
                                              min_epochs=2).happened  # the start is no spike
    assert events.spike_duration_at_least([0.01] * 4, 0.05, min_epochs=2) == \
        events.EventResult(False, "0 spike(s) above 0.05, the longest 0 epoch(s)", None)


def test_spike_persistence_counts_runs_without_a_spike_as_no(tmp_path):
    catalogue, _ = _event(tmp_path, {"name": "spike_duration_at_least", "min_epochs": 2},
                          [[0.01, 0.2, 0.2, 0.01], [0.01] * 4], min_rate=0.5)
    got = _judge(tmp_path, catalogue, "table_9.event")
    assert (got["status"], got["ours"]) == ("held", "1/2 runs")
