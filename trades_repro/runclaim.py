"""`run-claim`: the runs behind a set of claims, planned, costed, trained and evaluated.

Arms resolve to specs; specs shared by several claims run once (by digest). Finished runs
are skipped, partial runs resume (`train` does both), evaluation resumes per attack, failed
runs wait for `retry_failed`, and runs another launch has (a live holder of the lock, or a
SLURM job still queued or running for it) are left to it. An executor (`executors.py`:
inline, local processes, SLURM) runs them, each under its run folder's lock; `property`
claims run their pytest nodes in one subprocess alongside the runs and leave their outcome
in ``runs/_properties/``. Nothing is judged here: the CLI calls `verify` afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from trades_repro import runlock, store, yamlio
from trades_repro.claims import Catalogue, Entry
from trades_repro.errors import BadInput, Inconclusive
from trades_repro.executors import Executor, Inline, RunJob, failure, read_job
from trades_repro.spec import ExperimentSpec
from trades_repro.verify import PROPERTIES_DIR

PROJECT = Path(__file__).resolve().parents[1]  # property nodes are paths from here (tests/…)
COSTS_FILE = PROJECT / "spec" / "costs.yaml"
PROPERTY_TIMEOUT_S = 1800  # all property tests together; about 2 minutes on one core
GPU_TIERS = ("reduced", "full")  # ResNet-18 on CIFAR/TinyImageNet: never a silent CPU crawl
Report = Callable[[str], None]
DeviceKind = Literal["cpu", "h100"]  # the cost table's columns
DEVICE_KINDS: tuple[str, ...] = get_args(DeviceKind)
State = Literal["done", "evaluate", "resume", "train", "failed", "running", "queued"]
ELSEWHERE = ("running", "queued")  # another launch has the run: a live lock, a SLURM job


class Cost(BaseModel):
    """Seconds per training epoch and per final evaluation, for one model × data × device."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str
    dataset: str
    device: DeviceKind
    epoch_seconds: Annotated[float, Field(gt=0)]  # one epoch of the full training set
    eval_seconds: Annotated[float, Field(ge=0)]  # the spec's final evaluation
    source: str  # measured (command, date) or estimated (how)


@dataclass(frozen=True)
class PlannedRun:
    spec: ExperimentSpec
    arms: tuple[str, ...]
    state: State
    policies: tuple[str, ...] = ("best_pgd10",)  # the checkpoints its arms evaluate
    elsewhere: str = ""  # running or queued: who has it ("node3 pid 12, job 77_1")

    @property
    def digest(self) -> str:
        return self.spec.digest()


def plan(catalogue: Catalogue, entries: list[Entry], tier: str,
         runs_dir: Path) -> list[PlannedRun]:
    """Every distinct spec the claims need at `tier`, with what remains to do for it."""
    arms_of: dict[str, list[str]] = {}
    specs: dict[str, ExperimentSpec] = {}
    for entry in entries:
        for arm in entry.claim.arm_names():
            for spec in catalogue.specs(arm, tier):
                specs.setdefault(spec.digest(), spec)
                if arm not in arms_of.setdefault(spec.digest(), []):
                    arms_of[spec.digest()].append(arm)
    slurm = _slurm_jobs([store.run_dir_for(s, runs_dir) for s in specs.values()])
    runs = []
    for digest, spec in specs.items():
        policies = tuple(dict.fromkeys(catalogue.arms[a].policy for a in arms_of[digest]))
        state, who = assess(spec, runs_dir, policies, slurm)
        runs.append(PlannedRun(spec, tuple(arms_of[digest]), state, policies, who))
    return runs


def run_state(spec: ExperimentSpec, runs_dir: Path, policies: tuple[str, ...],
              slurm: Mapping[str, str] | None = None) -> State:
    return assess(spec, runs_dir, policies, slurm)[0]


def assess(spec: ExperimentSpec, runs_dir: Path, policies: tuple[str, ...],
           slurm: Mapping[str, str] | None = None) -> tuple[State, str]:
    """The run's state, and for a run another launch has, who (`elsewhere`). `slurm`: job
    states from one squeue for many runs (`plan`)."""
    run_dir = store.run_dir_for(spec, runs_dir)
    if run_dir.exists() and not run_dir.is_dir():  # train would crash on it (exit 4)
        raise BadInput(f"{run_dir} is a file, not a run folder: move it out of the runs "
                       "folder")
    finished = store.is_finished(run_dir)
    if finished and is_evaluated(run_dir, spec, policies):
        return "done", ""
    if other := elsewhere(run_dir, slurm):
        return other
    if failure(run_dir) is not None:
        return "failed", ""
    if finished:
        return "evaluate", ""
    return ("resume" if (run_dir / store.LAST_FILE).exists() else "train"), ""


def elsewhere(run_dir: Path, slurm: Mapping[str, str] | None = None
              ) -> tuple[State, str] | None:
    """("running", holder) while a live process holds the run's lock; ("queued", job) while
    the SLURM job its job.json names is still alive (pending, or starting); else None."""
    holder = runlock.read(run_dir)
    if holder is not None and runlock.stale_reason(holder, run_dir, slurm=slurm) is None:
        return "running", holder.describe()
    job = _slurm_job(run_dir)
    state = runlock.slurm_state(job, slurm) if job else None
    if state in runlock.SLURM_ALIVE:
        return "queued", f"SLURM job {job} ({state})"
    return None


def _slurm_job(run_dir: Path) -> str | None:
    """The SLURM job job.json names (a local one's id is a pid: nothing to ask squeue)."""
    job = read_job(run_dir) if run_dir.is_dir() else None
    return str(job["job_id"]) if job and job.get("executor") == "slurm" else None


def _slurm_jobs(run_dirs: list[Path]) -> dict[str, str] | None:
    """The SLURM states of every job the runs' locks and job.json name, from one squeue:
    a relaunch over hundreds of runs must not poll squeue once per run."""
    queued = (_slurm_job(d) for d in run_dirs if d.is_dir())
    return runlock.slurm_states([*runlock.held_slurm_jobs(run_dirs), *filter(None, queued)])


def taken_elsewhere(runs: Sequence[PlannedRun], runs_dir: Path) -> list[PlannedRun]:
    """The runs not done that another launch has now, read afresh (after this launch)."""
    open_runs = [r for r in runs if r.state != "done"]
    slurm = _slurm_jobs([store.run_dir_for(r.spec, runs_dir) for r in open_runs])
    taken = []
    for run in open_runs:
        if other := elsewhere(store.run_dir_for(run.spec, runs_dir), slurm):
            taken.append(replace(run, state=other[0], elsewhere=other[1]))
    return taken


def describe_elsewhere(runs: Sequence[PlannedRun]) -> str:
    """How many of `runs` are running and queued, e.g. '1 being trained, 2 queued in SLURM'."""
    counts = [(sum(r.state == s for r in runs), what) for s, what in
              (("running", "being trained"), ("queued", "queued in SLURM"))]
    return ", ".join(f"{n} {what}" for n, what in counts if n)


def is_evaluated(run_dir: Path, spec: ExperimentSpec, policies: tuple[str, ...]) -> bool:
    """Each policy's checkpoint has a record holding every attack the spec asks for."""
    from trades_repro.evalfile import made_with, read_eval

    evals = read_eval(run_dir / store.EVAL_FILE)
    records = list(evals.checkpoints.values()) if evals is not None else []
    wanted = set(spec.evaluation.attacks)
    return all(any(p in r.policies and wanted <= set(r.attacks)
                   and made_with(r, spec.evaluation) for r in records)
               for p in policies)


def load_costs(path: Path = COSTS_FILE) -> list[Cost]:
    return [Cost.model_validate(c) for c in yamlio.read(path)["costs"]]


# App. G's per-step metrics (monitor.batch_metrics): a CE backward, the after-step forwards
# and backward, and a host sync per step. `python benchmarks/bench_monitor.py` on the 2-core
# VM, one thread, spec/fashion_mnist.yaml, twin runs taking turns for 3 epochs: 1.25x per
# training epoch (1.19-1.26; benchmarks/results/monitor-cpu-20261128T095721Z.json). No GPU
# figure yet; its per-step syncs may cost relatively more there.
APP_G_COST = 1.25


def estimate_hours(runs: list[PlannedRun], device: str,
                   costs: list[Cost] | None = None) -> tuple[float, list[str]]:
    """Hours for the runs not done yet, from the cost table; and what it has no entry for."""
    costs = load_costs() if costs is None else costs
    table = {(c.arch, c.dataset, c.device): c for c in costs}
    seconds, missing = 0.0, set()
    for run in runs:
        if run.state == "done":
            continue
        key = (run.spec.model.arch, run.spec.data.dataset, device)
        if key not in table:
            missing.add(f"{key[0]} on {key[1]} ({device})")
            continue
        epochs = run.spec.optim.epochs if run.state != "evaluate" else 0
        epoch = table[key].epoch_seconds * (APP_G_COST if run.spec.monitor.batch_metrics else 1)
        seconds += epochs * epoch + table[key].eval_seconds
    return seconds / 3600, sorted(missing)


def by_arm(runs: list[PlannedRun], device: str) -> list[tuple[str, int, int, float]]:
    """(arm, runs, pending, estimated hours) per arm; a shared run counts for its first."""
    costs = load_costs()
    rows: dict[str, list[PlannedRun]] = {}
    for run in runs:
        rows.setdefault(run.arms[0], []).append(run)
    return [(arm, len(rs), sum(r.state != "done" for r in rs),
             estimate_hours(rs, device, costs)[0]) for arm, rs in rows.items()]


def require_device(tier: str, runs: Sequence[PlannedRun] = ()) -> None:
    """Reduced and full tiers train ResNet-18 for hours per run, and a spec may ask for
    `device: cuda`: refuse without CUDA, before anything is trained or marked failed."""
    import torch

    if torch.cuda.is_available():
        return
    if tier in GPU_TIERS:
        raise Inconclusive(f"tier '{tier}' needs a CUDA GPU and none is visible; use "
                           "--dry-run to see the plan, or --tier instant on a CPU")
    to_train = [r for r in runs if r.state not in ("done", *ELSEWHERE)]
    cuda = [r for r in to_train if r.spec.device == "cuda"]
    if cuda:
        raise Inconclusive(f"{len(cuda)} run(s) to train ask for device: cuda (first: "
                           f"{cuda[0].digest}, {', '.join(cuda[0].arms)}) and no CUDA GPU is "
                           "visible")


def execute(runs: list[PlannedRun], runs_dir: Path, *, report: Report, progress: bool,
            executor: Executor | None = None,
            retry_failed: bool = False) -> list[tuple[PlannedRun, str]]:
    """Train and evaluate what is not done through `executor` (default: inline, one after
    another); returns the failures (run, one-line error) and carries on past them, so one bad
    seed loses nothing else. Runs that failed before count as failures unless retried; runs
    another launch has (running or queued) are not started, and those it took between the
    plan and their start come back "busy": both are left to it. An unexpected error in a run
    is our bug: it escapes (inline) or is raised once every run has ended (exit 4), never
    exit 1."""
    failures, work = [], []
    for run in runs:
        if run.state in ELSEWHERE:
            verb = "being trained by" if run.state == "running" else "queued as"
            report(f"{run.digest} ({_label(run)}): {verb} {run.elsewhere}; left to it")
        elif run.state == "failed" and not retry_failed:
            error = failure(store.run_dir_for(run.spec, runs_dir))
            failures.append((run, f"failed earlier: {error} (--retry-failed retries it)"))
            report(f"{run.digest} ({_label(run)}): {failures[-1][1]}")
        elif run.state != "done":
            work.append(run)
    by_digest = {run.digest: run for run in work}
    outcomes = (executor or Inline(progress)).run([_job(r, runs_dir) for r in work], report)
    for outcome in outcomes:
        if outcome.status in ("failed", "crashed", "lost"):
            failures.append((by_digest[outcome.digest], outcome.message))
        if outcome.status in ("failed", "busy"):
            report(f"  {outcome.digest} {outcome.status}: {outcome.message}")
    crashed = [o for o in outcomes if o.status == "crashed"]
    if crashed:
        raise RuntimeError(f"{len(crashed)} run(s) crashed; first: {crashed[0].digest}: "
                           f"{crashed[0].message}")
    no_gpu = [o for o in outcomes if o.status == "needs_gpu"]
    if no_gpu:
        raise Inconclusive(f"{len(no_gpu)} run(s) found no CUDA GPU where they ran (first: "
                           f"{no_gpu[0].digest}: {no_gpu[0].message}); nothing was marked "
                           "failed")
    return failures


def _job(run: PlannedRun, runs_dir: Path) -> RunJob:
    return RunJob(run.spec.model_dump(mode="json"), str(runs_dir), run.policies, _label(run))


def _label(run: PlannedRun) -> str:
    return f"{', '.join(run.arms)}, seed {run.spec.seed}: {run.state}"


@contextmanager
def properties_alongside(entries: list[Entry], runs_dir: Path, report: Report,
                         root: Path = PROJECT) -> Iterator[None]:
    """The property claims' pytest nodes in one subprocess while the block trains; each
    outcome recorded in runs/_properties/ when the block ends, pytest's output kept in
    runs/_properties/pytest.log. On a CPU the runs and pytest use one thread each, so on 2
    cores the instant tier takes the longer of the two, not their sum. If the block raises,
    pytest is stopped and nothing is recorded."""
    props = [e for e in entries if e.claim.kind == "property"]
    if not props:
        yield
        return
    nodes = sorted({e.claim.test.node for e in props})
    for node in nodes:
        if not (root / node.split("::")[0]).is_file():
            raise BadInput(f"{node}: no such test file under {root} (property tests need "
                           "the source checkout)")
    folder = runs_dir / PROPERTIES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    report(f"property tests: {len(nodes)} pytest node(s), alongside the runs")
    child = PytestChild(nodes, root, folder / "pytest.log")
    try:
        yield
    except BaseException:
        child.stop()
        raise
    outcomes = child.outcomes()
    for entry in props:
        outcome = outcomes.get(entry.claim.test.node, "not collected")
        store.atomic_write_json(folder / f"{entry.id}.json", {
            "claim": entry.id, "node": entry.claim.test.node, "outcome": outcome,
            "finished": store.now_iso(), "seconds": child.seconds, **store.git_state()})
        report(f"  {entry.id}: {outcome}")


def run_properties(entries: list[Entry], runs_dir: Path, report: Report,
                   root: Path = PROJECT) -> None:
    """The property claims' pytest nodes, now; each outcome recorded (see above)."""
    with properties_alongside(entries, runs_dir, report, root):
        pass


class PytestChild:
    """`pytest NODES` in its own process and pytest session, started at once; `outcomes()`
    waits for it (PROPERTY_TIMEOUT_S from its start in all) and reads its JUnit report."""

    def __init__(self, nodes: list[str], root: Path, log: Path) -> None:
        self.nodes = nodes
        self._tmp = tempfile.TemporaryDirectory()
        self._xml = Path(self._tmp.name) / "junit.xml"
        self._started = time.perf_counter()
        try:
            with open(log, "w") as out:  # the child keeps its own copy of the descriptor
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     f"--junitxml={self._xml}", *nodes], cwd=root, stdout=out,
                    stderr=subprocess.STDOUT, env=_own_pytest_env())
        except BaseException:
            self._tmp.cleanup()
            raise

    def outcomes(self) -> dict[str, str]:
        left = self._started + PROPERTY_TIMEOUT_S - time.perf_counter()
        try:
            status = self._proc.wait(timeout=max(left, 0.0))
        except subprocess.TimeoutExpired:
            self.stop()
            status = None
        self.seconds = round(time.perf_counter() - self._started, 1)
        if status is None:
            return {node: "timed out" for node in self.nodes}
        try:
            if not self._xml.is_file():  # pytest itself failed (internal or usage error)
                return {node: f"error (pytest exit {status})" for node in self.nodes}
            cases = ET.parse(self._xml).getroot().iter("testcase")
            results = [(c.get("classname", ""), c.get("name", ""), _case_outcome(c))
                       for c in cases]
        finally:
            self._tmp.cleanup()
        return {node: _node_outcome(node, results) for node in self.nodes}

    def stop(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._tmp.cleanup()


def _own_pytest_env() -> dict[str, str]:
    """This environment without a calling pytest's per-session variables: under a pytest-xdist
    worker, `PYTEST_XDIST_WORKER` made plugins of the child (pytest-benchmark) believe they
    ran under xdist, and their warning ended the child before it wrote its report."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST", "PYTEST_VERSION"))}


def _case_outcome(case: ET.Element) -> str:
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return "failed" if tag != "skipped" else "skipped"
    return "passed"


def _node_outcome(node: str, results: list[tuple[str, str, str]]) -> str:
    path, name = node.split("::", 1)
    module = path.removesuffix(".py").replace("/", ".")
    mine = [o for cls, case, o in results if cls == module and case.split("[")[0] == name]
    if not mine:
        return "not collected"
    return next((o for o in ("failed", "skipped") if o in mine), "passed")

