"""Judging claims against evidence: run folders in, one `Judgement` per claim out.

A claim's arms resolve to specs (per tier); each spec's run is found by its *digest* (read
from the run's own `spec.json`, never from the folder name), and counts once it finished
training and, where the claim needs attacks, evaluation of the arm's checkpoint policy.
A run file that cannot be read, or a spec.json edited away from its folder's digest, is
bad input (exit 2, naming the file), never skipped. Nothing here trains or attacks:
verification reads evidence only.

Statuses: ``held`` / ``failed`` (the test said so), ``undetermined`` (evidence complete but
the claim cannot be applied, e.g. no flagged run to average), ``incomplete`` (k of n seeds
finished; judged anyway only with ``allow_partial``, and then marked partial), ``not run``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from trades_repro import store
from trades_repro.claims import Catalogue, Entry
from trades_repro.spec import ExperimentSpec

Status = Literal["held", "failed", "undetermined", "incomplete", "not run"]
PROPERTIES_DIR = "_properties"  # runs/_properties/<claim id>.json: a property test's outcome


class Judgement(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    artefact: str
    kind: str
    tier: str
    status: Status
    paper: str  # the expected value(s), formatted; "(ours)" marks values_from: ours
    ours: str = "—"
    test: str = ""
    statistic: float | None = None
    p_value: float | None = None
    interval: tuple[float, float] | None = None
    detail: str = ""
    n_required: int = 0
    n_found: int = 0
    partial: bool = False
    series: dict[str, list[float]] = {}  # event claims: FOSC per epoch of each judged run
    line: tuple[str, float] | None = None  # event claims: the FOSC level they compare with
    sgcs: dict[str, list[float]] = {}  # Fig. 2's event: SGCS per epoch, beside `series`
    # Fig. 4's claims: App. G's series over the steps of the epoch each run was judged at,
    # keyed "<run label>, epoch <e>"
    steps: dict[str, dict[str, list[float]]] = {}

    def message(self) -> str:
        """One line for pytest and logs: paper, ours, test, statistic and p-value."""
        numbers = []
        if self.statistic is not None:
            numbers.append(f"statistic {self.statistic:.4g}")
        if self.p_value is not None:
            numbers.append(f"p = {self.p_value:.3g}")
        if self.interval is not None:
            numbers.append(f"interval [{self.interval[0]:.3f}, {self.interval[1]:.3f}]")
        tail = f" ({', '.join(numbers)})" if numbers else ""
        if self.status in ("not run", "incomplete"):
            return f"{self.id}: {self.status}: {self.detail} (paper {self.paper})"
        return (f"{self.id}: {self.status}: paper {self.paper}, ours {self.ours}; "
                f"{self.test}{tail}. {self.detail}").strip()


# ----------------------------------------------------------------------------- evidence


@dataclass(frozen=True)
class RunEvidence:
    digest: str
    folder: Path
    spec: ExperimentSpec
    records: tuple[store.EpochRecord, ...]
    evaluation: Any | None  # evaluate.CheckpointEval of the policy's checkpoint
    # batches.jsonl, read once per run (a CIFAR run's holds 39,000 steps)
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"seed {self.spec.seed} ({self.digest[:8]})"

    def metric(self, name: str) -> float | None:
        """A Table column for this run, from eval.json; None when not evaluated."""
        if self.evaluation is None:
            return None
        if name == "clean":
            return self.evaluation.clean.accuracy if self.evaluation.clean else None
        if name == "roughness":
            return self.evaluation.landscape.roughness if self.has_landscape() else None
        if name in ("gap", "square_gap"):
            pgd10 = self.metric("pgd10")
            other = self.metric("autoattack" if name == "gap" else "square")
            return None if pgd10 is None or other is None else pgd10 - other
        result = self.evaluation.attacks.get(name)
        return None if result is None else result.accuracy

    def flagged(self, rule_name: str) -> bool | None:
        """The masking rule applied afresh to this run's per-attack results."""
        from trades_repro.verdict import VERDICT_RULES, apply_rule

        if self.evaluation is None:
            return None
        rule = next(r for r in VERDICT_RULES if r.name == rule_name)
        record = self.evaluation
        return apply_rule(rule, record.attacks, record.clean, record.flags).flagged

    def has(self, needs: frozenset[str]) -> bool:
        """Whether the evaluation holds every result in `needs` ("clean", "landscape" or
        attack names)."""
        if self.evaluation is None:
            return not needs
        have = set(self.evaluation.attacks) | ({"clean"} if self.evaluation.clean else set())
        return needs <= have | ({"landscape"} if self.has_landscape() else set())

    def has_landscape(self) -> bool:
        """A landscape over the arm's radius (records made before the radius followed the
        validation ε hold one over ±8/255 whatever the threat model: not this arm's)."""
        return self.evaluation is not None and _spans(self.evaluation.landscape,
                                                      self.spec.landscape().radius)

    def batches(self, epoch: int) -> list[store.BatchRecord]:
        """App. G's per-step records of `epoch` (empty unless the run monitored them)."""
        if "steps" not in self._cache:
            self._cache["steps"] = store.read_batches(self.folder)
        return self._cache["steps"].get(epoch, [])

    def fosc(self) -> list[float] | None:
        return self._series("val_fosc")

    def sgcs(self) -> list[float] | None:
        return self._series("val_sgcs")

    def _series(self, key: str) -> list[float] | None:
        values = [getattr(r, key) for r in self.records]
        return None if not values or any(v is None for v in values) else values


@dataclass
class Evidence:
    """The finished runs under `runs_dir`, indexed by the digest of their own spec.json."""

    runs_dir: Path
    _index: dict[str, Path] | None = field(default=None, repr=False)

    def index(self) -> dict[str, Path]:
        if self._index is None:
            self._index = {}
            for spec_file in sorted(self.runs_dir.glob(f"*/{store.SPEC_FILE}")):
                digest = store.run_digest(spec_file)  # exit 2 when torn or edited
                if digest and store.is_finished(spec_file.parent):
                    self._index.setdefault(digest, spec_file.parent)
        return self._index

    def run(self, spec: ExperimentSpec, policy: str) -> RunEvidence | None:
        folder = self.index().get(spec.digest())
        if folder is None:
            return None
        return RunEvidence(spec.digest(), folder, spec, tuple(store.read_metrics(folder)),
                           policy_record(folder, policy, spec.evaluation,
                                         spec.landscape().radius))

    def property_outcome(self, claim_id: str) -> dict[str, Any] | None:
        path = self.runs_dir / PROPERTIES_DIR / f"{claim_id}.json"
        return store.read_json(path) if path.is_file() else None


def policy_record(folder: Path, policy: str, evaluation: Any,
                  radius: float | None = None) -> Any | None:
    """The policy checkpoint's record made with the arm's evaluation settings
    (`evalfile.made_with`), the one with the most attacks when several; among those, one
    whose landscape spans `radius` (a run evaluated again after the landscape radius came
    to follow ε holds an old record over ±8/255 and a new one)."""
    from trades_repro.evalfile import made_with, read_eval

    evals = read_eval(folder / store.EVAL_FILE)  # EvalFileError (exit 2) when not one
    if evals is None:
        return None
    chosen = [r for r in evals.checkpoints.values()
              if policy in r.policies and made_with(r, evaluation)]
    return max(chosen, key=lambda r: (len(r.attacks), _spans(r.landscape, radius)),
               default=None)


def _spans(landscape: Any, radius: float | None) -> bool:
    return landscape is not None and radius is not None and abs(landscape.radius - radius) < 1e-12


# ----------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Context:
    catalogue: Catalogue
    evidence: Evidence
    tier: str
    allow_partial: bool = False


def judge(entry: Entry, ctx: Context) -> Judgement:
    """Judge one claim at `ctx.tier`; see the module docstring for the statuses."""
    from trades_repro.judges import JUDGES

    claim = entry.claim
    if ctx.tier not in ctx.catalogue.tiers_of(entry):
        return judged(entry, ctx, "not run", detail=f"no '{ctx.tier}' tier for this claim")
    return JUDGES[claim.kind](entry, ctx)


def judge_all(entries: list[Entry], ctx: Context) -> list[Judgement]:
    return [judge(entry, ctx) for entry in entries]


def judged(entry: Entry, ctx: Context, status: Status, **fields: Any) -> Judgement:
    claim = entry.claim
    paper = fields.pop("paper", None) or format_expected(claim)
    return Judgement(id=claim.id, artefact=claim.source.artefact, kind=claim.kind,
                     tier=ctx.tier, status=status, paper=paper, **fields)


def collect(entry: Entry, ctx: Context, arms: tuple[str, ...], *,
            needs: frozenset[str] = frozenset()) -> tuple[dict[str, list[RunEvidence]],
                                                          Judgement | None]:
    """The finished runs of each arm whose evaluation holds the results in `needs`; or,
    when seeds are missing, the 'not run' / 'incomplete' judgement to return instead (unless
    partial judging was asked for)."""
    found: dict[str, list[RunEvidence]] = {}
    required = have = lacking = 0
    for arm in dict.fromkeys(arms):
        specs = ctx.catalogue.specs(arm, ctx.tier)
        policy = ctx.catalogue.arms[arm].policy
        runs = [r for r in (ctx.evidence.run(spec, policy) for spec in specs) if r is not None]
        found[arm] = [r for r in runs if r.has(needs)]
        required, have = required + len(specs), have + len(found[arm])
        lacking += len(runs) - len(found[arm])
    why = (f" with {', '.join(sorted(needs))} evaluated ({lacking} finished without)"
           if lacking else "")
    if have == 0:
        return found, judged(entry, ctx, "not run", n_required=required,
                            detail=f"0 of {required} runs finished{why}")
    if have < required and not ctx.allow_partial:
        return found, judged(entry, ctx, "incomplete", n_required=required, n_found=have,
                            detail=f"incomplete ({have} of {required} seeds){why}")
    return found, None


def needed(claim: Any, metrics: tuple[str, ...] = ()) -> frozenset[str]:
    """The evaluation results a claim reads: its metrics' attacks and its rule's two."""
    from trades_repro.verdict import VERDICT_RULES

    parts = {"gap": ("pgd10", "autoattack"), "square_gap": ("pgd10", "square"),
             "roughness": ("landscape",)}
    names = {a for m in metrics for a in parts.get(m, (m,))}
    if claim.needs_rule():
        rule = next(r for r in VERDICT_RULES if r.name == claim.rule)
        names |= {"pgd10", rule.attack}
    return frozenset(names)


def subset(runs: list[RunEvidence], which: str, rule: str | None) -> list[RunEvidence]:
    if which == "all":
        return runs
    want = which == "flagged"
    return [r for r in runs if r.flagged(rule) is want]


def format_expected(claim: Any) -> str:
    mark = " (ours)" if claim.values_from == "ours" else ""
    expected = getattr(claim, "expected", None)
    if claim.kind == "property":
        return "holds" + mark
    if claim.kind == "trend":
        counts = ", ".join(fmt_rate(r.k, r.n) for r in expected or ())
        return (f"{counts} ({claim.direction})" if counts else claim.direction) + mark
    if claim.kind == "event":
        return f"rate {claim.test.describe()}" + mark
    if claim.kind == "healing":
        return "fixed not flagged, clean as regular" + mark
    if claim.kind == "instability_rate":
        return fmt_rate(expected.k, expected.n) + mark
    return fmt_cell(expected.mean, expected.sd, expected.n) + mark


def fmt_rate(k: int, n: int) -> str:
    return f"{k}/{n}"


def fmt_cell(mean: float, sd: float | None = None, n: int | None = None) -> str:
    text = f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")
    return text + (f" (n = {n})" if n is not None else "")

