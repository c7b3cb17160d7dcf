"""One run as a job any executor can run (`RunJob`: train, then evaluate, under the run's
lock), and what a job leaves in its run folder: `run.log` (its output), `failed.json` (a
known failure, retried only with `--retry-failed`) and `job.json` (the executor and job id
it was last given to, for `status`).

`RunJob` is plain data and `Checkpointable`, so submitit pickles it into a SLURM array task
and, on preemption or timeout, requeues it as it is: the state lives in the run folder.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import submitit

from trades_repro import runlock, store
from trades_repro.errors import BadInput, NeedsGPU
from trades_repro.executor_config import first_line

FAILED_FILE = "failed.json"  # the run failed: its error; retried only with --retry-failed
JOB_FILE = "job.json"  # the executor and job id it was last given to
RUN_LOG = "run.log"
INTERRUPTS = ("KeyboardInterrupt", "SystemExit")  # a killed run resumes; it did not fail
Report = Callable[[str], None]
Status = Literal["done", "failed", "crashed", "lost", "busy", "submitted", "needs_gpu"]


@dataclass(frozen=True)
class Outcome:
    digest: str
    status: Status  # crashed: our own bug (exit 4); lost: the process died without a word
    message: str = ""
    job_id: str | None = None


class RunJob(submitit.helpers.Checkpointable):
    """One run, trained then evaluated under its lock; plain data, so submitit can pickle it
    and, being Checkpointable, requeue it as it is (the state lives in the run folder)."""

    def __init__(self, spec: dict, runs_dir: str, policies: tuple[str, ...], label: str = "",
                 threads: int | None = 1) -> None:
        self.spec, self.runs_dir, self.policies = spec, runs_dir, policies
        self.label, self.threads = label, threads  # threads: torch's, when on the CPU

    @property
    def digest(self) -> str:
        return self._spec().digest()

    @property
    def run_dir(self) -> Path:
        return store.run_dir_for(self._spec(), Path(self.runs_dir))

    def __call__(self) -> Outcome:
        """In a job: everything to `run.log`; an unexpected error is recorded, not raised, so
        the launcher reports it (exit 4) and the other runs go on."""
        self._set_threads()
        with run_log(self.run_dir) as say:
            say(f"start {self.label} on {os.uname().nodename} (job {runlock.current_job_id()})")
            try:
                outcome = self.run(say, progress=False)
                say(f"{outcome.status}{': ' + outcome.message if outcome.message else ''}")
                return outcome
            except Exception as err:  # noqa: BLE001 - recorded, reported by the launcher
                traceback.print_exc()
                message = f"{type(err).__name__}: {first_line(err)} (traceback in run.log)"
                record_failure(self.run_dir, message, crashed=True)
                return Outcome(self.digest, "crashed", message, runlock.current_job_id())

    def run(self, report: Report, progress: bool) -> Outcome:
        """Train (resume, or skip if finished) and evaluate under the lock; a known run
        failure is recorded in `failed.json`; anything else escapes."""
        from trades_repro.data import DataError
        from trades_repro.spec import SpecError
        from trades_repro.train import TrainingError

        run_dir, job = self.run_dir, runlock.current_job_id()
        try:
            with runlock.hold(run_dir):
                (run_dir / FAILED_FILE).unlink(missing_ok=True)  # tried again now
                self._train_and_evaluate(report, progress)
        except runlock.RunBusy as busy:
            return Outcome(self.digest, "busy", str(busy), job)
        except NeedsGPU as err:  # the node, not the run: nothing marked failed
            return Outcome(self.digest, "needs_gpu", str(err), job)
        except (TrainingError, BadInput, DataError, SpecError) as err:
            message = f"{type(err).__name__}: {first_line(err)}"
            record_failure(run_dir, message)
            return Outcome(self.digest, "failed", message, job)
        return Outcome(self.digest, "done", "", job)

    def _train_and_evaluate(self, report: Report, progress: bool) -> None:
        from trades_repro.diagnose import evaluate_run
        from trades_repro.train import train

        spec = self._spec()
        result = train(spec, Path(self.runs_dir), progress=progress)
        report("already trained; evaluating" if result.skipped else
               f"trained to epoch {len(result.records)}; evaluating")
        evaluate_run(result.run_dir, attacks=spec.evaluation.attacks,
                     n_examples=spec.evaluation.n_examples, policies=self.policies,
                     report=report)

    def _spec(self):
        from trades_repro.spec import ExperimentSpec

        return ExperimentSpec.model_validate(self.spec)

    def _set_threads(self) -> None:
        import torch

        if self.threads and not torch.cuda.is_available():
            torch.set_num_threads(self.threads)  # see cli._set_threads: 1 on shared cores


def failure(run_dir: Path) -> str | None:
    """The run's recorded failure: `failed.json`, or a `failed` provenance that was not an
    interrupt (`train` marks a Ctrl-C'd run `interrupted`, and did mark it `failed` before
    2026-11-28; either way it resumes like a killed one)."""
    path = run_dir / FAILED_FILE
    if path.is_file():
        return store.read_json(path).get("error", "failed")
    prov = run_dir / store.PROVENANCE_FILE
    if prov.is_file():
        raw = store.read_json(prov)
        error = str(raw.get("error", ""))
        if raw.get("status") == "failed" and not error.startswith(INTERRUPTS):
            return error or "failed"
    return None


def record_failure(run_dir: Path, error: str, crashed: bool = False) -> None:
    store.atomic_write_json(run_dir / FAILED_FILE, {
        "error": error, "crashed": crashed, "at": store.now_iso(),
        "host": os.uname().nodename, "pid": os.getpid(), "job_id": runlock.current_job_id()})


@contextmanager
def run_log(run_dir: Path) -> Iterator[Report]:
    """Append this process's output to `run_dir/run.log`; yields a time-stamped reporter."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / RUN_LOG).open("a", buffering=1) as handle, \
            redirect_stdout(handle), redirect_stderr(handle):
        yield lambda line: print(f"{time.strftime('%H:%M:%S')} {line}", file=handle)


def write_job(job: RunJob, executor: str, job_id: str, where: str) -> None:
    store.atomic_write_json(job.run_dir / JOB_FILE, {
        "executor": executor, "job_id": job_id, "where": where,
        "submitted": store.now_iso(), "host": os.uname().nodename})


def read_job(run_dir: Path) -> dict | None:
    """The executor and job id the run was last given to; `CorruptFile` (exit 2, naming it)
    when job.json holds anything else."""
    path = run_dir / JOB_FILE
    return store.read_json(path) if path.is_file() else None
