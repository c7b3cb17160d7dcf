"""`status`: where a claim's runs stand, per claim and arm, read from the run folders alone.

A run is *running* while a live holder has its lock (`runlock`), *done* when trained and
evaluated as its arms ask, *failed* when it recorded a failure (`executors.failure`), and
*pending* otherwise (never started, killed, or queued: a queued SLURM task shows its job id
from `job.json`). A running run's ETA is its remaining epochs times the epoch time measured
since it took the lock (`metrics.jsonl`'s last write minus the lock's time, over the epochs
done since): no cost table guess, and no clock on the run's own records. A stale or
unreadable lock (the next launch takes either over) and a file where a run folder belongs
are noted on the run, not fatal.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trades_repro import runlock, store
from trades_repro.claims import Catalogue, Entry
from trades_repro.executors import failure, read_job
from trades_repro.runclaim import is_evaluated
from trades_repro.spec import ExperimentSpec

STATES = ("done", "running", "failed", "pending")


@dataclass(frozen=True)
class RunStatus:
    digest: str
    seed: int
    state: str  # one of STATES
    job_id: str | None = None
    host: str | None = None
    epoch: int = 0  # epochs done
    epochs: int = 0  # epochs the spec trains
    epoch_seconds: float | None = None  # measured since the lock was taken
    eta_seconds: float | None = None  # training left; None until an epoch is measured
    error: str | None = None  # a failed run's error line
    note: str | None = None  # e.g. a stale lock left by a killed run


@dataclass(frozen=True)
class ArmStatus:
    claim: str
    tier: str
    arm: str
    runs: list[RunStatus] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {s: sum(r.state == s for r in self.runs) for s in STATES}

    def to_dict(self) -> dict:
        return {"claim": self.claim, "tier": self.tier, "arm": self.arm, **self.counts(),
                "runs": [asdict(r) for r in self.runs]}


def run_status(spec: ExperimentSpec, runs_dir: Path, policies: tuple[str, ...],
               slurm: Mapping[str, str] | None = None) -> RunStatus:
    """One run's state; `slurm`: job states from one squeue for many runs (`collect`)."""
    run_dir = store.run_dir_for(spec, runs_dir)
    base = {"digest": spec.digest(), "seed": spec.seed, "epochs": spec.optim.epochs}
    if run_dir.exists() and not run_dir.is_dir():  # named, not read: nothing of ours is there
        return RunStatus(**base, state="pending", note=f"{run_dir} is a file, not a run folder")
    epoch = runlock.epochs_done(run_dir)
    base["epoch"] = epoch
    holder, note = _lock(run_dir, slurm)
    if holder and not note:
        seconds = _epoch_seconds(run_dir, holder, epoch)
        eta = None if seconds is None else seconds * max(0, spec.optim.epochs - epoch)
        return RunStatus(**base, state="running", job_id=holder.job_id, host=holder.host,
                         epoch_seconds=seconds, eta_seconds=eta)
    if store.is_finished(run_dir) and is_evaluated(run_dir, spec, policies):
        return RunStatus(**base, state="done")
    job = read_job(run_dir) or {}
    error = failure(run_dir)
    state = "failed" if error else "pending"
    return RunStatus(**base, state=state, job_id=job.get("job_id"), error=error,
                     note=note)


def _lock(run_dir: Path, slurm: Mapping[str, str] | None) -> tuple[runlock.Holder | None,
                                                                     str | None]:
    """The lock's holder, and a note when it is stale or unreadable (the next launch takes
    either over)."""
    try:
        holder = runlock.load(run_dir)
    except runlock.UnreadableLock as bad:
        return None, f"unreadable lock: {bad}"
    stale = runlock.stale_reason(holder, run_dir, slurm=slurm) if holder else None
    return holder, f"stale lock: {stale}" if stale else None


def collect(catalogue: Catalogue, entries: list[Entry], runs_dir: Path,
            tier: str | None = None) -> list[ArmStatus]:
    """One row per claim, tier and arm. Without `tier`: the tiers in which any of the arm's
    runs has a folder (what was launched), so a cluster user needs no flag."""
    arms = []
    for entry in entries:
        for arm in entry.claim.arm_names():
            for t in [tier] if tier else catalogue.tiers_of(entry):
                specs = catalogue.specs(arm, t)
                if tier or any(store.run_dir_for(s, runs_dir).is_dir() for s in specs):
                    arms.append((entry.id, t, arm, specs))
    slurm = runlock.slurm_states(runlock.held_slurm_jobs(
        store.run_dir_for(s, runs_dir) for *_, specs in arms for s in specs))
    return [ArmStatus(claim_id, t, arm, [run_status(s, runs_dir, (catalogue.arms[arm].policy,),
                                                    slurm) for s in specs])
            for claim_id, t, arm, specs in arms]


def _epoch_seconds(run_dir: Path, holder: runlock.Holder, epoch: int) -> float | None:
    done = epoch - holder.epoch
    path = run_dir / store.METRICS_FILE
    if done <= 0 or not path.is_file():
        return None
    return max(0.0, path.stat().st_mtime - holder.acquired) / done


def describe(run: RunStatus) -> str:
    """One line for people: `ab12cd34 epoch 3/20, 40 s/epoch, ETA 11 min (job 123_4)`."""
    text = f"{run.digest[:8]} seed {run.seed}"
    if run.state == "running" and run.epochs and run.epoch >= run.epochs:
        text += " trained, evaluating"
    elif run.state == "running":
        text += f" epoch {run.epoch}/{run.epochs}"
        if run.epoch_seconds is not None:
            text += f", {run.epoch_seconds:.0f} s/epoch, ETA {_duration(run.eta_seconds)}"
    if run.job_id:
        text += f" (job {run.job_id}{' on ' + run.host if run.host else ''})"
    if run.error:
        text += f": {run.error}"
    if run.note:
        text += f" [{run.note}]"
    return text


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def snapshot_time() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
