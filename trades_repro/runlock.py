"""One trainer per run folder: an exclusive lock, so two launches never train one digest at once.

`runs/<digest>/run.lock` is a small JSON file naming its holder (host, pid, the process's
start time, submitit job id and scheduler, when it was taken, the epochs already done then).
It is created with `os.link` of a complete temporary file, which fails when the lock exists:
atomic on local disks and on NFS, and a reader never sees a half-written lock. The holder
touches it every `HEARTBEAT_S` seconds. A lock is *stale* when its holder is gone:

* the same SLURM job id from another process: the job was preempted or timed out and
  SLURM requeued it (same id, maybe another node), so the old incarnation is dead;
* on this host: the pid is gone, a zombie, or a different process now (start time differs);
* on another host: for a SLURM job, `squeue` says it ended; for anything else (a local
  executor's job id is its controller's pid, which squeue knows nothing of), no heartbeat for
  `STALE_AFTER_S`.

Locks appear whole, so an *unreadable* one (empty, cut, not a holder at all) is corrupt,
not half-written, e.g. a zero-length file after a node crash: it is taken over once
`UNREADABLE_AFTER_S` old.

A stale lock is taken over under a second, short-lived lock (`run.lock.takeover`), so two
launches that both find it stale cannot both take it; every take-over is logged, with its
reason, to `runs/<digest>/lock.log`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, TypeAdapter, ValidationError

from trades_repro.errors import BadInput
from trades_repro.store import METRICS_FILE

LOCK_FILE = "run.lock"
LOG_FILE = "lock.log"
TAKEOVER_FILE = "run.lock.takeover"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 15 * 60.0  # 15 missed heartbeats: a holder on another host is gone
TAKEOVER_STALE_S = 60.0  # a take-over takes milliseconds; older guards are crashed ones
UNREADABLE_AFTER_S = 5.0  # locks appear whole (os.link), so this is only a safety margin
SLURM_ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
               "RESIZING", "SIGNALING", "STAGE_OUT"}


class RunBusy(BadInput):
    """Another live process holds the run's lock: it is being trained right now."""

    def __init__(self, run_dir: Path, holder: Holder | None, who: str = "") -> None:
        who = who or (holder.describe() if holder else "another process")
        super().__init__(f"{run_dir.name}: being trained by {who}; see {run_dir / LOG_FILE}")
        self.holder = holder


class UnreadableLock(Exception):  # noqa: N818 - what the lock is, as lock.log reads
    """The lock file holds no holder: empty, cut, not JSON, or fields of the wrong type."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: Annotated[int, Field(gt=0)]  # os.kill(0 or -n) would signal a process group
    pid_start: str | None  # /proc start time: a reused pid is another process
    job_id: str | None  # submitit's job id (SLURM array task, local job); None inline
    token: str  # this acquisition, so a holder only ever releases its own lock
    acquired: Annotated[float, Field(allow_inf_nan=False)]  # epoch seconds
    epoch: Annotated[int, Field(ge=0)] = 0  # epochs done when taken: the ETA counts from here
    scheduler: str | None = None  # submitit's: slurm, local or debug; None inline (or old)

    @classmethod
    def me(cls, epoch: int = 0) -> Holder:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _pid_start(pid), current_job_id(),
                   uuid.uuid4().hex, time.time(), epoch, current_scheduler())

    def describe(self) -> str:
        job = f", job {self.job_id}" if self.job_id else ""
        return f"{self.host} pid {self.pid}{job}"

    def on_slurm(self) -> bool:
        """Whether `job_id` is a SLURM job's: only then do squeue and the requeue rule apply."""
        if self.scheduler is not None:
            return self.scheduler == "slurm"
        # A lock from before the scheduler was recorded: only a SLURM array task's id reads
        # "<array>_<task>" (submitit's local ids are controller pids, plain numbers, and ours
        # are arrays unless a launch submits one run). A plain number gets the heartbeat,
        # which is right for either; a dead SLURM job is then taken over after
        # STALE_AFTER_S, not at once, whereas squeue would call a live local job gone.
        return bool(self.job_id and re.fullmatch(r"\d+_\d+", self.job_id))


def current_job_id() -> str | None:
    """The submitit job this process runs in (SLURM: `<array>_<task>`), or None."""
    import submitit

    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:  # not inside a submitit job
        return None


def current_scheduler() -> str | None:
    """The executor of the submitit job this process runs in (slurm, local, debug), or None."""
    import submitit

    try:
        return submitit.JobEnvironment().cluster
    except RuntimeError:  # not inside a submitit job
        return None


def read(run_dir: Path) -> Holder | None:
    """The lock's holder, or None when there is no lock (or it vanished while reading) or it
    is unreadable (`load` tells these apart)."""
    with suppress(UnreadableLock):
        return load(run_dir)
    return None


def load(run_dir: Path) -> Holder | None:
    """The lock's holder, None when there is no lock; `UnreadableLock` saying what is wrong
    when the file holds no valid holder (unknown fields are ignored: a newer version's)."""
    try:
        raw = (run_dir / LOCK_FILE).read_bytes()
    except FileNotFoundError:
        return None
    if not raw.strip():
        raise UnreadableLock("empty file")
    try:
        return _holders().validate_json(raw, strict=True)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UnreadableLock(f"{where}: {first['msg']}" if where else first["msg"]) from None


@cache
def _holders() -> TypeAdapter[Holder]:
    return TypeAdapter(Holder)


def heartbeat_age(run_dir: Path) -> float | None:
    with suppress(FileNotFoundError):
        return time.time() - (run_dir / LOCK_FILE).stat().st_mtime
    return None


def stale_reason(holder: Holder, run_dir: Path, me: Holder | None = None,
                 slurm: Mapping[str, str] | None = None) -> str | None:
    """Why `holder` is gone, or None while it may still be alive (module docstring).
    `slurm`: job states from :func:`slurm_states`, read instead of asking squeue again."""
    me = me or Holder.me()
    if _requeued(holder, me):
        return f"job {holder.job_id} was requeued (old process {holder.host} pid {holder.pid})"
    if holder.host == me.host:
        return None if is_alive(holder.pid, holder.pid_start) else \
            f"process {holder.pid} on {holder.host} is gone"
    state = slurm_state(holder.job_id, slurm) if holder.on_slurm() else None
    if state is not None:
        return None if state in SLURM_ALIVE else f"job {holder.job_id} is {state or 'gone'}"
    age = heartbeat_age(run_dir)
    if age is not None and age > STALE_AFTER_S:
        return f"no heartbeat from {holder.describe()} for {age / 60:.0f} min"
    return None


def _requeued(holder: Holder, me: Holder) -> bool:
    """The same SLURM job in another process: SLURM restarted it. Local job ids are pids of
    controllers, and two hosts' controllers may share one, so they never count."""
    return (holder.on_slurm() and me.on_slurm() and holder.job_id == me.job_id
            and holder.pid != me.pid)


def acquire(run_dir: Path, me: Holder | None = None) -> Holder:
    """Take the run's lock as `me` (default: this process now), or a stale or unreadable one
    over; `RunBusy` when a live process holds it (or an unreadable lock is too fresh)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    me = me or Holder.me(epochs_done(run_dir))
    for _ in range(5):
        if _link(run_dir / LOCK_FILE, me):
            log(run_dir, "acquired", me)
            return me
        stale, reason = _why_stale(run_dir, me)
        if reason is not None and _take_over(run_dir, stale, me, reason):
            return me
        time.sleep(0.05)  # released or taken over meanwhile: try again
    raise RunBusy(run_dir, read(run_dir))


def _why_stale(run_dir: Path, me: Holder) -> tuple[Holder | None, str | None]:
    """(holder, why its lock may be taken over); the holder is None for an unreadable lock,
    the reason None when the lock vanished meanwhile. `RunBusy` while it is held."""
    try:
        holder = load(run_dir)
    except UnreadableLock as bad:
        age = heartbeat_age(run_dir)
        if age is None:
            return None, None
        if age < UNREADABLE_AFTER_S:
            raise RunBusy(run_dir, None, f"another process? its lock is unreadable ({bad}) "
                          f"but only {age:.0f} s old") from None
        return None, f"unreadable lock ({bad}), {age:.0f} s old"
    if holder is None:
        return None, None
    reason = stale_reason(holder, run_dir, me)
    if reason is None:
        raise RunBusy(run_dir, holder)
    return holder, reason


def release(run_dir: Path, me: Holder) -> None:
    """Remove the lock if it is still ours (it always is, unless judged stale wrongly)."""
    holder = read(run_dir)
    if holder is not None and holder.token == me.token:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        log(run_dir, "released", me)


@contextmanager
def hold(run_dir: Path) -> Iterator[Holder]:
    """The lock for the duration of the block, with a heartbeat thread touching it.

    A run that never started (bad data, a bad spec) leaves nothing behind: folders this lock
    created are removed again when only its own log is in them.
    """
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    me = Holder.me(epochs_done(run_dir))  # the token first: the finally below may need it
    stop = threading.Event()
    try:  # a Ctrl-C from the moment the lock exists (e.g. in beat.start) still releases it
        acquire(run_dir, me)
        threading.Thread(target=_heartbeat, args=(run_dir, me, stop), daemon=True).start()
        yield me
    finally:
        stop.set()
        release(run_dir, me)
        _tidy(run_dir, created)


def _tidy(run_dir: Path, created: list[Path]) -> None:
    if not created or {p.name for p in run_dir.iterdir()} - {LOG_FILE}:
        return
    (run_dir / LOG_FILE).unlink(missing_ok=True)
    for folder in created:  # innermost first
        with suppress(OSError):  # another launch may have written there meanwhile
            folder.rmdir()


def log(run_dir: Path, event: str, holder: Holder, reason: str = "") -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    line = f"{stamp} {event} by {holder.describe()}" + (f": {reason}" if reason else "")
    with (run_dir / LOG_FILE).open("a") as handle:
        handle.write(line + "\n")


def _take_over(run_dir: Path, stale: Holder | None, me: Holder, reason: str) -> bool:
    """Replace the stale (None: unreadable) lock under the take-over guard; False when
    someone else did."""
    guard = run_dir / TAKEOVER_FILE
    if not _link(guard, me):
        with suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_S:
                guard.unlink()
        return False
    try:
        if not _unchanged(run_dir, stale):
            return False  # released or already taken over: start again
        _write(run_dir / LOCK_FILE, me, replace_existing=True)
        log(run_dir, "took over", me, reason)
        return True
    finally:
        guard.unlink(missing_ok=True)


def _unchanged(run_dir: Path, stale: Holder | None) -> bool:
    """Under the guard: the lock is still the stale one (None: still unreadable)."""
    try:
        current = load(run_dir)
    except UnreadableLock:
        return stale is None
    return stale is not None and current is not None and current.token == stale.token


def _link(path: Path, holder: Holder) -> bool:
    try:
        _write(path, holder, replace_existing=False)
    except FileExistsError:
        return False
    return True


def _write(path: Path, holder: Holder, *, replace_existing: bool) -> None:
    tmp = path.with_name(f".{path.name}.{holder.token}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_bytes(_holders().dump_json(holder) + b"\n")
    try:
        if replace_existing:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if `path` exists: the atomic create
    finally:
        tmp.unlink(missing_ok=True)


def _heartbeat(run_dir: Path, me: Holder, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        holder = read(run_dir)
        if holder is None or holder.token != me.token:
            return
        with suppress(FileNotFoundError):
            os.utime(run_dir / LOCK_FILE)


def epochs_done(run_dir: Path) -> int:
    """Lines of metrics.jsonl, counted as bytes: only a progress hint (the lock's ETA start,
    `status`), so a garbled file (resume rebuilds it from last.pt) must stop neither."""
    path = run_dir / METRICS_FILE
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _pid_start(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks); None off Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def is_alive(pid: int, start: str | None) -> bool:
    """Whether `pid` is the live process that started at `start` (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    with suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if stat[0] == "Z":  # killed, not yet reaped by its parent
            return False
    now = _pid_start(pid)
    return start is None or now is None or now == start


def slurm_states(job_ids: Iterable[str]) -> dict[str, str] | None:
    """Many jobs' SLURM states from one `squeue` ('' for a job SLURM no longer knows), so
    that `status` over hundreds of runs held on other hosts does not poll squeue once per
    run; None without squeue or when the query fails (e.g. an id SLURM has purged: then
    `stale_reason` asks job by job)."""
    ids = sorted(set(job_ids))
    if not ids or shutil.which("squeue") is None:
        return None
    try:  # -r: one line per array task, so ids read "<array>_<task>" as submitit's do
        out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i %T"],
                             capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    listed = {}
    for line in out.stdout.splitlines():  # "<id> <STATE>", any spacing; never a crash
        job, _, state = line.strip().partition(" ")
        listed[job] = state.strip()
    return {job: listed.get(job, "") for job in ids}


def held_slurm_jobs(run_dirs: Iterable[Path]) -> list[str]:
    """The SLURM jobs holding these runs' locks from other hosts: what squeue must be asked
    about (once, by `slurm_states`) to judge them."""
    host = socket.gethostname()
    holders = (read(d) for d in run_dirs if d.is_dir())
    return [job for h in holders if h and (job := squeue_job(h, host))]


def squeue_job(holder: Holder, host: str) -> str | None:
    """The job squeue must be asked about for this holder, seen from `host`: a SLURM job
    held from another host (on this one the pid says it all)."""
    return holder.job_id if holder.on_slurm() and holder.host != host else None


def slurm_state(job_id: str, slurm: Mapping[str, str] | None = None) -> str | None:
    """The job's SLURM state from `slurm` (`slurm_states`), else from its own squeue; ''
    when SLURM no longer knows it, None without squeue."""
    if slurm is not None and job_id in slurm:
        return slurm[job_id]
    return _slurm_state(job_id)


def _slurm_state(job_id: str) -> str | None:
    """The job's SLURM state ('' when SLURM no longer knows it), or None without squeue."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                             text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return "" if "Invalid job id" in out.stderr else None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


__all__ = ["Holder", "RunBusy", "UnreadableLock", "acquire", "hold", "load", "read", "release",
           "slurm_state", "slurm_states", "squeue_job", "stale_reason"]
