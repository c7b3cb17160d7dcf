"""The paired masking rule (v2): counts, exact McNemar, interval, three-way outcome.

Expected statistics are recomputed here from the counts with scipy, independently of how
`verdict` builds its per-example vectors; the interval's score statistic is recomputed with
its constrained maximum likelihood found numerically, not by the closed form `verdict` uses.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar
from scipy.stats import binomtest, multinomial, norm

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


def _tango_z(b: int, c: int, n: int, delta: float) -> float:
    """Tango's score statistic at Δ, the c-cell probability q maximising the likelihood of
    (b, c, rest) under p_b = q + Δ, p_c = q, found by a bounded 1-D search."""
    def minus_loglik(q: float) -> float:
        rest = (n - b - c) * math.log(1 - 2 * q - delta)
        return -(b * math.log(q + delta) + c * math.log(q) + rest)
    low, high = max(0.0, -delta) + 1e-13, (1 - delta) / 2 - 1e-13
    q = minimize_scalar(minus_loglik, bounds=(low, high), method="bounded",
                        options={"xatol": 1e-13}).x
    return (b - c - n * delta) / math.sqrt(n * (2 * q + delta * (1 - delta)))


def _assert_score_ends(b: int, c: int, n: int, low: float, high: float) -> None:
    z = norm.ppf(0.975)
    for end, target, edge in ((low, z, -1.0), (high, -z, 1.0)):
        if end != edge:  # an end strictly inside [-1, 1] solves Z(end) = ±z
            assert _tango_z(b, c, n, end) == pytest.approx(target, abs=1e-5), (b, c, n, end)


@pytest.mark.parametrize(("b", "c", "both", "n"), [(20, 2, 30, 100), (9, 1, 40, 100),
                                                   (3, 4, 50, 100), (60, 10, 200, 500)])
def test_v2_statistics_match_scipy_computed_from_the_counts(b, c, both, n):
    verdict = vd.apply_rule(V2, _pair(b, c, both, n))
    assert (verdict.n, verdict.b, verdict.c) == (n, b, c)
    assert verdict.margin == pytest.approx((b - c) / n)
    assert verdict.p_value == pytest.approx(binomtest(b, b + c, 0.5).pvalue)
    _assert_score_ends(b, c, n, verdict.ci_low, verdict.ci_high)
    assert verdict.ci_low < verdict.margin < verdict.ci_high
    assert verdict.interval == vd.INTERVAL and "Tango" in verdict.interval


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


def test_no_discordant_pair_gives_a_symmetric_score_interval_near_the_exact_bound():
    verdict = vd.apply_rule(V2, _pair(0, 0, 50, 100))
    assert verdict.ci_low == pytest.approx(-verdict.ci_high)
    _assert_score_ends(0, 0, 100, verdict.ci_low, verdict.ci_high)
    bound = binomtest(0, 100).proportion_ci(0.95).high  # 0.036: the old degenerate fallback
    assert verdict.ci_high == pytest.approx(bound, abs=0.002)
    assert verdict.p_value == 1.0 and verdict.outcome == "clear"


def test_one_more_image_where_square_is_weaker_never_makes_the_verdict_more_confident():
    """The audit's case: the BCa bootstrap gave (0, 0) inconclusive but (0, 1) clear at n = 5
    (interval [-80, 0]): evidence moving against overestimation made it decisive."""
    outcomes = [vd.apply_rule(V2, _pair(0, c, 2, 5)).outcome for c in (0, 1)]
    assert outcomes == ["inconclusive", "inconclusive"]
    assert vd.paired_interval(0, 1, 5)[1] > 0.08


@given(st.integers(1, 300).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(0, n)).flatmap(lambda t: st.tuples(
        st.just(t[0]), st.just(t[1]), st.integers(0, t[0] - t[1])))))
def test_the_interval_contains_the_margin_is_symmetric_and_monotone(counts):
    n, b, c = counts
    low, high, _ = vd.paired_interval(b, c, n)
    assert -1.0 <= low <= (b - c) / n <= high <= 1.0
    mirror = vd.paired_interval(c, b, n)
    assert mirror[:2] == pytest.approx((-high, -low), abs=1e-9)
    if b + c < n:  # one more image robust to the other attack only: both ends move down
        lower = vd.paired_interval(b, c + 1, n)
        assert lower[0] <= low + 1e-12 and lower[1] <= high + 1e-12


@pytest.mark.parametrize("n", [10, 20])
@pytest.mark.parametrize(("p_b", "p_c"), [(0.08, 0.0), (0.10, 0.02), (0.15, 0.07),
                                          (0.30, 0.22)])
def test_each_wrong_call_is_rare_when_the_true_margin_is_the_threshold(n, p_b, p_c):
    """Summed exactly over the trinomial (b, c, rest): at a true margin of exactly 8 points,
    "clear" and "flagged" are each wrong. A 95 % interval allows 2.5 % each; a score interval
    is approximate, so 3 % (Tango's worst here is 2.8 %, at n = 10 and p_c = 0.22). The BCa
    bootstrap it replaced said "clear" 7 % of the time at n = 10, p_b = 0.10."""
    wrong = {"clear": 0.0, "flagged": 0.0}
    for b in range(n + 1):
        for c in range(n + 1 - b):
            outcome = vd.decide(*vd.paired_interval(b, c, n)[:2], 0.08)[0]
            if outcome in wrong:
                wrong[outcome] += multinomial.pmf([b, c, n - b - c], n, [p_b, p_c, 1 - p_b - p_c])
    assert max(wrong.values()) <= 0.03, wrong


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
