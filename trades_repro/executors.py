"""Where `run-claim`'s pending runs train: in this process, in local processes, or on SLURM.

The field's engine does the scheduling: `submitit` starts local processes and submits SLURM job
arrays; nothing here is a scheduler of its own. Every executor runs the same `RunJob` (train,
then evaluate, under the run folder's lock from `runlock`), so a run is the same run whatever
ran it:

* `inline`: one run after another in this process (the laptop default);
* `local`: each run a separate process (submitit's `LocalExecutor`), `jobs` at once, slot `s`
  on visible GPU `s mod n` (`CUDA_VISIBLE_DEVICES` set per process), at most `jobs_per_gpu`
  per GPU;
* `slurm`: one submitit job array. `RunJob` is `Checkpointable`: on preemption or timeout
  submitit pickles it and requeues the array task; the requeued task (same job id) takes the
  old lock over and `train` resumes from `last.pt`, then evaluation runs in the same job.

A run that fails (non-finite loss, bad data, …) leaves `failed.json` with its error line;
it is retried only when asked (`--retry-failed`). Each job's output goes to `run.log` in its
run folder; submitit's own files go to `RUNS_DIR/_submitit/`.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import submitit
from pydantic import ValidationError

from trades_repro import runlock, store
from trades_repro.errors import BadInput
from trades_repro.executor_config import (  # noqa: F401 (re-exported: run-claim's API)
    ExecutorConfig,
    LocalConfig,
    SlurmConfig,
    first_line,
    load_config,
)
from trades_repro.runjob import (  # noqa: F401 (re-exported: run-claim's API)
    FAILED_FILE,
    JOB_FILE,
    RUN_LOG,
    Outcome,
    Report,
    RunJob,
    failure,
    read_job,
    record_failure,
    run_log,
    write_job,
)

EXECUTORS = ("inline", "local", "slurm")
SUBMITIT_DIR = "_submitit"
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local default is 2 min: a run takes hours
CANCEL_WAIT_S = 10.0  # a cancelled local job's controller SIGKILLs its run 1 s after SIGINT


class Executor(Protocol):
    def run(self, work: list[RunJob], report: Report) -> list[Outcome]: ...


@dataclass(frozen=True)
class Inline:
    """Today's behaviour: one run after another, here; an unexpected error escapes (exit 4)."""

    progress: bool = True

    def run(self, work: list[RunJob], report: Report) -> list[Outcome]:
        outcomes = []
        for i, job in enumerate(work, 1):
            report(f"[{i}/{len(work)}] {job.digest} ({job.label})")
            outcomes.append(job.run(report, self.progress))
        return outcomes


# ------------------------------------------------------------------------ local processes

def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (ids or UUIDs)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def slot_devices(gpus: list[str], jobs: int | None, per_gpu: int) -> list[str | None]:
    """Slot s runs on GPU s mod n (round robin), at most `per_gpu` slots per GPU."""
    if not gpus:
        return [None] * (jobs or 1)
    n = min(jobs or len(gpus) * per_gpu, len(gpus) * per_gpu)
    return [gpus[s % len(gpus)] for s in range(n)]


def gpu_parameters(device: str | None) -> dict:
    """submitit's way to pin a local job to one GPU; a UUID goes through a shell export."""
    if device is None:
        return {"gpus_per_node": 0}  # submitit sets CUDA_VISIBLE_DEVICES="": CPU only
    if device.isdigit():
        return {"gpus_per_node": 1, "visible_gpus": (int(device),)}
    return {"setup": [f"export CUDA_VISIBLE_DEVICES={shlex.quote(device)}"]}


# slot -> (its submitit job, the RunJob, what job.json held before the job started)
Active = dict[int, tuple[submitit.Job, RunJob, bytes | None]]


@dataclass(frozen=True)
class Local:
    """`jobs` runs at once as separate processes, started by submitit's LocalExecutor."""

    config: LocalConfig
    folder: Path
    poll_s: float = 0.5

    def run(self, work: list[RunJob], report: Report) -> list[Outcome]:
        """Each run in its own process; interrupted (Ctrl-C, or SIGTERM to this process
        alone), the runs started are stopped too, their locks released, before it ends."""
        slots = slot_devices(visible_gpus(), self.config.jobs, self.config.jobs_per_gpu)
        report(f"local executor: {len(work)} runs, {len(slots)} at once")
        active: Active = {}
        with _sigterm_interrupts():
            try:
                return self._run(work, slots, active, report)
            except BaseException:
                _cancel([(handle, job) for handle, job, _ in active.values()])
                raise

    def _run(self, work: list[RunJob], slots: list[str | None], active: Active,
             report: Report) -> list[Outcome]:
        queue, outcomes = deque(work), []
        while queue or active:
            for slot in [s for s in range(len(slots)) if s not in active][:len(queue)]:
                job = queue.popleft()
                before = _job_file(job)
                active[slot] = (self._start(job, slots[slot], report), job, before)
            time.sleep(self.poll_s)
            for slot, (handle, job, before) in list(active.items()):
                if handle.done():
                    outcomes.append(_collect(handle, job))
                    if outcomes[-1].status == "busy":  # another launch's run: its job.json
                        _restore_job_file(job, before)
                    _report_outcome(report, outcomes[-1], len(outcomes), len(work))
                    del active[slot]
        return outcomes

    def _start(self, job: RunJob, device: str | None, report: Report) -> submitit.Job:
        executor = submitit.LocalExecutor(folder=self.folder)
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, **gpu_parameters(device))
        handle = executor.submit(job)
        where = f"GPU {device}" if device is not None else "CPU"
        write_job(job, "local", handle.job_id, where)
        report(f"started {job.digest} ({job.label}) on {where} as job {handle.job_id}; "
               f"log {job.run_dir / RUN_LOG}")
        return handle


# ------------------------------------------------------------------------------------ SLURM

@dataclass(frozen=True)
class Slurm:
    """All pending runs as one submitit job array."""

    config: SlurmConfig
    folder: Path

    def executor(self) -> submitit.AutoExecutor:
        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.config.cluster,
                                         slurm_max_num_timeout=self.config.max_num_timeout)
        executor.update_parameters(**self.config.parameters())
        return executor

    def run(self, work: list[RunJob], report: Report) -> list[Outcome]:
        if not work:
            return []
        handles = self._submit(work)
        for handle, job in zip(handles, work, strict=True):
            write_job(job, "slurm", handle.job_id, self.config.partition or "default")
        report(f"submitted {len(work)} runs as job array {handles[0].job_id.split('_')[0]} "
               f"(submitit files in {self.folder})")
        if not (self.config.wait or self.config.cluster == "debug"):
            return [Outcome(j.digest, "submitted", "", h.job_id)
                    for h, j in zip(handles, work, strict=True)]
        outcomes = [_collect(h, j) for h, j in zip(handles, work, strict=True)]
        for i, outcome in enumerate(outcomes, 1):
            _report_outcome(report, outcome, i, len(outcomes))
        return outcomes

    def _submit(self, work: list[RunJob]) -> list[submitit.Job]:
        """One array. A job the site refuses (partition, account, QOS, time) is bad input
        with sbatch's own line; submitit prints sbatch's stderr too, kept out of ours."""
        executor = self.executor()
        printed = io.StringIO()
        try:
            with redirect_stderr(printed), executor.batch():
                return [executor.submit(job) for job in work]
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as err:
            raise BadInput(f"--executor slurm: sbatch refused the job: "
                           f"{_sbatch_line(err, printed.getvalue())}") from None


def _sbatch_line(err: Exception, printed: str) -> str:
    """sbatch's reason in one line: the last that says 'error', else the last one."""
    stderr = getattr(err, "stderr", None) or ""
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    lines = [line.strip() for text in (stderr, str(err), printed)
             for line in text.splitlines() if line.strip()]
    said = [line for line in lines if "error" in line.lower()]
    return (said or lines or [type(err).__name__])[-1]


# --------------------------------------------------------------------- interrupts (local)

@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (`kill PID`, a batch system's stop) ends the launcher as Ctrl-C does, so that
    its local runs are stopped with it, not left training with their locks held."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _cancel(started: list[tuple[submitit.Job, RunJob]]) -> None:
    """Stop each started run, and wait a little for them. The run itself gets SIGINT first
    (its pid from its lock, when the lock names this job on this host), so it releases its
    lock and ends in its own time, up to `CANCEL_WAIT_S`; only then is submitit's controller
    cancelled, which passes SIGINT on and SIGKILLs a run still alive 1 s later: on a loaded
    machine that left the lock stale (taken over by the next launch, but not released)."""
    deadline = time.monotonic() + CANCEL_WAIT_S
    running = [job.run_dir for handle, job in started if _interrupt_run(handle, job.run_dir)]
    while any(runlock.read(d) is not None for d in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    for handle, _ in started:
        handle.cancel(check=False)
    while not all(handle.done() for handle, _ in started) and time.monotonic() < deadline:
        time.sleep(0.1)


def _interrupt_run(handle: submitit.Job, run_dir: Path) -> bool:
    """SIGINT to the process holding `run_dir`'s lock when it is `handle`'s run on this host
    and alive; whether it was sent."""
    holder = runlock.read(run_dir)
    if (holder is None or holder.job_id != str(handle.job_id)
            or holder.host != socket.gethostname()
            or not runlock.is_alive(holder.pid, holder.pid_start)):
        return False
    try:
        os.kill(holder.pid, signal.SIGINT)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# ---------------------------------------------------------------------------- construction

def build(name: str, runs_dir: Path, *, config: ExecutorConfig, progress: bool = True,
          overrides: dict | None = None, check_commands: bool = True) -> Executor:
    """The executor called `name`; `overrides` (command-line values, None = unset) win over
    the config file's block. Without `check_commands` (a dry run, which may be previewed
    away from the cluster) SLURM's commands need not be on PATH."""
    if name not in EXECUTORS:
        raise BadInput(f"--executor: unknown {name!r}; known: {', '.join(EXECUTORS)}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    _refuse_foreign(name, given)
    folder = runs_dir / SUBMITIT_DIR / name
    try:
        if name == "inline":
            return Inline(progress)
        if name == "local":
            return Local(LocalConfig.model_validate({**config.local.model_dump(), **given}),
                         folder)
        slurm = Slurm(SlurmConfig.model_validate({**config.slurm.model_dump(), **given}),
                      folder)
    except ValidationError as err:
        raise BadInput(f"--executor {name}: {first_line(err)}") from None
    if slurm.config.cluster == "slurm" and check_commands:
        _require_slurm_commands()
    return slurm


OPTIONS = {"local": LocalConfig, "slurm": SlurmConfig}  # inline takes none


def _refuse_foreign(name: str, given: dict) -> None:
    """An option of another executor would be ignored without a word (`--jobs 4` with the
    inline default ran one run at a time): refuse it, naming whose option it is."""
    own = OPTIONS[name].model_fields if name in OPTIONS else {}
    foreign = [key for key in given if key not in own]
    if foreign:
        named = ", ".join(f"--{key.replace('_', '-')} ({_owner(key)})" for key in foreign)
        raise BadInput(f"--executor {name} does not take {named}: give each with the "
                       "executor named after it")


def _owner(key: str) -> str:
    return next((name for name, model in OPTIONS.items() if key in model.model_fields), "none")


def _require_slurm_commands() -> None:
    """Before anything starts: submitit needs `sbatch` and `srun`; without them it raised
    a RuntimeError mid-launch (exit 4, 'failed unexpectedly')."""
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if missing:
        raise BadInput(f"--executor slurm: {' and '.join(missing)} not found on PATH; run on "
                       "a SLURM login node, or use --executor local")


def _collect(handle: submitit.Job, job: RunJob) -> Outcome:
    """The job's own outcome, or `lost` when its process died without one (killed, OOM):
    the run is not marked failed, so the next launch resumes it."""
    try:
        return handle.result()
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as err:
        return Outcome(job.digest, "lost", f"job {handle.job_id} ended without a result "
                       f"({first_line(err)}); see {job.run_dir / RUN_LOG}", handle.job_id)


def _report_outcome(report: Report, outcome: Outcome, i: int, n: int) -> None:
    tail = f": {outcome.message}" if outcome.message else ""
    report(f"[{i}/{n}] {outcome.digest} {outcome.status}{tail}")


def _job_file(job: RunJob) -> bytes | None:
    path = job.run_dir / JOB_FILE
    return path.read_bytes() if path.is_file() else None


def _restore_job_file(job: RunJob, before: bytes | None) -> None:
    """Put back what job.json said before a start that found the run held: the holder's
    job, not the one that left at once."""
    path = job.run_dir / JOB_FILE
    if before is None:
        path.unlink(missing_ok=True)
    else:
        store.atomic_write_bytes(path, before)
