"""The paired masking rule (v2): counts, exact McNemar, interval, three-way outcome.

Expected statistics are recomputed here from the counts with scipy, independently of how
`verdict` builds its per-example vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap

from trades_repro import verdict as vd
from trades_repro.records import PAPER_COLUMNS, AttackResult, Flag

V2 = vd.RULES["pgd10_minus_square_v2"]


def _attack(name: str, robust: str, **params) -> AttackResult:
    hits = robust.count("1")
    return AttackResult(name=name, paper_column=PAPER_COLUMNS.get(name, name),
                        accuracy=hits / len(robust), n_robust=hits, n_examples=len(robust),
                        robust=robust, seconds=0.0, params=params)


def _pair(b: int, c: int, both: int, n: int):
    """b robust to PGD-10 only, c to Square only, `both` to both, the rest to neither."""
    rest = n - b - c - both
    pgd = "1" * b + "0" * c + "1" * both + "0" * rest
    square = "0" * b + "1" * c + "1" * both + "0" * rest
    return {"pgd10": _attack("pgd10", pgd), "square": _attack("square", square, queries=5000)}


def _scipy_ci(b: int, c: int, n: int) -> tuple[float, float]:
    diffs = np.concatenate([np.ones(b), -np.ones(c), np.zeros(n - b - c)])
    rng = np.random.default_rng(0)
    ci = bootstrap((diffs,), np.mean, confidence_level=0.95, n_resamples=9999, method="BCa",
                   random_state=rng).confidence_interval
    return ci.low, ci.high


@pytest.mark.parametrize(("b", "c", "both", "n"), [(20, 2, 30, 100), (9, 1, 40, 100),
                                                   (3, 4, 50, 100), (60, 10, 200, 500)])
def test_v2_statistics_match_scipy_computed_from_the_counts(b, c, both, n):
    verdict = vd.apply_rule(V2, _pair(b, c, both, n))
    assert (verdict.n, verdict.b, verdict.c) == (n, b, c)
    assert verdict.margin == pytest.approx((b - c) / n)
    assert verdict.p_value == pytest.approx(binomtest(b, b + c, 0.5).pvalue)
    low, high = _scipy_ci(b, c, n)
    assert (verdict.ci_low, verdict.ci_high) == pytest.approx((low, high))
    assert verdict.ci_low <= verdict.margin <= verdict.ci_high
    assert "BCa" in verdict.interval


@pytest.mark.parametrize(("b", "c", "outcome"), [(25, 0, "flagged"), (8, 0, "inconclusive"),
                                                 (10, 3, "inconclusive"), (1, 1, "clear"),
                                                 (0, 10, "clear")])
def test_three_way_outcome_follows_the_interval(b, c, outcome):
    verdict = vd.apply_rule(V2, _pair(b, c, 40, 100))
    assert verdict.outcome == outcome, (verdict.ci_low, verdict.ci_high)
    low, high = verdict.ci_low, verdict.ci_high
    assert (low >= 0.08) == (outcome == "flagged") and (high < 0.08) == (outcome == "clear")
    assert verdict.flagged is {"flagged": True, "clear": False}.get(outcome)


def test_v1_keeps_its_exact_semantics_where_v2_is_inconclusive():
    attacks = _pair(8, 0, 40, 100)  # margin exactly 8 points
    v1 = vd.apply_rule(vd.PRIMARY_RULE, attacks)
    assert v1.rule == "pgd10_minus_square_v1" and v1.flagged is True and v1.outcome is None
    assert vd.apply_rule(V2, attacks).outcome == "inconclusive"


def test_both_attacks_count_only_clean_correct_images_as_robust():
    # Image 0: wrong clean, "robust" to PGD-10 only (the attack moved it onto the right class).
    attacks = {"pgd10": _attack("pgd10", "1100"), "square": _attack("square", "0100")}
    clean = _attack("clean", "0111")
    assert vd.discordant("1100", "0100") == (1, 0)
    assert vd.discordant("1100", "0100", clean.robust) == (0, 0)
    assert vd.apply_rule(V2, attacks, clean).b == 0
    assert vd.apply_rule(vd.PRIMARY_RULE, attacks, clean).margin == 0.25  # v1: as before


def test_no_discordant_pair_gives_an_exact_bound_not_a_degenerate_bootstrap():
    verdict = vd.apply_rule(V2, _pair(0, 0, 50, 100))
    bound = binomtest(0, 100).proportion_ci(0.95).high
    assert (verdict.ci_low, verdict.ci_high) == pytest.approx((-bound, bound))
    assert verdict.p_value == 1.0 and verdict.outcome == "clear"
    assert verdict.interval == vd.INTERVAL_DEGENERATE


def test_a_fired_masking_check_makes_clear_inconclusive_unless_decisive():
    zero = [Flag(attack="preflight", check="zero_gradients", message="3 points")]
    near = vd.apply_rule(V2, _pair(2, 1, 40, 100), flags=zero)
    assert near.outcome == "inconclusive" and "zero_gradients" in near.note
    below = vd.apply_rule(V2, _pair(0, 20, 40, 100), flags=zero)  # interval entirely < 0
    assert below.outcome == "clear"
    flagged = vd.apply_rule(V2, _pair(30, 0, 40, 100), flags=zero)
    assert flagged.outcome == "flagged"  # the check agrees with the verdict
    other = [Flag(attack="square", check="n_classes", message="targets")]
    assert vd.apply_rule(V2, _pair(2, 1, 40, 100), flags=other).outcome == "clear"


def test_missing_attack_is_no_verdict():
    verdict = vd.apply_rule(vd.RULES["pgd10_minus_autoattack_v2"], _pair(5, 0, 40, 100))
    assert verdict.outcome == "no_verdict" and verdict.flagged is None
    assert vd.verdict_line(verdict).startswith("no verdict")


def test_verdict_lines_name_rule_interval_and_square_budget():
    attacks = _pair(20, 2, 30, 100)
    attacks["square"] = _attack("square", attacks["square"].robust, queries=300)
    verdict = vd.apply_rule(V2, attacks)
    line = vd.verdict_line(verdict, attacks["square"])
    assert line.startswith("robustness overestimated: PGD-10 exceeds Square (300 queries, "
                           "reduced from AutoAttack's 5000) by 18.0 points")
    assert "95% CI [" in line and "b=20, c=2" in line and "(rule pgd10_minus_square_v2)" in line
    inconclusive = vd.verdict_line(vd.apply_rule(V2, _pair(8, 0, 40, 100)))
    assert inconclusive.startswith("inconclusive:") and "straddles" in inconclusive
