"""Judging on fabricated evidence, each verdict checked against scipy/statsmodels called here
directly on the same counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from claimsutil import add_probe, arm, claim, claims_folder, own_count, write_run
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from trades_repro.claims import load_catalogue
from trades_repro.runclaim import is_evaluated
from trades_repro.verify import Context, Evidence, judge

RATE = {"test": {"name": "fisher_exact"}}


def _judge(tmp_path, arms, claims, *, allow_partial=False, runs=None):
    catalogue = load_catalogue(claims_folder(tmp_path, arms, claims))
    ctx = Context(catalogue, Evidence(runs or tmp_path / "runs"), "full", allow_partial)
    return catalogue, {e.id: judge(e, ctx) for e in catalogue.entries}


def _fill(tmp_path, catalogue, name, flagged: int, **kwargs):
    """Write evidence for every seed of arm `name`; the first `flagged` runs are flagged."""
    for i, spec in enumerate(catalogue.specs(name, "full")):
        square = 0.20 if i < flagged else 0.38
        write_run(tmp_path / "runs", spec, square=square, **kwargs)


def _rejudge(tmp_path, catalogue, claim_id, allow_partial=False):
    ctx = Context(catalogue, Evidence(tmp_path / "runs"), "full", allow_partial)
    return judge(catalogue.by_id[claim_id], ctx)


@pytest.mark.parametrize(("paper_k", "ours_k", "status"), [
    (7, 7, "held"), (0, 8, "failed"), (10, 8, "held"), (10, 5, "failed"),
    (1, 0, "held"), (9, 10, "held"),  # neighbours of 0/n and n/n: outside the paper's interval
])
def test_rate_claim_compares_both_counts_with_fishers_exact_test(tmp_path, paper_k, ours_k,
                                                                 status):
    c = claim("table_9.rate", "instability_rate", arm="a", expected={"k": paper_k, "n": 10},
              **RATE)
    catalogue, _ = _judge(tmp_path, {"a": arm()}, [c])
    _fill(tmp_path, catalogue, "a", ours_k)
    j = _rejudge(tmp_path, catalogue, "table_9.rate")
    ours_ci = stats.binomtest(ours_k, 10).proportion_ci(0.95, method="exact")
    fisher = stats.fisher_exact([[ours_k, 10 - ours_k], [paper_k, 10 - paper_k]])
    assert j.status == status
    assert j.ours == f"{ours_k}/10"
    assert j.interval == pytest.approx((ours_ci.low, ours_ci.high))
    assert (fisher.pvalue >= 0.05) == (status == "held")
    assert j.p_value == pytest.approx(fisher.pvalue)  # the p shown is the one that decided


def test_nothing_run_is_not_run_and_too_few_seeds_is_incomplete(tmp_path):
    c = claim("table_9.rate", "instability_rate", arm="a", expected={"k": 7, "n": 10}, **RATE)
    catalogue, judged = _judge(tmp_path, {"a": arm()}, [c])
    assert judged["table_9.rate"].status == "not run"
    for spec, square in zip(catalogue.specs("a", "full")[:3], (0.2, 0.2, 0.38), strict=False):
        write_run(tmp_path / "runs", spec, square=square)
    j = _rejudge(tmp_path, catalogue, "table_9.rate")
    assert (j.status, j.n_found, j.n_required) == ("incomplete", 3, 10)
    assert "3 of 10" in j.detail
    partial = _rejudge(tmp_path, catalogue, "table_9.rate", allow_partial=True)
    # judged on the 3 found, which no count could tell from 7/10 (0/3: p = 0.07)
    assert partial.partial and partial.status == "undetermined" and partial.ours == "2/3"
    assert "smallest attainable p 0.0699" in partial.detail


def test_runs_are_found_by_digest_never_by_folder_name(tmp_path):
    c = own_count("table_9.rate", "a", 1, 1)
    catalogue, _ = _judge(tmp_path, {"a": arm(seeds=1)}, [c])
    (spec,) = catalogue.specs("a", "full")
    other = spec.model_copy(update={"seed": 99})
    # another spec in a folder named like this one's (but not a digest name: a digest-named
    # folder whose spec.json is another's is an edited file, exit 2 - test_corrupt_evidence)
    write_run(tmp_path / "runs", other, folder=f"{spec.digest()}.copy", square=0.2)
    assert _rejudge(tmp_path, catalogue, "table_9.rate").status == "not run"
    write_run(tmp_path / "runs", spec, folder="renamed-by-hand", square=0.2)
    assert _rejudge(tmp_path, catalogue, "table_9.rate").status == "held"


def test_runs_without_the_rules_attacks_are_not_evidence_yet(tmp_path):
    c = claim("table_9.rate", "instability_rate", arm="a", expected={"k": 1, "n": 1}, **RATE)
    catalogue, _ = _judge(tmp_path, {"a": arm(seeds=1)}, [c])
    write_run(tmp_path / "runs", catalogue.specs("a", "full")[0], drop=("square",))
    assert _rejudge(tmp_path, catalogue, "table_9.rate").status == "not run"


def test_a_record_of_another_square_budget_is_never_the_runs_own(tmp_path):
    """A 1,000-query Square probe added later, with more attacks, must not replace the
    arm's own Square-5000 record (it used to: the record with the most attacks won)."""
    c = own_count("table_9.rate", "a", 0, 1)  # the Square-5000 record's 0 of 1 flagged holds
    catalogue, _ = _judge(tmp_path, {"a": arm(seeds=1)}, [c])
    run = write_run(tmp_path / "runs", catalogue.specs("a", "full")[0], square=0.38)
    own = add_probe(run, 1000, square=0.10, extra=("apgd-ce",))  # flagged, if taken
    judged = _rejudge(tmp_path, catalogue, "table_9.rate")
    assert (judged.status, judged.ours) == ("held", "0/1")
    arm_spec = catalogue.specs("a", "full")[0]
    spec = arm_spec.model_copy(update={"evaluation": arm_spec.evaluation.model_copy(
        update={"attacks": ("pgd10", "square")})})
    assert is_evaluated(run, spec, ("best_pgd10",))
    evals = json.loads((run / "eval.json").read_text())
    del evals["checkpoints"][own["key"]]  # the probe alone: run-claim must still evaluate
    (run / "eval.json").write_text(json.dumps(evals))
    assert not is_evaluated(run, spec, ("best_pgd10",))


def test_unfinished_runs_are_not_evidence(tmp_path):
    c = claim("table_9.rate", "instability_rate", arm="a", expected={"k": 1, "n": 1}, **RATE)
    catalogue, _ = _judge(tmp_path, {"a": arm(seeds=1)}, [c])
    write_run(tmp_path / "runs", catalogue.specs("a", "full")[0], status="running")
    assert _rejudge(tmp_path, catalogue, "table_9.rate").status == "not run"


def _trend_setup(tmp_path, flagged: list[int], test: str):
    names = [f"a{i}" for i in range(len(flagged))]
    arms = {n: arm(seeds=10, **{"method.beta": i + 1}) for i, n in enumerate(names)}
    c = claim("table_9.trend", "trend", arms=names, test={"name": test})
    catalogue, _ = _judge(tmp_path, arms, [c])
    for name, k in zip(names, flagged, strict=True):
        _fill(tmp_path, catalogue, name, k)
    return _rejudge(tmp_path, catalogue, "table_9.trend")


def _mantel(counts):
    """Mantel's M = √(N − 1)·r over the N runs, r the Pearson correlation of the arm's score
    (1, 2, …) with flagged (0/1) (Agresti, Categorical Data Analysis §3.4.6), computed here
    from the runs, not through statsmodels; one-sided p = P(Z ≥ M)."""
    x = np.concatenate([np.full(n, g + 1.0) for g, (_, n) in enumerate(counts)])
    y = np.concatenate([np.r_[np.ones(k), np.zeros(n - k)] for k, n in counts])
    m = np.sqrt(len(x) - 1) * np.corrcoef(x, y)[0, 1]
    return m, stats.norm.sf(m)


@pytest.mark.parametrize(("flagged", "status"), [([0, 5, 10], "held"), ([10, 5, 0], "failed"),
                                                 ([4, 5, 6], "failed"), ([0, 3, 3], "held"),
                                                 ([0, 1, 3], "held")])
def test_ordinal_trend_is_mantels_m_on_the_observed_counts(tmp_path, flagged, status):
    """0/10 and 10/10 arms included: statsmodels' Table adds 0.5 to empty cells unless told
    not to, which made 0/10, 3/10, 3/10 fail (p 0.083 instead of 0.0496)."""
    j = _trend_setup(tmp_path, flagged, "linear_by_linear")
    z, p = _mantel([(k, 10) for k in flagged])
    assert j.status == status
    assert (j.statistic, j.p_value) == (pytest.approx(z, rel=1e-9), pytest.approx(p, rel=1e-9))


@pytest.mark.parametrize(("flagged", "status"), [([1, 9], "held"), ([9, 1], "failed")])
def test_two_arm_trend_against_fisher(tmp_path, flagged, status):
    j = _trend_setup(tmp_path, flagged, "fisher")
    low, high = flagged
    expected = stats.fisher_exact([[high, 10 - high], [low, 10 - low]], alternative="greater")
    assert j.status == status
    assert j.p_value == pytest.approx(expected.pvalue)


def test_not_decreasing_holds_unless_a_significant_fall(tmp_path):
    arms = {"plain": arm(seeds=10), "awp": arm(seeds=10, **{"method.beta": 2})}
    c = claim("table_9.awp", "trend", arms=["plain", "awp"], direction="not_decreasing",
              test={"name": "fisher"})
    catalogue, _ = _judge(tmp_path, arms, [c])
    _fill(tmp_path, catalogue, "plain", 7)
    _fill(tmp_path, catalogue, "awp", 6)
    assert _rejudge(tmp_path, catalogue, "table_9.awp").status == "held"
    for spec in catalogue.specs("awp", "full"):  # AWP now removes it: 0/10
        write_run(tmp_path / "runs", spec, square=0.38)
    j = _rejudge(tmp_path, catalogue, "table_9.awp")
    assert j.status == "failed"
    assert j.p_value == pytest.approx(
        stats.fisher_exact([[7, 3], [0, 10]], alternative="greater").pvalue)


@pytest.mark.parametrize(("test", "ours", "status"), [
    ({"name": "tolerance", "abs": 0.02}, 0.91, "held"),
    ({"name": "tolerance", "abs": 0.02}, 0.95, "failed"),
    ({"name": "welch"}, 0.90, "held"),
])
def test_table_cell(tmp_path, test, ours, status):
    c = claim("table_9.clean", "table_cell", arm="a", metric="clean", test=test,
              expected={"mean": 0.90, "sd": 0.01, "n": 5})
    catalogue, _ = _judge(tmp_path, {"a": arm(seeds=4)}, [c])
    values = [ours - 0.01, ours, ours, ours + 0.01]
    for spec, value in zip(catalogue.specs("a", "full"), values, strict=True):
        write_run(tmp_path / "runs", spec, clean=value)
    j = _rejudge(tmp_path, catalogue, "table_9.clean")
    assert j.status == status
    if test["name"] == "welch":
        ref = stats.ttest_ind_from_stats(0.90, 0.01, 5, np.mean(values),
                                         np.std(values, ddof=1), 4, equal_var=False)
        assert j.p_value == pytest.approx(ref.pvalue)


def test_a_subset_with_no_runs_is_undetermined(tmp_path):
    c = claim("table_9.uns", "table_cell", arm="a", subset="flagged", metric="clean",
              rule="pgd10_minus_square_v1", test={"name": "tolerance", "abs": 0.1},
              expected={"mean": 0.5})
    catalogue, _ = _judge(tmp_path, {"a": arm(seeds=2)}, [c])
    _fill(tmp_path, catalogue, "a", 0)
    j = _rejudge(tmp_path, catalogue, "table_9.uns")
    assert j.status == "undetermined" and "no flagged run" in j.detail


@pytest.mark.parametrize(("fosc", "status"), [([0.01, 0.2, 0.2, 0.01, 0.01], "held"),
                                              ([0.01, 0.01, 0.01, 0.01, 0.01], "failed"),
                                              ([0.01, 0.01, 0.01, 0.2, 0.2], "failed")])
def test_self_healing_event_present_and_absent(tmp_path, fosc, status):
    c = claim("table_9.heal", "event", arms=["a"], event={"name": "self_healing", "within": 3},
              test={"name": "rate_at_least", "min_rate": 0.5, "min_runs": 1})
    catalogue, _ = _judge(tmp_path, {"a": arm(seeds=2)}, [c])
    for spec in catalogue.specs("a", "full"):
        write_run(tmp_path / "runs", spec, fosc=fosc)
    j = _rejudge(tmp_path, catalogue, "table_9.heal")
    assert j.status == status
    assert len(j.series) == 2 and next(iter(j.series.values())) == fosc


def test_fosc_spike_compares_flagged_with_regular_runs(tmp_path):
    c = claim("table_9.spike", "event", arms=["a"], subset="flagged",
              event={"name": "fosc_spike", "ratio": 3, "pgd10_max_change": 0.02},
              test={"name": "rate_at_least", "min_rate": 1.0, "min_runs": 1})
    catalogue, _ = _judge(tmp_path, {"a": arm(seeds=2)}, [c])
    flagged, regular = catalogue.specs("a", "full")
    write_run(tmp_path / "runs", flagged, square=0.2, fosc=[0.01, 0.01, 0.05, 0.01])
    write_run(tmp_path / "runs", regular, fosc=[0.01, 0.012, 0.011, 0.01])
    j = _rejudge(tmp_path, catalogue, "table_9.spike")
    assert (j.status, j.ours) == ("held", "1/1 runs")


def test_healing_claim(tmp_path):
    arms = {"base": arm(seeds=4), "fixed": arm(seeds=4, **{"healing.enabled": True})}
    c = claim("table_9.fix", "healing", arms={"baseline": "base", "fixed": "fixed"},
              test={"name": "healing", "clean_tolerance": 0.02})
    catalogue, _ = _judge(tmp_path, arms, [c])
    _fill(tmp_path, catalogue, "base", 2, clean=0.80)
    _fill(tmp_path, catalogue, "fixed", 0, clean=0.79)
    assert _rejudge(tmp_path, catalogue, "table_9.fix").status == "held"
    _fill(tmp_path, catalogue, "fixed", 1, clean=0.79)  # seed 0 still flagged when fixed
    assert _rejudge(tmp_path, catalogue, "table_9.fix").status == "failed"


def test_property_claim_reads_its_recorded_outcome(tmp_path):
    c = claim("table_9.prop", "property", test={"name": "pytest",
                                                "node": "tests/test_metrics.py::test_sgcs"})
    catalogue, judged = _judge(tmp_path, {"a": arm()}, [c])
    assert judged["table_9.prop"].status == "not run"
    folder = tmp_path / "runs" / "_properties"
    folder.mkdir(parents=True)
    (folder / "table_9.prop.json").write_text('{"outcome": "failed"}')
    assert _rejudge(tmp_path, catalogue, "table_9.prop").status == "failed"


def test_fixed_cells_keep_only_the_seeds_flagged_without_algorithm_1(tmp_path):
    arms = {"base": arm(seeds=4), "fixed": arm(seeds=4, **{"healing.enabled": True})}
    c = claim("table_9.fixed", "table_cell", arm="fixed", seeds_flagged_in="base",
              rule="pgd10_minus_square_v1", metric="clean",
              expected={"mean": 0.70}, test={"name": "tolerance", "abs": 0.01})
    catalogue, _ = _judge(tmp_path, arms, [c])
    _fill(tmp_path, catalogue, "base", 2)  # seeds 0 and 1 flagged
    for spec, clean in zip(catalogue.specs("fixed", "full"), (0.70, 0.70, 0.95, 0.95),
                           strict=True):
        write_run(tmp_path / "runs", spec, clean=clean)
    j = _rejudge(tmp_path, catalogue, "table_9.fixed")
    assert (j.status, j.ours) == ("held", "0.7000 ± 0.0000 (n = 2)")


def test_report_markdown_plots_event_evidence_and_junit_marks_failures(tmp_path):
    import xml.etree.ElementTree as ET

    from trades_repro.report import write_junit, write_markdown

    c = claim("table_9.heal", "event", arms=["a"], event={"name": "self_healing", "within": 3},
              test={"name": "rate_at_least", "min_rate": 0.5, "min_runs": 1})
    rate = claim("table_9.rate", "instability_rate", arm="a", expected={"k": 0, "n": 6}, **RATE)
    catalogue, _ = _judge(tmp_path, {"a": arm(seeds=6)}, [c, rate])
    for spec in catalogue.specs("a", "full"):  # 6/6 flagged against 0/6: Fisher p = 0.002
        write_run(tmp_path / "runs", spec, square=0.2, fosc=[0.01, 0.2, 0.01])
    ctx = Context(catalogue, Evidence(tmp_path / "runs"), "full")
    judged = [judge(e, ctx) for e in catalogue.entries]
    assert [j.status for j in judged] == ["held", "failed"]
    report = tmp_path / "out" / "report.md"
    report.parent.mkdir()
    write_markdown(report, judged, catalogue.titles, tier="full", runs_dir=tmp_path / "runs")
    text = report.read_text()
    p = stats.fisher_exact([[6, 0], [0, 6]]).pvalue
    assert (f"| `table_9.rate` | 0/6 | 6/6 | Fisher exact (two-sided) against the paper's "
            f"count, held unless p < 0.05 | p = {p:.3g} | **failed** |") in text
    assert (report.parent / "report_table_9.heal.png").stat().st_size > 1000
    assert "(report_table_9.heal.png)" in text
    write_junit(tmp_path / "j.xml", judged, tier="full")
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("2", "1", "0")
    assert "p = " in suite.find("testcase/failure").get("message")


# tenths from 0.1 to 100: distinct values stay distinct under the rescalings below
_tenths = st.integers(1, 1000).map(lambda k: k / 10)


@given(data=st.data(), min_rho=st.floats(0.05, 0.95))
def test_fig_4_events_depend_only_on_ranks(data, min_rho):
    """Spearman's ρ reads ranks: any increasing rescaling of a series (log, affine, square)
    leaves Fig. 4's verdicts and their ρ values unchanged."""
    from trades_repro import events

    w = data.draw(st.lists(_tenths, min_size=3, max_size=40))
    n = len(w)
    kl, ce = (data.draw(st.lists(_tenths, min_size=n, max_size=n)) for _ in "ab")
    cos = [v / 100 for v in data.draw(st.lists(_tenths, min_size=n, max_size=n))]
    squash = [lambda v: math.log(v), lambda v: 3 * v + 1, lambda v: v ** 2]  # increasing on v > 0
    f, g, h = (data.draw(st.sampled_from(squash)) for _ in "fgh")
    base = events.kl_with_w(w, kl, ce, min_rho=min_rho)
    moved = events.kl_with_w([f(v) for v in w], [g(v) for v in kl], [h(v) for v in ce],
                             min_rho=min_rho)
    assert (moved.happened, moved.detail) == (base.happened, base.detail)
    base = events.cosine_against_w(w, cos, min_rho=min_rho)
    moved = events.cosine_against_w([f(v) for v in w], [2 * c - 1 for c in cos],
                                    min_rho=min_rho)
    assert (moved.happened, moved.detail) == (base.happened, base.detail)
