"""The statistics audit's defects (2026-11, /tmp/audit_stats/REPORT.md), one test or more
each, every expected value computed here independently of `trades_repro.stats`.

1. the linear-by-linear trend ran on a table with 0.5 added to its empty cells;
2. an instability rate took our count as exact (ours 0/10 against the paper's 1/10 failed);
3. the p shown beside a rate verdict was not the one that decided it;
4. a NaN p-value or metric counted as held;
5. an event's share was decided on one run;
6. `verify` with no claim at the tier exited 0;
7. a tolerance met exactly failed through binary rounding;
8. held + incomplete claims exited 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from claimsutil import arm, claim, claims_folder, own_count, write_run
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from scipy import stats as sps
from typer.testing import CliRunner

from trades_repro import stats
from trades_repro.claimkinds import TableCell
from trades_repro.claims import ClaimsError, load_catalogue
from trades_repro.cli import app
from trades_repro.verify import Context, Evidence, judge

runner = CliRunner()
FLAGGED, REGULAR = {"square": 0.20}, {"square": 0.38}  # PGD-10 0.40: margins 0.20, 0.02


def _catalogue(tmp_path, arms, claims):
    return load_catalogue(claims_folder(tmp_path, arms, claims))


def _judge(tmp_path, catalogue, claim_id, partial=False):
    ctx = Context(catalogue, Evidence(tmp_path / "runs"), "full", partial)
    return judge(catalogue.by_id[claim_id], ctx)


def _runs(tmp_path, catalogue, name, *per_seed):
    for spec, kw in zip(catalogue.specs(name, "full"), per_seed, strict=False):
        write_run(tmp_path / "runs", spec, **kw)


# ------------------------------------------------ 1. linear-by-linear on the observed table


def _mantel(counts):
    """Agresti, Categorical Data Analysis §3.4.6: M = √(N − 1)·r, r the Pearson correlation
    of row score (1..G) and outcome (0/1) over the N units; one-sided p = P(Z ≥ M)."""
    x = np.concatenate([np.full(n, g + 1.0) for g, (_, n) in enumerate(counts)])
    y = np.concatenate([np.r_[np.ones(k), np.zeros(n - k)] for k, n in counts])
    m = math.sqrt(len(x) - 1) * np.corrcoef(x, y)[0, 1]
    return m, sps.norm.sf(m)


@pytest.mark.parametrize(("counts", "p"), [
    ([(0, 10), (3, 10), (3, 10)], 0.0496),  # the audit's flip: 0.0834 on the shifted table
    ([(0, 10), (1, 10), (1, 10)], 0.1891),  # table_2.trend.larger_lr_beta6's counts, rising
    ([(0, 10), (0, 10), (1, 10)], 0.1103),  # table_2.trend.smaller_batch_beta6's
    ([(0, 10), (7, 10), (10, 10)], 4.57e-06),
    ([(0, 3), (0, 3), (3, 3)], 0.00715),  # table_5.trend.smaller_beta's
    ([(0, 6), (7, 10), (3, 3)], 0.00112),  # table_4.trend.more_classes_beta3's
])
def test_the_trend_test_is_mantels_m_on_the_counts_observed(counts, p):
    z, expected = _mantel(counts)
    got = stats.linear_by_linear_increasing(counts)
    assert got.statistic == pytest.approx(z, rel=1e-9)  # two exact formulas: rounding only
    assert got.p_value == pytest.approx(expected, rel=1e-9)
    assert got.p_value == pytest.approx(p, rel=2e-3)  # the value quoted, to its 3-4 digits


@given(st.lists(st.tuples(st.integers(0, 12), st.integers(1, 12)), min_size=2, max_size=4))
def test_the_trend_test_agrees_with_mantels_m_on_any_table(pairs):
    counts = [(min(k, n), n) for k, n in pairs]
    ks = [k for k, _ in counts]
    got = stats.linear_by_linear_increasing(counts)
    if sum(ks) in (0, sum(n for _, n in counts)):  # one outcome only: no variance
        assert (got.statistic, got.p_value) == (0.0, 1.0)
        return
    z, p = _mantel(counts)
    if not math.isfinite(z):  # every unit in one group: r undefined
        return
    assert got.statistic == pytest.approx(z, rel=1e-9, abs=1e-12)
    assert got.p_value == pytest.approx(p, rel=1e-9, abs=1e-15)


def test_a_trend_judged_on_zero_cells_holds_where_the_shifted_table_failed(tmp_path):
    names = ["a0", "a1", "a2"]
    arms = {n: arm(seeds=10, **{"method.beta": i + 1}) for i, n in enumerate(names)}
    catalogue = _catalogue(tmp_path, arms, [claim("table_9.trend", "trend", arms=names,
                                                  test={"name": "linear_by_linear"})])
    for name, k in zip(names, (0, 3, 3), strict=True):
        _runs(tmp_path, catalogue, name, *([FLAGGED] * k + [REGULAR] * (10 - k)))
    got = _judge(tmp_path, catalogue, "table_9.trend")
    z, p = _mantel([(0, 10), (3, 10), (3, 10)])
    assert (got.status, got.statistic, got.p_value) == (
        "held", pytest.approx(z, rel=1e-9), pytest.approx(p, rel=1e-9))


# --------------------------------------------- 2, 3. an instability rate: two samples, one p


def _fisher_two_sided(a, b):
    """The two-sided Fisher p from the hypergeometric law itself: the probability of every
    table with the observed margins no more likely than the observed one."""
    (k, n), (kk, nn) = a, b
    law = sps.hypergeom(n + nn, k + kk, n)
    support = range(max(0, k + kk - nn), min(n, k + kk) + 1)
    observed = law.pmf(k)
    return sum(law.pmf(x) for x in support if law.pmf(x) <= observed * (1 + 1e-7))


def _rate(tmp_path, paper, ours):
    (pk, pn), (k, n) = paper, ours
    c = claim("table_9.rate", "instability_rate", arm="a", expected={"k": pk, "n": pn},
              test={"name": "fisher_exact", "alpha": 0.05})
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=n)}, [c])
    _runs(tmp_path, catalogue, "a", *([FLAGGED] * k + [REGULAR] * (n - k)))
    return _judge(tmp_path, catalogue, "table_9.rate")


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_a_rate_no_count_could_fail_is_undetermined(tmp_path, k):
    """3 runs against the paper's 3: every count of ours has p ≥ 0.1 against 2/3, so a held
    would be a claim that cannot fail; the smallest attainable p is named instead."""
    got = _rate(tmp_path, (2, 3), (k, 3))
    floor = min(_fisher_two_sided((j, 3), (2, 3)) for j in range(4))
    assert floor >= 0.05
    assert got.status == "undetermined"
    assert got.p_value == pytest.approx(_fisher_two_sided((k, 3), (2, 3)), rel=1e-9)
    assert f"smallest attainable p {floor:.3g}" in got.detail
    assert got.detail.startswith("no count of 3 runs could differ from 2/3 at 0.05")


def test_our_own_count_is_bounded_exactly(tmp_path):
    c = claim("table_9.count", "instability_rate", arm="a", expected={"k": 0, "n": 2},
              values_from="ours", test={"name": "count_at_most", "k": 0})
    c.pop("verbatim")
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=2)}, [c])
    _runs(tmp_path, catalogue, "a", REGULAR, REGULAR)
    held = _judge(tmp_path, catalogue, "table_9.count")
    assert (held.status, held.ours, held.detail) == ("held", "0/2", "0 of 2 flagged")
    _runs(tmp_path, catalogue, "a", REGULAR, FLAGGED)
    failed = _judge(tmp_path, catalogue, "table_9.count")
    assert (failed.status, failed.ours) == ("failed", "1/2")
    assert failed.test == "at most 0 of our runs flagged (our own count)"


def test_an_exact_count_bound_against_a_papers_count_is_refused(tmp_path):
    c = claim("table_9.count", "instability_rate", arm="a", expected={"k": 0, "n": 2},
              test={"name": "count_at_most", "k": 0})
    with pytest.raises(ClaimsError, match="count_at_most bounds our own count"):
        _catalogue(tmp_path, {"a": arm(seeds=2)}, [c])


@pytest.mark.parametrize(("paper", "ours", "status"), [
    ((1, 10), (0, 10), "held"),  # the audit's boundary cases: each failed before
    ((9, 10), (10, 10), "held"),
    ((4, 5), (5, 5), "held"),
    ((1, 6), (0, 6), "held"),
    ((10, 10), (6, 10), "held"),  # p = 0.087
    ((10, 10), (5, 10), "failed"),  # p = 0.033
    ((0, 10), (5, 10), "failed"),
    ((4, 5), (0, 5), "failed"),  # p = 0.048: small_scale.fashion.risky_cell_flagged's edge
])
def test_a_rate_is_held_unless_fisher_tells_the_two_counts_apart(tmp_path, paper, ours,
                                                                status):
    got = _rate(tmp_path, paper, ours)
    p = _fisher_two_sided(ours, paper)
    assert (got.status, got.p_value) == (status, pytest.approx(p, rel=1e-9))
    assert (p >= 0.05) == (status == "held")
    ci = sps.binomtest(*ours).proportion_ci(0.95, method="exact")
    paper_ci = sps.binomtest(*paper).proportion_ci(0.95, method="exact")
    assert got.interval == pytest.approx((ci.low, ci.high), rel=1e-12, abs=1e-15)
    assert got.test == "Fisher exact (two-sided) against the paper's count, held unless p < 0.05"
    assert got.detail == (f"exact 95% intervals: ours [{ci.low:.3f}, {ci.high:.3f}], the "
                          f"paper's {paper[0]}/{paper[1]} [{paper_ci.low:.3f}, "
                          f"{paper_ci.high:.3f}]")


def test_the_report_shows_the_p_that_decided_a_rate(tmp_path):
    """It showed the exact binomial test's p = 0 beside 'held' (paper 10/10, ours 7/10)."""
    from trades_repro.report import write_markdown

    got = _rate(tmp_path, (10, 10), (7, 10))
    p = _fisher_two_sided((7, 10), (10, 10))
    assert got.status == "held" and got.p_value == pytest.approx(p) and p > 0.2
    report = tmp_path / "report.md"
    write_markdown(report, [got], {}, tier="full", runs_dir=tmp_path / "runs")
    row = next(line for line in report.read_text().splitlines() if "`table_9.rate`" in line)
    assert row == (f"| `table_9.rate` | 10/10 | 7/10 | Fisher exact (two-sided) against the "
                   f"paper's count, held unless p < 0.05 | p = {p:.3g} | **held** |")
    assert f"p = {p:.3g}" in got.message()


# ----------------------------------------------------- 4. NaN is never held


def test_the_welch_test_is_undefined_without_spread_and_only_equal_constants_have_p_1():
    assert math.isnan(stats.welch_from_stats((0.6, 0.01, 1), (0.3, 0.01, 3)).p_value)
    assert stats.welch_from_stats((0.5, 0.0, 3), (0.5, 0.0, 3)).p_value == 1.0
    assert stats.welch_from_stats((0.5, 0.0, 3), (0.6, 0.0, 3)).p_value == 0.0
    assert math.isnan(stats.welch_greater([math.nan, 0.1, 0.1], [0.9, 0.9, 0.9]).p_value)
    assert stats.welch_greater([0.4, 0.4], [0.4, 0.4]).p_value == 1.0


def test_a_welch_cell_needs_the_papers_n_of_two_or_more():
    fields = {"id": "table_9.c", "kind": "table_cell", "source": {"artefact": "t",
              "where": "w"}, "statement": "s", "verbatim": "0.6", "arm": "a",
              "metric": "clean", "rationale": "A rationale long enough to be a sentence.",
              "test": {"name": "welch"}}
    with pytest.raises(ValidationError, match="n >= 2"):
        TableCell(**fields, expected={"mean": 0.6, "sd": 0.01, "n": 1})
    TableCell(**fields, expected={"mean": 0.6, "sd": 0.01, "n": 2})


@pytest.mark.parametrize("test", [{"name": "welch"}, {"name": "tolerance", "abs": 10}])
def test_a_nan_metric_leaves_a_cell_undetermined(tmp_path, test):
    c = claim("table_9.rough", "table_cell", arm="a", metric="roughness", test=test,
              expected={"mean": 0.60, "sd": 0.01, "n": 3})
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=3)}, [c])
    _runs(tmp_path, catalogue, "a", {"roughness": math.nan}, {"roughness": 5.0},
          {"roughness": 5.0})
    got = _judge(tmp_path, catalogue, "table_9.rough")
    assert (got.status, got.detail) == (
        "undetermined", "1 of 3 runs' roughness not finite: no test applies")


def test_a_nan_metric_leaves_a_not_decreasing_trend_undetermined(tmp_path):
    """0.9 → (nan, 0.1, 0.1) was 'held': no significant fall, p = 1."""
    arms = {"lo": arm(seeds=3), "hi": arm(seeds=3, **{"method.beta": 2})}
    c = claim("table_9.tr", "trend", arms=["lo", "hi"], measure="roughness",
              direction="not_decreasing", test={"name": "welch_one_sided"})
    catalogue = _catalogue(tmp_path, arms, [c])
    _runs(tmp_path, catalogue, "lo", *[{"roughness": 0.9}] * 3)
    _runs(tmp_path, catalogue, "hi", {"roughness": math.nan}, {"roughness": 0.1},
          {"roughness": 0.1})
    got = _judge(tmp_path, catalogue, "table_9.tr")
    assert (got.status, got.p_value) == ("undetermined", None)
    assert "not finite" in got.detail


def test_equal_constant_groups_hold_a_welch_cell(tmp_path):
    """The one NaN that is no difference: both sds 0, the same mean."""
    c = claim("table_9.clean", "table_cell", arm="a", metric="clean", test={"name": "welch"},
              expected={"mean": 0.5, "sd": 0.0, "n": 3})
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=3)}, [c])
    _runs(tmp_path, catalogue, "a", *[{"clean": 0.5}] * 3)
    got = _judge(tmp_path, catalogue, "table_9.clean")
    assert (got.status, got.p_value) == ("held", 1.0)


# ------------------------------------------------ 5. an event's share needs enough runs


def _one_spike_of_ten(tmp_path, **test):
    c = claim("table_9.ev", "event", arms=["a"],
              event={"name": "spike_duration_at_most", "max_epochs": 1, "fosc_threshold": 0.05},
              test={"name": "rate_at_least", "min_rate": 0.9, **test})
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=10)}, [c])
    spike, flat = [0.01, 0.01, 0.2, 0.01, 0.01], [0.01] * 5
    _runs(tmp_path, catalogue, "a", {"fosc": spike}, *[{"fosc": flat}] * 9)
    return _judge(tmp_path, catalogue, "table_9.ev")


def test_an_event_on_one_judged_run_of_ten_is_undetermined(tmp_path):
    """Held 1/1 before: '≥ 90 % of spikes last one epoch' on a single spike."""
    got = _one_spike_of_ten(tmp_path)
    low, high = sps.binomtest(1, 1).proportion_ci(0.95, method="exact")
    assert (got.status, got.ours, got.n_found, got.n_required) == (
        "undetermined", "1/1 runs", 10, 10)
    assert got.interval == pytest.approx((low, high))
    assert got.detail.startswith("judged among 1 run(s) with FOSC rising above the threshold; "
                                 "a share needs at least 3: ")


def test_an_event_decides_from_its_min_runs_on(tmp_path):
    assert _one_spike_of_ten(tmp_path, min_runs=1).status == "held"


# ------------------------------------------------ 7. a tolerance met exactly


def test_a_tolerance_met_to_the_last_bit_holds(tmp_path):
    assert abs(0.56 - 0.54) > 0.02  # 0.020000000000000018: binary rounding, not a miss
    c = claim("table_9.clean", "table_cell", arm="a", metric="clean",
              test={"name": "tolerance", "abs": 0.02}, expected={"mean": 0.54})
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=1)}, [c])
    _runs(tmp_path, catalogue, "a", {"clean": 0.56})
    assert _judge(tmp_path, catalogue, "table_9.clean").status == "held"
    _runs(tmp_path / "more", catalogue, "a", {"clean": 0.57})
    assert _judge(tmp_path / "more", catalogue, "table_9.clean").status == "failed"


@pytest.mark.parametrize(("diff", "status"), [
    (0.25 + 1e-12, "held"),  # |ours − paper| = tol + 1e-12 to the bit: the slack is inclusive
    (np.nextafter(0.25 + 1e-12, 1), "failed"),  # one ulp past it
])
def test_a_tolerance_is_inclusive_up_to_its_slack_of_1e_12(tmp_path, diff, status):
    ours = 0.5 - float(diff)
    assert abs(ours - 0.5) == diff  # exact: no rounding between the run and the verdict
    c = claim("table_9.rough", "table_cell", arm="a", metric="roughness",
              test={"name": "tolerance", "abs": 0.25}, expected={"mean": 0.5})
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=1)}, [c])
    _runs(tmp_path, catalogue, "a", {"roughness": ours})
    got = _judge(tmp_path, catalogue, "table_9.rough")
    assert (got.status, got.statistic) == (status, -diff)


def test_a_healing_clean_tolerance_met_to_the_last_bit_holds(tmp_path):
    assert abs(0.70 - 0.72) > 0.02
    arms = {"base": arm(seeds=2), "fixed": arm(seeds=2, **{"healing.enabled": True})}
    c = claim("table_9.fix", "healing", arms={"baseline": "base", "fixed": "fixed"},
              test={"name": "healing", "clean_tolerance": 0.02})
    catalogue = _catalogue(tmp_path, arms, [c])
    _runs(tmp_path, catalogue, "base", {**FLAGGED, "clean": 0.80}, {**REGULAR, "clean": 0.72})
    _runs(tmp_path, catalogue, "fixed", {**REGULAR, "clean": 0.70}, {**REGULAR, "clean": 0.9})
    assert _judge(tmp_path, catalogue, "table_9.fix").status == "held"


# ------------------------------------------------ 6, 8. verify's exit code


def _verify(folder, runs, *extra):
    return runner.invoke(app, ["verify", "--claims-dir", str(folder), "--runs-dir", str(runs),
                               *extra])


def test_verify_with_no_claim_at_the_tier_exits_3(tmp_path):
    c = claim("table_9.rate", "instability_rate", arm="a", expected={"k": 0, "n": 2},
              test={"name": "fisher_exact"})
    folder = claims_folder(tmp_path, {"a": arm(seeds=2)}, [c])  # a full-tier arm only
    (tmp_path / "runs").mkdir()
    junit = tmp_path / "j.xml"
    result = _verify(folder, tmp_path / "runs", "--tier", "cpu", "--junit", str(junit))
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "no claim in" in line and "has the 'cpu' tier: nothing judged" in line
    assert not junit.exists()


def test_held_and_incomplete_claims_exit_3_unless_partial_judging_was_asked(tmp_path):
    """1 held + 1 incomplete exited 0: the incomplete claim was found, not decided."""
    rate = claim("table_9.rate", "instability_rate", arm="a", expected={"k": 0, "n": 5},
                 test={"name": "fisher_exact"})
    other = own_count("table_9.other", "b", 0, 3)  # judged on any seeds found
    arms = {"a": arm(seeds=5), "b": arm(seeds=3, **{"method.beta": 2})}
    folder = claims_folder(tmp_path, arms, [rate, other])
    catalogue = load_catalogue(folder)
    _runs(tmp_path, catalogue, "a", *[REGULAR] * 5)
    _runs(tmp_path, catalogue, "b", REGULAR)  # 1 of 3 seeds
    result = _verify(folder, tmp_path / "runs")
    assert result.exit_code == 3, result.output
    assert "2 claims: 1 held, 1 incomplete" in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert "1 claim(s) incomplete" in line and "table_9.other" in line
    partial = _verify(folder, tmp_path / "runs", "--allow-partial")
    assert partial.exit_code == 0, partial.output
