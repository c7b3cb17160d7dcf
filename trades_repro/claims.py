"""The paper's claims as data: typed, validated once, resolved to the runs they need.

`claims/arms.yaml` names every experimental *arm* (one configuration, a spec per tier and a
seed count); each `claims/<artefact>.yaml` lists the claims of one paper artefact (a table,
a figure, a section). A claim has a stable id, its source, the paper's numbers verbatim, the
arm(s) it needs, a test with its parameters and a one-sentence rationale, and the masking
rule version it depends on. Kinds (discriminated on ``kind``): `table_cell`,
`instability_rate`, `trend`, `event`, `healing`, `property`. `verify.py` judges them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from trades_repro import yamlio
from trades_repro.errors import BadInput
from trades_repro.spec import ExperimentSpec, SpecError, Sweep, validation_message

# instant: CPU, minutes (CI); cpu: CPU, under an hour on 2 cores (Fashion-MNIST analogues of
# the paper's directions, issue 19); reduced / full: one GPU / the paper's protocol
Tier = Literal["instant", "cpu", "reduced", "full"]
TIERS: tuple[str, ...] = ("instant", "cpu", "reduced", "full")
ARMS_FILE = "arms.yaml"
# pgd10 … autoattack: eval.json's attacks; gap: PGD-10 − AutoAttack (Tables 3, 5, 6, 7);
# square_gap: PGD-10 − Square (Table 2's rule, as a number); roughness: Fig. 1's landscape
Metric = Literal["clean", "pgd10", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack", "gap",
                 "square_gap", "roughness"]
Subset = Literal["all", "flagged", "regular"]
Policy = Literal["best_pgd10", "best_pgd10_fosc_ok"]
ID_PATTERN = r"^[a-z0-9_]+(\.[a-z0-9_\-]+)+$"


class ClaimsError(BadInput):
    """A claims or arms file that cannot be used; one line naming the file and claim id."""


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


class ClopperPearsonTest(_Frozen):
    name: Literal["clopper_pearson"]
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95


class TrendTest(_Frozen):
    name: Literal["fisher", "linear_by_linear", "welch_one_sided"]
    alpha: Alpha = 0.05


class RateAtLeast(_Frozen):
    name: Literal["rate_at_least"]
    min_rate: Annotated[float, Field(gt=0, le=1)]  # share of judged runs showing the event


class HealingTest(_Frozen):
    name: Literal["healing"]
    max_fixed_flagged: Annotated[int, Field(ge=0)] = 0  # fixed runs still flagged
    clean_tolerance: Annotated[float, Field(gt=0)]  # |fixed − regular| clean accuracy


class PytestNode(_Frozen):
    name: Literal["pytest"]
    node: Annotated[str, Field(pattern=r"^tests/[\w/]+\.py::\w+$")]  # module-level tests only


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
        return self


class InstabilityRate(_Claim):
    kind: Literal["instability_rate"]
    arm: str
    expected: Rate
    test: ClopperPearsonTest

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


class SelfHealing(_Frozen):
    """Fig. 5 / Sec. 5.3: FOSC above the threshold, then back below it within `within`
    epochs, in a run without Algorithm 1."""

    name: Literal["self_healing"]
    within: Annotated[int, Field(ge=1)]
    fosc_threshold: Annotated[float, Field(gt=0)] | None = None


class SpikeDuration(_Frozen):
    """Fig. 6/7: every stretch of epochs with FOSC above the threshold lasts ≤ `max_epochs`."""

    name: Literal["spike_duration_at_most"]
    max_epochs: Annotated[int, Field(ge=1)]
    fosc_threshold: Annotated[float, Field(gt=0)] | None = None


class BatchCoupling(_Frozen):
    """Fig. 4 / §5.2, over App. G's steps of the first epoch validation FOSC passes the
    threshold (needs `monitor.batch_metrics`). `kl_with_w`: KL_norm spikes with W_grad_norm
    (Spearman ρ ≥ `min_rho`) while CE_norm stays steadier than KL_norm (smaller coefficient
    of variation); `cosine_against_w`: the before/after gradient cosine falls where
    W_grad_norm rises (ρ ≤ −`min_rho`)."""

    name: Literal["batch_gradient_coupling"]
    relation: Literal["kl_with_w", "cosine_against_w"]
    min_rho: Annotated[float, Field(gt=0, lt=1)]
    fosc_threshold: Annotated[float, Field(gt=0)] | None = None


EventSpec = Annotated[FoscSpike | GapDrop | SelfHealing | SpikeDuration | BatchCoupling,
                      Field(discriminator="name")]


class Event(_Claim):
    kind: Literal["event"]
    arms: Annotated[tuple[str, ...], Field(min_length=1)]
    subset: Subset = "all"
    event: EventSpec
    test: RateAtLeast

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
_CLAIM = TypeAdapter(Claim)
_ARMS = TypeAdapter(dict[str, Arm])


class ClaimsFile(_Frozen):
    artefact: str
    title: str
    claims: list[dict[str, Any]] = Field(min_length=1)  # validated one by one (ids in errors)


@dataclass(frozen=True)
class Entry:
    """A validated claim with the file it came from."""

    claim: Any  # one of the Claim kinds
    file: Path

    @property
    def id(self) -> str:
        return self.claim.id

    @property
    def artefact(self) -> str:
        return self.claim.source.artefact


@dataclass(frozen=True)
class Catalogue:
    """Every claim of a claims folder, with the arms they resolve to."""

    folder: Path
    arms: dict[str, Arm]
    entries: tuple[Entry, ...]
    titles: dict[str, str]  # artefact -> title

    def select(self, patterns: list[str] | None = None, tier: str | None = None) -> list[Entry]:
        """Claims whose id matches any glob pattern (``all`` or none: every claim), and that
        the tier can run."""
        from fnmatch import fnmatchcase

        chosen = [e for e in self.entries if not patterns or "all" in patterns
                  or any(fnmatchcase(e.id, p) for p in patterns)]
        if tier is not None:
            chosen = [e for e in chosen if tier in self.tiers_of(e)]
        return chosen

    def tiers_of(self, entry: Entry) -> tuple[str, ...]:
        """Tiers in which every arm of the claim has a spec (a property claim: all)."""
        names = entry.claim.arm_names()
        return tuple(t for t in TIERS if all(t in self.arms[a].tiers for a in names))

    def specs(self, arm: str, tier: str) -> list[ExperimentSpec]:
        """The arm's specs at `tier`, one per seed (cached)."""
        return list(_expand(self.folder, arm, self.arms[arm].tiers[tier]))

    @cached_property
    def by_id(self) -> dict[str, Entry]:
        return {e.id: e for e in self.entries}


def load_catalogue(folder: str | Path = "claims") -> Catalogue:
    """Read `arms.yaml` and every other `*.yaml` in `folder`; any problem raises
    `ClaimsError` with the file and claim id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClaimsError(f"{folder}: claims folder not found (the repository's claims/: run "
                          "from the repository root, or pass it with --claims-dir)")
    arms = _load_arms(folder / ARMS_FILE)
    entries: list[Entry] = []
    titles: dict[str, str] = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name == ARMS_FILE:
            continue
        claims_file = _load_file(path)
        titles[claims_file.artefact] = claims_file.title
        entries.extend(_load_claims(path, claims_file, arms, folder))
    _check_unique(entries)
    return Catalogue(folder, arms, tuple(entries), titles)


def _read_yaml(path: Path) -> Any:
    try:
        return yamlio.load(path.read_text(), fast=True)
    except OSError as err:
        raise ClaimsError(f"{path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ClaimsError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None


def _load_arms(path: Path) -> dict[str, Arm]:
    raw = _read_yaml(path) if path.is_file() else None
    if not isinstance(raw, dict) or not isinstance(raw.get("arms"), dict):
        raise ClaimsError(f"{path}: needs a mapping 'arms' of arm name -> arm")
    try:
        return _ARMS.validate_python(raw["arms"])
    except ValidationError as err:
        raise ClaimsError(validation_message(err, f"{path}: arms")) from None


def _load_file(path: Path) -> ClaimsFile:
    raw = _read_yaml(path)
    try:
        claims_file = ClaimsFile.model_validate(raw)
    except ValidationError as err:
        raise ClaimsError(validation_message(err, str(path))) from None
    if claims_file.artefact != path.stem:
        raise ClaimsError(f"{path}: artefact '{claims_file.artefact}' must match the file name")
    return claims_file


def _load_claims(path: Path, claims_file: ClaimsFile, arms: dict[str, Arm],
                 folder: Path) -> list[Entry]:
    entries = []
    for index, raw in enumerate(claims_file.claims):
        name = raw.get("id", f"#{index + 1}") if isinstance(raw, dict) else f"#{index + 1}"
        where = f"{path}: claim '{name}'"
        try:
            claim = _CLAIM.validate_python(raw)
        except ValidationError as err:
            raise ClaimsError(validation_message(err, where)) from None
        if claim.source.artefact != claims_file.artefact:
            raise ClaimsError(f"{where}: source.artefact must be '{claims_file.artefact}'")
        _check_rule(claim, where)
        _check_arms(claim, arms, folder, where)
        entries.append(Entry(claim, path))
    return entries


def _check_rule(claim: Any, where: str) -> None:
    from trades_repro.verdict import VERDICT_RULES  # the named, versioned masking rules

    known = [rule.name for rule in VERDICT_RULES]
    if claim.rule is not None and claim.rule not in known:
        raise ClaimsError(f"{where}: unknown masking rule '{claim.rule}'; known: "
                          f"{', '.join(known)}")


def _check_arms(claim: Any, arms: dict[str, Arm], folder: Path, where: str) -> None:
    for name in claim.arm_names():
        if name not in arms:
            raise ClaimsError(f"{where}: unknown arm '{name}' (not in {folder / ARMS_FILE})")
        for tier, sweep in arms[name].tiers.items():
            try:
                _expand(folder, name, sweep)
            except SpecError as err:
                raise ClaimsError(f"{where}: arm '{name}' (tier {tier}) does not resolve to "
                                  f"a spec: {err}") from None
    if claim.kind == "healing":
        _check_same_seeds(claim, arms, where)


def _check_same_seeds(claim: Healing, arms: dict[str, Arm], where: str) -> None:
    base, fixed = arms[claim.arms.baseline], arms[claim.arms.fixed]
    for tier in set(base.tiers) & set(fixed.tiers):
        if base.tiers[tier].seed_list() != fixed.tiers[tier].seed_list():
            raise ClaimsError(f"{where}: tier {tier}: baseline and fixed arms need the same seeds")


_EXPANDED: dict[tuple[Path, str, str], tuple[ExperimentSpec, ...]] = {}


def _expand(folder: Path, name: str, sweep: Sweep) -> tuple[ExperimentSpec, ...]:
    key = (folder.resolve(), name, sweep.model_dump_json())
    if key not in _EXPANDED:
        _EXPANDED[key] = tuple(sweep.expand(folder))
    return _EXPANDED[key]


def _check_unique(entries: list[Entry]) -> None:
    seen: dict[str, Path] = {}
    for entry in entries:
        if entry.id in seen:
            raise ClaimsError(f"{entry.file}: claim '{entry.id}': duplicate id (also in "
                              f"{seen[entry.id]})")
        seen[entry.id] = entry.file
