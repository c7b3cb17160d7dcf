"""The gradient-masking verdict: PGD-10 accuracy against a stronger attack's, rule by rule.

Version 1 rules are the paper's (Tables 2 and 4 captions): flag when PGD-10 − other ≥ 8
points, on the two accuracies alone. The paper's claims rely on them, unchanged.

Version 2 rules are paired: per example, b = robust to PGD-10 only, c = robust to the other
attack only, both counting an image as robust only if it is also classified right clean.
The margin is (b − c) / n; the exact McNemar p-value is scipy's two-sided binomial test of b
out of b + c at 1/2; the 95 % interval for the margin is Tango's score interval for a
difference of paired proportions (Tango 1998), whose ends scipy's `brentq` finds. Outcome:
``flagged`` when the interval's lower bound ≥ the threshold, ``clear`` when its upper
bound < the threshold, ``inconclusive`` otherwise, and also when a masking check fired
(pyautoattack's checks, the adversarial re-check) while the interval does not rule out any
gap above zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from scipy.optimize import brentq
from scipy.stats import binomtest, norm

from trades_repro.records import (
    PAPER_COLUMNS,
    STANDARD_SQUARE_QUERIES,
    AttackResult,
    CheckpointEval,
    Flag,
    Outcome,
    Verdict,
)

CONFIDENCE = 0.95
_Z = float(norm.ppf(0.5 + CONFIDENCE / 2))
INTERVAL = "Tango's score interval (paired proportions), roots by scipy.optimize.brentq"
# It replaced a BCa bootstrap of the per-example differences, which collapses when b or c is
# 0: b = 0, c = 1 gave [−80, 0] points at n = 5, "clear", where b = c = 0 was inconclusive;
# at a true margin of 8 points the bootstrap said "clear" 7 % of the time at n = 10 (Tango:
# under 1 %, summed exactly over the trinomial; tests/test_verdict.py).
_EDGE = 1e-9  # the score's variance vanishes at a margin of ±1: stop just inside
# Checks whose firing says the gradient attacks may be unreliable (see preflight.CHECK_CODES).
# Not "n_classes" or "other" (nothing about masking), nor "square_beats_gradient_attacks":
# that is the unpaired form of this very comparison, firing on a single image (alpha 0.2 %),
# so on a regular model at n = 100 it fired whenever Square broke one image more (measured).
MASKING_CHECKS = frozenset({"randomized", "probability_output", "zero_gradients", "dynamic",
                            "adversarial_check", "nonfinite_gradients"})
_EXACT = 1e-12  # 8/100 must count as 0.08


@dataclass(frozen=True)
class VerdictRule:
    """Flag a checkpoint when PGD-10 accuracy − `attack` accuracy ≥ `threshold`."""

    name: str
    version: int
    attack: str
    threshold: float
    source: str


_TABLE2 = ("Tables 2 and 4 captions: unstable when PGD-10 (white box) is significantly higher "
           "than Square (black box), >= 8%")
VERDICT_RULES = (
    VerdictRule("pgd10_minus_square_v1", 1, "square", 0.08, _TABLE2),
    # Stricter: AutoAttack includes Square, so its gap is at least Square's. Same 0.08: every
    # Gap the paper reports (Tables 3, 5, 6, 7; mean ± sd) lies either <= 0.071 (regular,
    # fixed, "Modified") or >= 0.102 (unstable, AWP); 0.08 separates them, as it does Table 2.
    VerdictRule("pgd10_minus_autoattack_v1", 1, "autoattack", 0.08,
                "Table 3's Gap (PGD-10 − AutoAttack); threshold as Table 2's rule"),
    # Paired, with uncertainty: at n = 100 a margin of 8 and of 7 points are indistinguishable.
    VerdictRule("pgd10_minus_square_v2", 2, "square", 0.08, _TABLE2 + "; paired, 95% interval"),
    VerdictRule("pgd10_minus_autoattack_v2", 2, "autoattack", 0.08,
                "Table 3's Gap; paired, 95% interval"),
)
RULES = {rule.name: rule for rule in VERDICT_RULES}
PRIMARY_RULE = RULES["pgd10_minus_square_v1"]  # the paper's rule: claims' default
DIAGNOSE_RULE = RULES["pgd10_minus_square_v2"]  # `diagnose`'s exit code


def apply_rule(rule: VerdictRule, attacks: dict[str, AttackResult],
               clean: AttackResult | None = None, flags: Iterable[Flag] = ()) -> Verdict:
    """Apply `rule` to the attack results; version 2 also reads `clean` and fired `flags`."""
    pgd10, other = attacks.get("pgd10"), attacks.get(rule.attack)
    verdict = Verdict(rule=rule.name, version=rule.version, attack=rule.attack,
                      threshold=rule.threshold, pgd10=pgd10 and pgd10.accuracy,
                      other=other and other.accuracy, margin=None, flagged=None)
    if pgd10 is None or other is None:
        return verdict.model_copy(update={"outcome": "no_verdict"} if rule.version > 1 else {})
    if rule.version == 1:
        margin = (pgd10.n_robust - other.n_robust) / pgd10.n_examples  # exact counts
        return verdict.model_copy(update={"margin": margin,
                                          "flagged": margin >= rule.threshold - _EXACT})
    return verdict.model_copy(update=_paired(rule, pgd10, other, clean, flags))


def verdicts_of(record: CheckpointEval) -> list[Verdict]:
    """Every rule's verdict on the record's attack results. Verdicts are derived: readers of
    `eval.json` recompute them, so a record made before a rule changed is judged by it."""
    return [apply_rule(rule, record.attacks, record.clean, record.flags) for rule in VERDICT_RULES]


def discordant(pgd10: str, other: str, clean: str | None = None) -> tuple[int, int]:
    """(b, c): examples robust to PGD-10 only / to the other attack only, clean-correct."""
    ok = clean or "1" * len(pgd10)
    b = sum(k == p == "1" and o == "0" for k, p, o in zip(ok, pgd10, other, strict=True))
    c = sum(k == o == "1" and p == "0" for k, p, o in zip(ok, pgd10, other, strict=True))
    return b, c


def paired_interval(b: int, c: int, n: int) -> tuple[float, float, str]:
    """95 % interval for the paired margin Δ = (b − c) / n over n examples, and its method.

    Tango's (1998) score interval: every Δ whose score statistic
    Z(Δ) = (b − c − nΔ) / √(n(2q̃ + Δ(1 − Δ))) lies within ±z₀.₉₇₅, where q̃ is the
    maximum-likelihood probability of a c-type example given Δ. It contains (b − c) / n,
    stays inside [−1, 1], and keeps its width when b or c is 0, e.g.
    ``paired_interval(0, 1, 5)`` ≈ (−0.62, 0.32).
    """
    margin = (b - c) / n

    def beyond(limit: float) -> Callable[[float], float]:
        return lambda delta: _score(b, c, n, delta) - limit

    low = -1.0 if beyond(_Z)(_EDGE - 1) <= 0 else brentq(beyond(_Z), _EDGE - 1, margin)
    high = 1.0 if beyond(-_Z)(1 - _EDGE) >= 0 else brentq(beyond(-_Z), margin, 1 - _EDGE)
    return float(low), float(high), INTERVAL


def _score(b: int, c: int, n: int, delta: float) -> float:
    """Tango's Z(Δ): the margin's distance from Δ in standard errors under Δ."""
    quad_b = -b - c + (2 * n - b + c) * delta  # q̃ is the quadratic's larger root
    quad_c = -c * delta * (1 - delta)
    q = (-quad_b + math.sqrt(max(0.0, quad_b * quad_b - 8 * n * quad_c))) / (4 * n)
    spread = n * (2 * q + delta * (1 - delta))
    gap = b - c - n * delta
    if spread <= 0:  # b = c = 0 at Δ = 0, or Δ at ±1: no spread, so no distance unless gap
        return math.copysign(math.inf, gap) if gap else 0.0
    return gap / math.sqrt(spread)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b successes in b + c at 1/2."""
    return float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0


def _paired(rule: VerdictRule, pgd10: AttackResult, other: AttackResult,
            clean: AttackResult | None, flags: Iterable[Flag]) -> dict:
    n = pgd10.n_examples
    b, c = discordant(pgd10.robust, other.robust, clean and clean.robust)
    low, high, method = paired_interval(b, c, n)
    outcome, note = decide(low, high, rule.threshold, flags)
    return {"margin": (b - c) / n, "n": n, "b": b, "c": c, "p_value": mcnemar_exact(b, c),
            "ci_low": low, "ci_high": high, "interval": method, "outcome": outcome,
            "flagged": {"flagged": True, "clear": False}.get(outcome), "note": note}


def decide(low: float, high: float, threshold: float,
           flags: Iterable[Flag] = ()) -> tuple[Outcome, str | None]:
    """The three-way outcome of an interval, and a note when a fired check overrides it.

    A fired masking check leaves ``flagged`` alone (it agrees) but turns ``clear`` into
    ``inconclusive`` unless the interval lies at or below zero: only then is the margin
    decisive enough to outweigh a check that says the gradient attacks may be unreliable.
    """
    if low >= threshold - _EXACT:
        return "flagged", None
    if high >= threshold - _EXACT:
        return "inconclusive", None
    fired = sorted({f.check for f in flags if f.check in MASKING_CHECKS})
    if fired and high > _EXACT:
        return "inconclusive", f"clear by the interval, but checks fired: {', '.join(fired)}"
    return "clear", None


def attack_label(result: AttackResult | None, name: str) -> str:
    """The paper's column name, with Square's budget when it is not AutoAttack's standard."""
    label = PAPER_COLUMNS[name]
    queries = square_queries(result)
    standard = "" if queries == STANDARD_SQUARE_QUERIES else (
        f", reduced from AutoAttack's {STANDARD_SQUARE_QUERIES}")
    if name == "square" and queries is not None:
        label += f" ({queries} queries{standard})"
    elif name == "autoattack" and queries is not None and standard:  # its Square's budget
        label += f" (Square at {queries} queries{standard})"
    version = result.params.get("version") if result else None
    if version and version != "standard":
        label += f" (AutoAttack version {version})"
    return label


def square_queries(result: AttackResult | None) -> int | None:
    """Square's query budget in `result`: its own, or the one inside AutoAttack's cascade."""
    if result is None:
        return None
    return result.params.get("queries", result.params.get("square.queries"))


def verdict_line(verdict: Verdict, other: AttackResult | None = None) -> str:
    """One sentence, e.g. 'robustness overestimated: PGD-10 exceeds Square by 14.2 points
    (rule pgd10_minus_square_v1)'; `other` adds the attack's non-standard settings."""
    label = attack_label(other, verdict.attack)
    tag = f"(rule {verdict.rule})"
    if verdict.margin is None:
        return f"no verdict: PGD-10 and {PAPER_COLUMNS[verdict.attack]} are both needed {tag}"
    points = 100 * verdict.margin
    gap = (f"PGD-10 exceeds {label} by {points:.1f} points" if points >= 0
           else f"PGD-10 is {-points:.1f} points below {label}")
    limit = f"{100 * verdict.threshold:.1f}-point threshold"
    if verdict.version == 1:
        if verdict.flagged:
            return f"robustness overestimated: {gap} {tag}"
        return f"no overestimation detected: {gap}, below the {limit} {tag}"
    stats = (f"95% CI [{100 * verdict.ci_low:.1f}, {100 * verdict.ci_high:.1f}], n={verdict.n}, "
             f"b={verdict.b}, c={verdict.c}, McNemar p={verdict.p_value:.2g}")
    head = {"flagged": f"robustness overestimated: {gap}; {stats}, above the {limit}",
            "clear": f"no overestimation detected: {gap}; {stats}, below the {limit}",
            "inconclusive": f"inconclusive: {gap}; {stats}, "
                            + (verdict.note or f"the interval straddles the {limit}")}
    return f"{head[verdict.outcome]} {tag}"
