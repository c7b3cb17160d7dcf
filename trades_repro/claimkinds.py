"""The claim schema: every kind of claim, its tests and events, as frozen pydantic models.

One claim per paper statement (`claims/<artefact>.yaml`), discriminated on ``kind``:
`table_cell`, `instability_rate`, `trend`, `event`, `healing`, `property`; an `Arm` is one
configuration of the paper, a one-cell sweep per tier. `claims.py` reads the files into a
`Catalogue`; `judges.py` judges each kind.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trades_repro.sweep import Sweep

# instant: CPU, minutes (CI); cpu: CPU, under an hour on 2 cores (Fashion-MNIST analogues of
# the paper's directions, issue 19); reduced / full: one GPU / the paper's protocol
Tier = Literal["instant", "cpu", "reduced", "full"]
TIERS: tuple[str, ...] = ("instant", "cpu", "reduced", "full")
# pgd10 … autoattack: eval.json's attacks; gap: PGD-10 − AutoAttack (Tables 3, 5, 6, 7);
# square_gap: PGD-10 − Square (Table 2's rule, as a number); roughness: Fig. 1's landscape
Metric = Literal["clean", "pgd10", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack", "gap",
                 "square_gap", "roughness"]
Subset = Literal["all", "flagged", "regular"]
Policy = Literal["best_pgd10", "best_pgd10_fosc_ok"]
ID_PATTERN = r"^[a-z0-9_]+(\.[a-z0-9_\-]+)+$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


Rationale = Annotated[str, Field(min_length=20)]  # one real sentence, not a placeholder
Alpha = Annotated[float, Field(gt=0, lt=0.5)]


class Arm(_Frozen):
    """One configuration of the paper, as a one-cell sweep per tier (no grid)."""

    label: str
    policy: Policy = "best_pgd10"  # which checkpoint is evaluated (App. B; Alg. 1 for healing)
    tiers: dict[Tier, Sweep] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_cell(self) -> Arm:
        for tier, sweep in self.tiers.items():
            if sweep.grid:
                raise ValueError(f"tier '{tier}': an arm is one configuration (no grid)")
        return self


class Source(_Frozen):
    artefact: str  # table_1 … table_7, figure_2 …, section_5_3, appendix_e, instant
    where: str  # the cell, panel or sentence


class Rate(_Frozen):
    k: Annotated[int, Field(ge=0)]
    n: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _k_le_n(self) -> Rate:
        if self.k > self.n:
            raise ValueError(f"k = {self.k} exceeds n = {self.n}")
        return self


class CellValue(_Frozen):
    mean: float
    sd: Annotated[float, Field(ge=0)] | None = None  # the "± x" the paper prints
    n: Annotated[int, Field(ge=1)] | None = None  # runs behind the mean, when stated


class ToleranceTest(_Frozen):
    name: Literal["tolerance"]
    abs: Annotated[float, Field(gt=0)]  # |ours − paper| ≤ abs holds


class WelchTest(_Frozen):
    name: Literal["welch"]
    alpha: Alpha = 0.05  # held unless the means differ at this level


class FisherExactTest(_Frozen):
    """Our k/n against the paper's K/N, both samples: held unless the two-sided Fisher exact
    test gives p < alpha ("ours inside the paper's exact interval" took ours as exact). Where
    no count of ours could reach p < alpha (3 runs against 3: p ≥ 0.1), undetermined."""

    name: Literal["fisher_exact"]
    alpha: Alpha = 0.05


class CountAtMost(_Frozen):
    """Our own expectation (values_from: ours) of a count, exact: held iff at most `k` of our
    runs are flagged. A paper's count is a sample, so only `fisher_exact` compares with it."""

    name: Literal["count_at_most"]
    k: Annotated[int, Field(ge=0)]


class TrendTest(_Frozen):
    name: Literal["fisher", "linear_by_linear", "welch_one_sided"]
    alpha: Alpha = 0.05


# An event's share is decided on at least this many judged runs (those its subset and event
# leave), fewer is undetermined: the paper's smallest samples (Tables 4, 5: n = 3) and the
# study's flagged-cell floor (FLAGGED_CELL_SEEDS); on 1 or 2 runs one run decides alone.
MIN_EVENT_RUNS = 3
MinRuns = Annotated[int, Field(ge=1)]


class RateAtLeast(_Frozen):
    name: Literal["rate_at_least"]
    min_rate: Annotated[float, Field(gt=0, le=1)]  # share of judged runs showing the event
    min_runs: MinRuns = MIN_EVENT_RUNS  # judged runs needed to decide (fewer: undetermined)

    def holds(self, rate: float) -> bool:
        return rate >= self.min_rate

    def describe(self) -> str:
        return f"≥ {self.min_rate:g}"


class RateAtMost(_Frozen):
    name: Literal["rate_at_most"]
    max_rate: Annotated[float, Field(ge=0, lt=1)]  # share of judged runs showing the event
    min_runs: MinRuns = MIN_EVENT_RUNS  # judged runs needed to decide (fewer: undetermined)

    def holds(self, rate: float) -> bool:
        return rate <= self.max_rate

    def describe(self) -> str:
        return f"≤ {self.max_rate:g}"


class HealingTest(_Frozen):
    name: Literal["healing"]
    max_fixed_flagged: Annotated[int, Field(ge=0)] = 0  # fixed runs still flagged
    clean_tolerance: Annotated[float, Field(gt=0)]  # |fixed − regular| clean accuracy


class PytestNode(_Frozen):
    name: Literal["pytest"]
    node: Annotated[str, Field(pattern=r"^tests/[\w/]+\.py::\w+$")]  # module-level tests only
    # "property": the node checks the statement, so its pass holds the claim. "counterexample":
    # the node pins a case where the statement is false, so its pass fails the claim (a
    # mathematical fact, settled by one case), and its fail decides nothing.
    shows: Literal["property", "counterexample"] = "property"


class _Claim(_Frozen):
    id: Annotated[str, Field(pattern=ID_PATTERN)]
    source: Source
    statement: str  # what the paper (or, for values_from: ours, we) claim
    values_from: Literal["paper", "ours"] = "paper"  # the tiers' numbers: the paper's or ours
    verbatim: str | None = None  # the paper's printed number(s), exactly as printed
    rule: str | None = None  # masking rule version (evaluate.VERDICT_RULES)
    rationale: Rationale  # why this test and these parameters

    def arm_names(self) -> tuple[str, ...]:
        return ()

    def needs_rule(self) -> bool:
        return False

    @model_validator(mode="after")
    def _rule_when_needed(self) -> _Claim:
        if self.needs_rule() and not self.rule:
            raise ValueError("this claim counts flagged runs: name its masking 'rule'")
        if self.values_from == "paper" and self.verbatim is None:
            raise ValueError("a paper claim needs 'verbatim': the number(s) as printed")
        return self


class TableCell(_Claim):
    kind: Literal["table_cell"]
    arm: str
    subset: Subset = "all"  # Table 1/3/6's Regular and Unstable rows split one arm's runs
    # Table 3's Fixed row "shares the same set of seeds as the Unstable case": keep only the
    # seeds whose run in this other arm is flagged
    seeds_flagged_in: str | None = None
    metric: Metric
    expected: CellValue
    test: Annotated[ToleranceTest | WelchTest, Field(discriminator="name")]

    def arm_names(self) -> tuple[str, ...]:
        return (self.arm,) + ((self.seeds_flagged_in,) if self.seeds_flagged_in else ())

    def needs_rule(self) -> bool:
        return self.subset != "all" or self.seeds_flagged_in is not None

    @model_validator(mode="after")
    def _welch_needs_spread(self) -> TableCell:
        if self.test.name == "welch" and (self.expected.sd is None or self.expected.n is None):
            raise ValueError("a Welch test needs the paper's sd and n in 'expected'")
        if self.test.name == "welch" and self.expected.n < 2:  # Welch's df divides by n − 1
            raise ValueError("a Welch test needs the paper's n >= 2 in 'expected'")
        return self


class InstabilityRate(_Claim):
    kind: Literal["instability_rate"]
    arm: str
    expected: Rate
    test: Annotated[FisherExactTest | CountAtMost, Field(discriminator="name")]

    @model_validator(mode="after")
    def _exact_counts_are_ours(self) -> InstabilityRate:
        if self.test.name == "count_at_most" and self.values_from != "ours":
            raise ValueError("test count_at_most bounds our own count (values_from: ours); "
                             "a paper's count is a sample: use fisher_exact")
        return self

    def arm_names(self) -> tuple[str, ...]:
        return (self.arm,)

    def needs_rule(self) -> bool:
        return True


class Trend(_Claim):
    kind: Literal["trend"]
    arms: Annotated[tuple[str, ...], Field(min_length=2)]  # in the claimed increasing order
    # one per arm: which of its runs count; Fig. 1 compares one arm's regular and flagged runs
    subsets: tuple[Subset, ...] | None = None
    measure: Literal["flagged"] | Metric = "flagged"
    direction: Literal["increasing", "not_decreasing"] = "increasing"
    expected: tuple[Rate, ...] | None = None  # the paper's counts per arm, for the report
    test: TrendTest

    def arm_names(self) -> tuple[str, ...]:
        return self.arms

    def needs_rule(self) -> bool:
        return self.measure == "flagged" or any(s != "all" for s in self.subsets or ())

    def groups(self) -> tuple[tuple[str, Subset], ...]:
        """(arm, subset) per compared group, in the claimed increasing order."""
        return tuple(zip(self.arms, self.subsets or ("all",) * len(self.arms), strict=True))

    @model_validator(mode="after")
    def _test_fits(self) -> Trend:
        if self.subsets is not None and len(self.subsets) != len(self.arms):
            raise ValueError("'subsets' needs one subset per arm")
        if len(set(self.groups())) != len(self.arms):
            raise ValueError("the same arm and subset twice: a group would face itself")
        if self.measure == "flagged" and self.subsets is not None:
            raise ValueError("flagged counts compare whole arms: drop 'subsets'")
        two = len(self.arms) == 2
        if self.test.name in ("fisher", "welch_one_sided") and not two:
            raise ValueError(f"test '{self.test.name}' compares exactly two arms")
        if (self.test.name == "welch_one_sided") == (self.measure == "flagged"):
            raise ValueError("flagged counts take fisher/linear_by_linear; metrics welch_one_sided")
        if self.expected is not None and len(self.expected) != len(self.arms):
            raise ValueError("'expected' needs one k/n per arm")
        return self


class FoscSpike(_Frozen):
    """Fig. 2/7: a run's peak FOSC ≥ `ratio` × the reference runs' median FOSC, while
    PGD-10 moves by ≤ `pgd10_max_change` from the epoch before the peak."""

    name: Literal["fosc_spike"]
    ratio: Annotated[float, Field(gt=1)]
    pgd10_max_change: Annotated[float, Field(gt=0)]
    reference_arm: str | None = None  # None: the claim's own arm(s)
    reference_subset: Subset = "regular"


class GapDrop(_Frozen):
    """Fig. 3: at the first epoch FOSC passes the threshold, the train clean − TPGD gap is
    at least `min_drop` below its mean over the `window` epochs before."""

    name: Literal["gap_drop_at_spike"]
    min_drop: Annotated[float, Field(gt=0)]
    window: Annotated[int, Field(ge=1)] = 5
    fosc_threshold: Annotated[float, Field(gt=0)] | None = None  # None: the spec's healing one


class GapNegative(_Frozen):
    """§5.1 on Fig. 3: from the first epoch FOSC passes the threshold on, the train clean −
    TPGD gap turns negative in some epoch (TPGD's examples classified better than clean)."""

    name: Literal["gap_negative_after_spike"]
    fosc_threshold: Annotated[float, Field(gt=0)] | None = None  # None: the spec's healing one


class SelfHealing(_Frozen):
    """Fig. 5 / Sec. 5.3: FOSC above the threshold, then back below it within `within`
    epochs, in a run without Algorithm 1."""

    name: Literal["self_healing"]
    within: Annotated[int, Field(ge=1)]
    fosc_threshold: Annotated[float, Field(gt=0)] | None = None


class HealingSignature(_Frozen):
    """§5.3 / Fig. 5: in a run that self-heals (FOSC back below the threshold within
    `within` epochs), the epoch FOSC falls back shows a dip in clean training accuracy and
    FOSC at most `near_zero` × the threshold, and the next epoch's mean W_grad_norm is lower.
    Judged among the runs that self-healed; needs `monitor.batch_metrics`."""

    name: Literal["healing_signature"]
    within: Annotated[int, Field(ge=1)]
    near_zero: Annotated[float, Field(gt=0, le=1)]
    fosc_threshold: Annotated[float, Field(gt=0)] | None = None


class SpikePersists(_Frozen):
    """Fig. 6's unstable baseline (§6): without Algorithm 1 FOSC, once it rises, stays above
    the threshold ("continually high") for at least `min_epochs` consecutive epochs. A run
    whose FOSC never rises counts as not showing it."""

    name: Literal["spike_duration_at_least"]
    min_epochs: Annotated[int, Field(ge=2)]
    fosc_threshold: Annotated[float, Field(gt=0)] | None = None


class SpikeDuration(_Frozen):
    """Fig. 6/7: every FOSC spike (a rise above the threshold) lasts ≤ `max_epochs`; judged
    among the runs with a spike (a run without one shows nothing)."""

    name: Literal["spike_duration_at_most"]
    max_epochs: Annotated[int, Field(ge=1)]
    fosc_threshold: Annotated[float, Field(gt=0)] | None = None


class SgcsWithFosc(_Frozen):
    """Fig. 2 / §4.2: FOSC and SGCS change sharply "simultaneously": the epoch of SGCS's
    largest one-epoch fall is within `within_epochs` of the epoch of FOSC's largest one-epoch
    rise (SGCS falls as masking grows, Sec. 3.2). Scale-free: no size is asked of either."""

    name: Literal["sgcs_falls_with_fosc"]
    within_epochs: Annotated[int, Field(ge=0)] = 0


WHITE_BOX = ("apgd-ce", "apgd-t", "fab-t")  # AutoAttack's white-box attacks (Table 1)


class SquareLowest(_Frozen):
    """Table 1 / §4.1: in the run's AutoAttack breakdown the black-box Square attack leaves
    the lowest accuracy, at least `margin` below each white-box attack's (APGD-CE, APGD-T,
    FAB-T): Square is "the main contributor" to AutoAttack's lower number. Reads eval.json,
    not the epoch series."""

    name: Literal["square_lowest"]
    margin: Annotated[float, Field(ge=0, lt=1)] = 0.0


class BatchCoupling(_Frozen):
    """Fig. 4 / §5.2, over App. G's steps of the first epoch validation FOSC passes the
    threshold (needs `monitor.batch_metrics`). `kl_with_w`: W_grad_norm's spikes are KL_norm's,
    not CE_norm's (Spearman ρ(W_grad_norm, KL_norm) ≥ `min_rho` and above ρ(W_grad_norm,
    CE_norm)); `cosine_against_w`: the before/after gradient cosine falls where W_grad_norm
    rises (ρ ≤ −`min_rho`)."""

    name: Literal["batch_gradient_coupling"]
    relation: Literal["kl_with_w", "cosine_against_w"]
    min_rho: Annotated[float, Field(gt=0, lt=1)]
    fosc_threshold: Annotated[float, Field(gt=0)] | None = None


EventSpec = Annotated[FoscSpike | GapDrop | GapNegative | SelfHealing | HealingSignature
                      | SpikeDuration | SpikePersists | BatchCoupling | SquareLowest
                      | SgcsWithFosc,
                      Field(discriminator="name")]


class Event(_Claim):
    kind: Literal["event"]
    arms: Annotated[tuple[str, ...], Field(min_length=1)]
    subset: Subset = "all"
    event: EventSpec
    test: Annotated[RateAtLeast | RateAtMost, Field(discriminator="name")]

    def arm_names(self) -> tuple[str, ...]:
        ref = getattr(self.event, "reference_arm", None)
        return self.arms + ((ref,) if ref and ref not in self.arms else ())

    def needs_rule(self) -> bool:
        return self.subset != "all" or isinstance(self.event, FoscSpike)


class HealingArms(_Frozen):
    baseline: str  # TRADES without Algorithm 1
    fixed: str  # the same seeds with Algorithm 1


class Healing(_Claim):
    kind: Literal["healing"]
    arms: HealingArms
    expected: dict[str, CellValue] = {}  # Table 3's rows, for the report
    test: HealingTest

    def arm_names(self) -> tuple[str, ...]:
        return (self.arms.baseline, self.arms.fixed)

    def needs_rule(self) -> bool:
        return True


class Property(_Claim):
    kind: Literal["property"]
    test: PytestNode


Claim = Annotated[TableCell | InstabilityRate | Trend | Event | Healing | Property,
                  Field(discriminator="kind")]
