"""One judge per claim kind: evidence → held / failed / undetermined, with the numbers.

Each judge collects its arms' finished runs (`verify.collect`, which also answers 'not run'
or 'incomplete'), computes our value, runs the claim's test from `stats` and says why.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from trades_repro import events, stats
from trades_repro.claimkinds import (
    WHITE_BOX,
    BatchCoupling,
    FoscSpike,
    GapDrop,
    GapNegative,
    HealingSignature,
    SelfHealing,
    SgcsWithFosc,
    SpikeDuration,
    SpikePersists,
    SquareLowest,
)
from trades_repro.claims import Entry
from trades_repro.verify import (
    Context,
    Judgement,
    RunEvidence,
    collect,
    fmt_cell,
    fmt_rate,
    judged,
    needed,
    subset,
)

# Tolerances are inclusive, and accuracies are k/10000: 0.5563 − 0.5363 is
# 0.020000000000000018 in binary, so |diff| ≤ tol gets the same slack as verdict._EXACT.
SLACK = 1e-12


def _within(diff: float, tolerance: float) -> bool:
    return abs(diff) <= tolerance + SLACK


def _not_finite(values: list[float], what: str) -> str | None:
    """A detail for an undetermined verdict when a value is NaN or infinite, else None."""
    bad = sum(not math.isfinite(v) for v in values)
    return f"{bad} of {len(values)} runs' {what} not finite: no test applies" if bad else None


def needs_of(claim: Any) -> frozenset[str]:
    """The evaluation results (attacks, "clean", "landscape") a claim's judge reads."""
    if claim.kind == "table_cell":
        return needed(claim, (claim.metric,))
    if claim.kind == "trend":
        return needed(claim, () if claim.measure == "flagged" else (claim.measure,))
    if claim.kind == "event" and isinstance(claim.event, SquareLowest):
        return needed(claim, ("square", *WHITE_BOX))
    if claim.kind == "healing":
        return needed(claim, ("clean",))
    return needed(claim)  # a property reads none: it names no rule


def table_cell(entry: Entry, ctx: Context) -> Judgement:
    claim = entry.claim
    found, early = collect(entry, ctx, claim.arm_names(), needs=needs_of(claim))
    if early:
        return early
    runs = subset(found[claim.arm], claim.subset, claim.rule)
    if claim.seeds_flagged_in:
        seeds = {r.spec.seed for r in subset(found[claim.seeds_flagged_in], "flagged",
                                              claim.rule)}
        runs = [r for r in runs if r.spec.seed in seeds]
    values = [v for v in (r.metric(claim.metric) for r in runs) if v is not None]
    common = {"n_required": len(ctx.catalogue.specs(claim.arm, ctx.tier)),
              "n_found": len(found[claim.arm]), "partial": ctx.allow_partial}
    if not values:
        return judged(entry, ctx, "undetermined", **common, detail=(
            f"no {claim.subset} run with '{claim.metric}' among {len(found[claim.arm])}"))
    if why := _not_finite(values, claim.metric):
        return judged(entry, ctx, "undetermined", **common, detail=why)
    mean, sd = stats.mean_sd(values)
    ours = fmt_cell(mean, sd if len(values) > 1 else None, len(values))
    expected = claim.expected
    if claim.test.name == "tolerance":
        diff = mean - expected.mean
        held = _within(diff, claim.test.abs)
        return judged(entry, ctx, "held" if held else "failed", ours=ours, statistic=diff,
                     test=f"|ours − paper| ≤ {claim.test.abs:g}",
                     detail=f"difference {diff:+.4f}", **common)
    if len(values) < 2:
        return judged(entry, ctx, "undetermined", ours=ours, test="Welch t-test", **common,
                     detail="a Welch test needs at least 2 of our runs")
    result = stats.welch_from_stats((expected.mean, expected.sd, expected.n), (mean, sd,
                                                                              len(values)))
    test = f"Welch t-test, held unless p < {claim.test.alpha:g}"
    if math.isnan(result.p_value):
        return judged(entry, ctx, "undetermined", ours=ours, test=test, **common,
                     detail="the Welch test is undefined on these summaries (p is NaN)")
    held = result.p_value >= claim.test.alpha
    return judged(entry, ctx, "held" if held else "failed", ours=ours, **common, test=test,
                 statistic=result.statistic, p_value=result.p_value,
                 detail=f"difference {mean - expected.mean:+.4f}")


def instability_rate(entry: Entry, ctx: Context) -> Judgement:
    claim = entry.claim
    found, early = collect(entry, ctx, (claim.arm,), needs=needs_of(claim))
    if early:
        return early
    flags = [r.flagged(claim.rule) for r in found[claim.arm]]
    if any(f is None for f in flags):
        return judged(entry, ctx, "undetermined", n_found=len(flags),
                     detail=f"rule {claim.rule} needs attacks some runs lack")
    k, n = sum(flags), len(flags)
    common = dict(ours=fmt_rate(k, n), statistic=k / n, n_found=n, partial=ctx.allow_partial,
                  n_required=len(ctx.catalogue.specs(claim.arm, ctx.tier)))
    if claim.test.name == "count_at_most":
        return judged(entry, ctx, "held" if k <= claim.test.k else "failed", **common,
                     test=f"at most {claim.test.k} of our runs flagged (our own count)",
                     detail=f"{k} of {n} flagged")
    paper, alpha = (claim.expected.k, claim.expected.n), claim.test.alpha
    result = stats.fisher_two_sided((k, n), paper)  # both rates are samples
    confidence = 1 - alpha
    ours_ci = stats.clopper_pearson(k, n, confidence)
    paper_ci = stats.clopper_pearson(*paper, confidence)
    intervals = (f"exact {confidence:.0%} intervals: ours [{ours_ci[0]:.3f}, "
                 f"{ours_ci[1]:.3f}], the paper's {paper[0]}/{paper[1]} "
                 f"[{paper_ci[0]:.3f}, {paper_ci[1]:.3f}]")
    test = f"{result.name} against the paper's count, held unless p < {alpha:g}"
    floor = min(stats.fisher_two_sided((j, n), paper).p_value for j in range(n + 1))
    if floor >= alpha:  # a claim no outcome could fail says nothing: more seeds decide
        return judged(entry, ctx, "undetermined", **common, test=test, p_value=result.p_value,
                     interval=ours_ci, detail=f"no count of {n} runs could differ from "
                     f"{paper[0]}/{paper[1]} at {alpha:g} (smallest attainable p "
                     f"{floor:.3g}): more seeds decide; {intervals}")
    held = result.p_value >= alpha
    return judged(entry, ctx, "held" if held else "failed", **common, test=test,
                 p_value=result.p_value, interval=ours_ci, detail=intervals)


def trend(entry: Entry, ctx: Context) -> Judgement:
    claim = entry.claim
    found, early = collect(entry, ctx, claim.arms, needs=needs_of(claim))
    if early:
        return early
    runs = [subset(found[a], which, claim.rule) for a, which in claim.groups()]
    arms = tuple(dict.fromkeys(claim.arms))  # an arm split into subsets counts once
    if claim.measure == "flagged":
        counts = [(sum(bool(r.flagged(claim.rule)) for r in rs), len(rs)) for rs in runs]
        if any(n == 0 for _, n in counts):
            return judged(entry, ctx, "undetermined", detail="an arm has no finished run")
        ours = ", ".join(fmt_rate(k, n) for k, n in counts)
        result = _rate_trend(claim.test.name, counts, claim.direction)
    else:
        values = [[v for v in (r.metric(claim.measure) for r in rs) if v is not None]
                  for rs in runs]
        if any(len(v) < 2 for v in values):
            return judged(entry, ctx, "undetermined", detail="each group needs 2 evaluated "
                          f"runs; found {', '.join(map(str, map(len, values)))}")
        if why := _not_finite([x for v in values for x in v], claim.measure):
            return judged(entry, ctx, "undetermined", detail=why)
        ours = ", ".join(fmt_cell(*stats.mean_sd(v)) for v in values)
        low, high = values if claim.direction == "increasing" else values[::-1]
        result = stats.welch_greater(high, low)
        if math.isnan(result.p_value):
            return judged(entry, ctx, "undetermined", ours=ours,
                          detail="the Welch test is undefined on these values (p is NaN)")
    significant = result.p_value < claim.test.alpha
    held = significant if claim.direction == "increasing" else not significant
    what = ("a rise along the arms" if claim.direction == "increasing"
            else "no significant fall along the arms")
    n_total = sum(len(found[a]) for a in arms)
    return judged(entry, ctx, "held" if held else "failed", ours=ours, n_found=n_total,
                 n_required=sum(len(ctx.catalogue.specs(a, ctx.tier)) for a in arms),
                 test=f"{result.name}, α = {claim.test.alpha:g}: {what}",
                 statistic=result.statistic, p_value=result.p_value,
                 partial=ctx.allow_partial, detail=_paper_p(claim))


def _rate_trend(name: str, counts: list[tuple[int, int]], direction: str) -> stats.TestResult:
    """Increasing: test for a rise; not_decreasing: test for a fall (which must not show)."""
    ordered = counts if direction == "increasing" else counts[::-1]
    if name == "fisher":
        return stats.fisher_increasing(ordered[0], ordered[1])
    return stats.linear_by_linear_increasing(ordered)


def _paper_p(claim: Any) -> str:
    if claim.expected is None or claim.measure != "flagged":
        return ""
    counts = [(r.k, r.n) for r in claim.expected]
    paper = _rate_trend(claim.test.name, counts, claim.direction)
    return f"the same test on the paper's counts: p = {paper.p_value:.3g}"


def event(entry: Entry, ctx: Context) -> Judgement:
    claim = entry.claim
    breakdown = isinstance(claim.event, SquareLowest)  # reads eval.json, not the series
    found, early = collect(entry, ctx, claim.arm_names(), needs=needs_of(claim))
    if early:
        return early
    runs, what = _eligible(claim.event, subset([r for a in claim.arms for r in found[a]],
                                               claim.subset, claim.rule))
    steps = isinstance(claim.event, BatchCoupling)
    with_sgcs = isinstance(claim.event, SgcsWithFosc)
    reference = _reference_median(claim, found)
    if not runs or (isinstance(claim.event, FoscSpike) and reference is None):
        return judged(entry, ctx, "undetermined", n_found=sum(map(len, found.values())),
                     detail=f"no {claim.subset} run with {what}" if not runs
                     else "no reference run to compare FOSC with")
    outcomes = [(r, _event_outcome(claim.event, r, reference)) for r in runs]
    traces = dict(t for r in runs if steps for t in [_step_trace(claim.event, r)] if t)
    k, n = sum(o.happened for _, o in outcomes), len(outcomes)
    lines = "; ".join(f"{r.label}: {'yes' if o.happened else 'no'} ({o.detail})"
                      for r, o in outcomes[:6])
    status = "held" if claim.test.holds(k / n) else "failed"
    if n < claim.test.min_runs:  # a share of one or two runs is one run's say
        status, lines = "undetermined", (f"judged among {n} run(s) with {what}; a share "
                                         f"needs at least {claim.test.min_runs}: {lines}")
    return judged(entry, ctx, status, ours=f"{k}/{n} runs",
                 test=f"share of runs with the event {claim.test.describe()}",
                 statistic=k / n, interval=stats.clopper_pearson(k, n),
                 n_found=sum(len(found[a]) for a in claim.arms),
                 n_required=sum(len(ctx.catalogue.specs(a, ctx.tier)) for a in claim.arms),
                 partial=ctx.allow_partial, detail=lines,
                 series={} if breakdown else {r.label: r.fosc() for r in runs}, steps=traces,
                 sgcs={r.label: r.sgcs() for r in runs} if with_sgcs else {},
                 line=None if breakdown or with_sgcs else _line(claim.event, runs[0], reference))


def _eligible(spec: Any, runs: list[RunEvidence]) -> tuple[list[RunEvidence], str]:
    """The runs an event is judged among, and what they have (for "no … run with …")."""
    if isinstance(spec, SquareLowest):
        return runs, "AutoAttack's breakdown"
    runs = [r for r in runs if r.fosc() is not None]
    if isinstance(spec, SgcsWithFosc):  # SGCS exists only where the run recorded it
        return [r for r in runs if r.sgcs() is not None], "FOSC and SGCS"
    if isinstance(spec, BatchCoupling | HealingSignature):  # App. G's, where it was monitored
        runs = [r for r in runs if r.spec.monitor.batch_metrics]
        what = "FOSC and App. G metrics (monitor.batch_metrics)"
        if isinstance(spec, BatchCoupling):
            return runs, what
        # §5.3: among the runs that healed
        return ([r for r in runs if events.healed_spikes(r.fosc(), _threshold(spec, r),
                                                         spec.within)],
                f"{what} that self-healed within {spec.within} epoch(s)")
    if isinstance(spec, SpikeDuration):  # Fig. 6: among the runs that spiked
        return ([r for r in runs if events.spikes(r.fosc(), _threshold(spec, r))],
                "FOSC rising above the threshold")
    return runs, "FOSC"


def _line(spec: Any, run: RunEvidence, reference: float | None) -> tuple[str, float]:
    if isinstance(spec, FoscSpike):
        return f"{spec.ratio:g}x the reference median", spec.ratio * reference
    return "FOSC threshold", _threshold(spec, run)


def _threshold(spec: Any, run: RunEvidence) -> float:
    """The event's own FOSC threshold, else the run's Algorithm 1 threshold."""
    return getattr(spec, "fosc_threshold", None) or run.spec.healing.fosc_threshold


def _reference_median(claim: Any, found: dict[str, list[RunEvidence]]) -> float | None:
    if not isinstance(claim.event, FoscSpike):
        return None
    arms = (claim.event.reference_arm,) if claim.event.reference_arm else claim.arms
    pool = subset([r for a in arms for r in found[a]], claim.event.reference_subset, claim.rule)
    values = [v for r in pool for v in (r.fosc() or [])]
    return statistics.median(values) if values else None


def _event_outcome(spec: Any, run: RunEvidence, reference: float | None) -> events.EventResult:
    fosc = run.fosc()
    threshold = _threshold(spec, run)
    if isinstance(spec, FoscSpike):
        pgd10 = [r.val_pgd10_acc for r in run.records]
        return events.fosc_spike(fosc, pgd10, reference, ratio=spec.ratio,
                                 pgd10_max_change=spec.pgd10_max_change)
    if isinstance(spec, GapDrop):
        gap = [r.train_gap for r in run.records]
        return events.gap_drop_at_spike(fosc, gap, threshold, min_drop=spec.min_drop,
                                        window=spec.window)
    if isinstance(spec, GapNegative):
        return events.gap_negative_after_spike(fosc, [r.train_gap for r in run.records],
                                               threshold)
    if isinstance(spec, SelfHealing):
        return events.self_healing(fosc, threshold, within=spec.within)
    if isinstance(spec, BatchCoupling):
        return _coupling(spec, run, threshold)
    if isinstance(spec, HealingSignature):
        return events.healing_signature(
            fosc, [r.train_clean_acc for r in run.records],
            [r.w_grad_norm for r in run.records], threshold, within=spec.within,
            near_zero=spec.near_zero)
    if isinstance(spec, SgcsWithFosc):
        return events.sgcs_falls_with_fosc(fosc, run.sgcs(), within_epochs=spec.within_epochs)
    if isinstance(spec, SquareLowest):
        return events.square_lowest(run.metric("square"),
                                    {name: run.metric(name) for name in WHITE_BOX},
                                    margin=spec.margin)
    if isinstance(spec, SpikePersists):
        return events.spike_duration_at_least(fosc, threshold, min_epochs=spec.min_epochs)
    assert isinstance(spec, SpikeDuration)
    return events.spike_duration_at_most(fosc, threshold, max_epochs=spec.max_epochs)


STEP_SERIES = ("w_grad_norm", "kl_norm", "ce_norm", "grad_cosine_similarity")


def _onset(spec: BatchCoupling, run: RunEvidence) -> tuple[int | None, list]:
    """Fig. 4's epoch, the first FOSC passes the threshold, and App. G's steps in it."""
    epoch = events.first_spike_epoch(run.fosc(), _threshold(spec, run))
    return epoch, (run.batches(epoch) if epoch is not None else [])


def _step_trace(spec: BatchCoupling, run: RunEvidence) -> tuple[str, dict] | None:
    """The run's App. G series at its first FOSC rise, for the report's Fig. 4 plot."""
    epoch, steps = _onset(spec, run)
    if not steps:
        return None
    return f"{run.label}, epoch {epoch}", {k: [getattr(b, k) for b in steps]
                                           for k in STEP_SERIES}


def _coupling(spec: BatchCoupling, run: RunEvidence, threshold: float) -> events.EventResult:
    """Fig. 4: App. G's step metrics in the first epoch FOSC passed the threshold."""
    epoch, steps = _onset(spec, run)
    if epoch is None:
        return events.EventResult(False, f"FOSC never above {threshold:g}")
    if not steps:
        return events.EventResult(False, f"no step records for epoch {epoch}")
    w = [b.w_grad_norm for b in steps]
    if spec.relation == "kl_with_w":
        result = events.kl_with_w(w, [b.kl_norm for b in steps], [b.ce_norm for b in steps],
                                  min_rho=spec.min_rho)
    else:
        result = events.cosine_against_w(w, [b.grad_cosine_similarity for b in steps],
                                         min_rho=spec.min_rho)
    return events.EventResult(result.happened, f"epoch {epoch}: {result.detail}")


def healing(entry: Entry, ctx: Context) -> Judgement:
    claim = entry.claim
    found, early = collect(entry, ctx, claim.arm_names(), needs=needs_of(claim))
    if early:
        return early
    base = {r.spec.seed: r for r in found[claim.arms.baseline]}
    fixed = {r.spec.seed: r for r in found[claim.arms.fixed]}
    unstable = [s for s, r in base.items() if r.flagged(claim.rule) and s in fixed]
    regular = [r.metric("clean") for r in base.values() if r.flagged(claim.rule) is False]
    if not unstable or not regular:
        return judged(entry, ctx, "undetermined", n_found=len(base) + len(fixed), detail=(
            "no baseline run was flagged: nothing to heal" if not unstable
            else "no regular baseline run to compare clean accuracy with"))
    still = sum(bool(fixed[s].flagged(claim.rule)) for s in unstable)
    cleans = [fixed[s].metric("clean") for s in unstable]
    if why := _not_finite(cleans + regular, "clean accuracy"):
        return judged(entry, ctx, "undetermined", n_found=len(base) + len(fixed), detail=why)
    fixed_clean = stats.mean_sd(cleans)[0]
    regular_clean = stats.mean_sd(regular)[0]
    diff = fixed_clean - regular_clean
    held = still <= claim.test.max_fixed_flagged and _within(diff, claim.test.clean_tolerance)
    return judged(entry, ctx, "held" if held else "failed", partial=ctx.allow_partial,
                 ours=f"{still}/{len(unstable)} fixed flagged; clean {diff:+.4f} vs regular",
                 test=f"fixed flagged ≤ {claim.test.max_fixed_flagged}, |clean − regular| ≤ "
                      f"{claim.test.clean_tolerance:g}", statistic=diff,
                 n_found=len(base) + len(fixed), detail=(
                     f"seeds flagged without Algorithm 1: {sorted(unstable)}; fixed clean "
                     f"{fixed_clean:.4f}, regular clean {regular_clean:.4f}"))


def property_claim(entry: Entry, ctx: Context) -> Judgement:
    outcome = ctx.evidence.property_outcome(entry.id)
    if outcome is None:
        return judged(entry, ctx, "not run", n_required=1, detail="property test not run")
    said = outcome.get("outcome", "?")
    ran = f"ran {outcome.get('finished', '?')} at git {str(outcome.get('git_sha'))[:10]}"
    if entry.claim.test.shows == "counterexample":
        # a pinned counterexample that still holds refutes the statement; one that no longer
        # does (the code changed) proves nothing either way
        status = {"passed": "failed"}.get(said, "undetermined")
        ours = "counterexample found" if said == "passed" else f"counterexample {said}"
        return judged(entry, ctx, status, ours=ours,
                     test=f"pytest {entry.claim.test.node} (a counterexample)",
                     n_required=1, n_found=1, detail=ran)
    # only a pass or a fail decides; skipped, not collected, timed out or a pytest error
    # says nothing about the property (exit 3, not 1)
    status = {"passed": "held", "failed": "failed"}.get(said, "undetermined")
    return judged(entry, ctx, status, ours=said, test=f"pytest {entry.claim.test.node}",
                 n_required=1, n_found=1, detail=ran)


JUDGES: dict[str, Callable[[Entry, Context], Judgement]] = {
    "table_cell": table_cell, "instability_rate": instability_rate, "trend": trend,
    "event": event, "healing": healing, "property": property_claim,
}
