"""Scale-out defects an audit reproduced (fake `squeue`/`sbatch`, a second host faked): the
run lock across hosts and schedulers, relaunches, login nodes, site refusals, time limits,
interrupts, corrupt run folders and options of the wrong executor."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
import torch
from claimsutil import claim, claims_folder
from factories import assert_one_line_error
from typer.testing import CliRunner

from trades_repro import executors, runclaim, runlock, status
from trades_repro.claims import load_catalogue
from trades_repro.cli import app
from trades_repro.errors import BadInput

runner = CliRunner()
TINY = {"data.train_subset": 640, "data.val_size": 100, "optim.epochs": 2,
        "evaluation.n_examples": 12, "evaluation.attacks": ["pgd10"]}
POLICIES = ("best_pgd10",)


def _claims(tmp_path: Path, tier: str = "instant") -> Path:
    arms = {"tiny": {"label": "tiny digits", "tiers": {tier: {"set": TINY, "seeds": 2}}}}
    return claims_folder(tmp_path, arms, [claim(
        "table_9.rate", "instability_rate", arm="tiny", values_from="ours",
        expected={"k": 0, "n": 2}, test={"name": "fisher_exact"})])


def _specs(folder: Path, tier: str = "instant"):
    return load_catalogue(folder).specs("tiny", tier)


def _lock(run_dir: Path, **fields) -> None:
    """A lock file as another launch would have left it (without `scheduler`: as written
    before the scheduler was recorded)."""
    holder = {"host": "node-b", "pid": 5984, "pid_start": None, "job_id": None,
              "token": "theirs", "acquired": time.time(), "epoch": 0, **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runlock.LOCK_FILE).write_text(json.dumps(holder))


def _live_lock(run_dir: Path) -> None:
    """A lock held by this very process, under another token: a live launch."""
    me = runlock.Holder.me()
    _lock(run_dir, host=me.host, pid=me.pid, pid_start=me.pid_start, job_id="7_0",
          scheduler="slurm")


def _bin(tmp_path: Path, monkeypatch, **scripts: str) -> None:
    """Fake commands (`squeue`, `sbatch`, `srun`) first on the PATH."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


SQUEUE_FORGETS = 'echo "$*" >> "$(dirname "$0")/squeue.log"\n' \
    'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1'
# every job asked about is in STATE; "-o %i %T" lists "<id> <state>", "-o %T" the state alone
SQUEUE_KNOWS = '''ids=$(echo "$*" | sed -n 's/.*-j \\([^ ]*\\).*/\\1/p' | tr , ' ')
for id in $ids; do
  case "$*" in *"%i %T"*) echo "$id ${STATE:-PENDING}" ;; *) echo "${STATE:-PENDING}" ;; esac
done'''


# ------------------------------------------- 1. a local-executor run on another host

def test_a_live_local_executor_run_on_another_host_is_not_taken_over(tmp_path, monkeypatch):
    """Local job ids are controller pids: squeue's 'Invalid job id' said nothing about them,
    and a launch on another node whose local job had the same number took it for itself,
    requeued."""
    _bin(tmp_path, monkeypatch, squeue=SQUEUE_FORGETS)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")  # this launch: local job 5984 too
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "5984")
    _lock(tmp_path / "legacy", job_id="5984")
    _lock(tmp_path / "local", job_id="5984", scheduler="local")
    for run_dir in (tmp_path / "legacy", tmp_path / "local"):
        with pytest.raises(runlock.RunBusy, match="node-b pid 5984"):
            runlock.acquire(run_dir)
    assert not (tmp_path / "bin" / "squeue.log").exists()  # a pid is no SLURM job id
    _lock(tmp_path / "slurm", job_id="5984", scheduler="slurm")
    runlock.acquire(tmp_path / "slurm")
    assert "job 5984 is gone" in (tmp_path / "slurm" / runlock.LOG_FILE).read_text()


def test_the_holder_records_the_scheduler_of_its_job(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "5984")
    me = runlock.Holder.me()
    assert (me.scheduler, me.job_id) == ("local", "5984")


def test_status_asks_squeue_only_about_slurm_jobs(tmp_path, monkeypatch):
    folder = _claims(tmp_path)
    runs = tmp_path / "runs"
    _bin(tmp_path, monkeypatch, squeue=SQUEUE_FORGETS)
    for spec in _specs(folder):
        _lock(runs / spec.digest(), job_id="5984", scheduler="local")
    catalogue = load_catalogue(folder)
    (row,) = status.collect(catalogue, catalogue.select(), runs)
    assert [r.state for r in row.runs] == ["running", "running"]
    assert not (tmp_path / "bin" / "squeue.log").exists()


# --------------------------------------------------------- 2. an unreadable lock

GARBLED = ["", '{"host": "vm", "pid"', "garbage", "[]",
           json.dumps({"host": "vm", "pid": "x", "pid_start": None, "job_id": None,
                       "token": "t", "acquired": 0.0})]


@pytest.mark.parametrize("text", GARBLED)
def test_an_unreadable_lock_is_taken_over_once_it_is_old(tmp_path, text):
    lock = tmp_path / runlock.LOCK_FILE
    lock.write_text(text)
    with pytest.raises(runlock.RunBusy):  # seconds old: left alone for now
        runlock.acquire(tmp_path)
    old = time.time() - 60
    os.utime(lock, (old, old))
    me = runlock.acquire(tmp_path)
    assert runlock.read(tmp_path) == me
    log = (tmp_path / runlock.LOG_FILE).read_text()
    assert f"took over by {me.describe()}: unreadable lock" in log


def test_status_notes_an_unreadable_lock(tmp_path):
    folder = _claims(tmp_path)
    runs = tmp_path / "runs"
    spec = _specs(folder)[0]
    (runs / spec.digest()).mkdir(parents=True)
    (runs / spec.digest() / runlock.LOCK_FILE).write_text(GARBLED[-1])
    result = runner.invoke(app, ["status", "--claims-dir", str(folder), "--runs-dir",
                                 str(runs), "--tier", "instant", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["runs"][0]["state"] == "pending"
    assert row["runs"][0]["note"].startswith("unreadable lock")


# ----------------------------------------------------------- 3. a SLURM relaunch

def test_a_run_another_launch_holds_is_running_not_to_train(tmp_path):
    spec = _specs(_claims(tmp_path))[0]
    _live_lock(tmp_path / "runs" / spec.digest())
    assert runclaim.run_state(spec, tmp_path / "runs", POLICIES) == "running"


def test_a_slurm_relaunch_submits_only_what_is_neither_held_nor_queued(tmp_path, monkeypatch):
    folder, runs = _claims(tmp_path), tmp_path / "runs"
    held, free = _specs(folder)
    _live_lock(runs / held.digest())
    _bin(tmp_path, monkeypatch, srun="exit 1", squeue=SQUEUE_KNOWS,
         sbatch='echo x >> "$(dirname "$0")/sbatch.log"; echo "Submitted batch job 77"')
    args = ["run-claim", "table_9.*", "--claims-dir", str(folder), "--runs-dir", str(runs),
            "--executor", "slurm", "--partition", "gpu", "--quiet"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert not (runs / held.digest() / executors.JOB_FILE).exists()
    assert json.loads((runs / free.digest() / executors.JOB_FILE).read_text())["job_id"] == "77"
    again = runner.invoke(app, args)  # squeue: job 77 is PENDING
    assert again.exit_code == 0, again.output
    assert (tmp_path / "bin" / "sbatch.log").read_text().count("x") == 1
    assert "1 run(s) left to other launches (1 being trained)" in first.stdout
    assert "2 run(s) left to other launches (1 being trained, 1 queued in SLURM)" in \
        again.stdout


# --------------------------------------------------------- 4. wait on a login node

def test_waiting_for_slurm_needs_no_gpu_on_the_login_node(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _bin(tmp_path, monkeypatch, sbatch="exit 1", srun="exit 1")

    def submitted(self, work, report):
        raise BadInput(f"reached submission of {len(work)} runs")

    monkeypatch.setattr(executors.Slurm, "run", submitted)
    config = tmp_path / "slurm.yaml"
    config.write_text("slurm:\n  partition: gpu\n  wait: true\n")
    result = runner.invoke(app, [
        "run-claim", "table_9.*", "--tier", "full", "--claims-dir",
        str(_claims(tmp_path, "full")), "--runs-dir", str(tmp_path / "runs"),
        "--executor", "slurm", "--executor-config", str(config), "--quiet"])
    assert_one_line_error(result, "reached submission of 2 runs")


# ---------------------------------------------------------- 5. the site refuses

def test_a_job_the_site_refuses_is_bad_input_with_sbatchs_line(tmp_path, monkeypatch):
    _bin(tmp_path, monkeypatch, srun="exit 1", sbatch=(
        'echo "sbatch: error: Batch job submission failed: Invalid partition name '
        'specified" >&2; exit 1'))
    result = runner.invoke(app, [
        "run-claim", "table_9.*", "--claims-dir", str(_claims(tmp_path)), "--runs-dir",
        str(tmp_path / "runs"), "--executor", "slurm", "--partition", "nope", "--quiet"])
    assert_one_line_error(result, "sbatch", "Invalid partition name specified")


# -------------------------------------------------------------------- 6. time values

@pytest.mark.parametrize(("value", "minutes"), [("30:00", 30), ("1:30", 2), ("1-12", 2160),
                                                ("1-12:30", 2190), ("24:00:00", 1440)])
def test_slurm_times_read_as_sbatch_reads_them(value, minutes):
    assert executors.SlurmConfig(time=value).minutes() == minutes


@pytest.mark.parametrize("value", ["00:00:00", "0:00", "0-0", 527041, "367-00:00:00"])
def test_no_limit_and_absurd_limits_are_bad_input(tmp_path, value):
    with pytest.raises(BadInput, match="time"):
        executors.build("slurm", tmp_path, config=executors.ExecutorConfig(slurm={
            "cluster": "debug"}), overrides={"time": value})


@pytest.mark.parametrize(("clock", "minutes"), [("24:00:00", 1440), ("168:00:00", 10080)])
def test_an_unquoted_clock_time_in_yaml_is_refused_with_a_hint(tmp_path, clock, minutes):
    """YAML 1.1 reads 24:00:00 as the base-60 integer 86400: 60 days, taken as minutes."""
    config = tmp_path / "slurm.yaml"
    config.write_text(f"slurm:\n  time: {clock}\n")
    with pytest.raises(BadInput, match=r"slurm.yaml: slurm.time: .*quote it"):
        executors.load_config(config)
    config.write_text(f'slurm:\n  time: "{clock}"\n')
    assert executors.load_config(config).slurm.minutes() == minutes


# ------------------------------------------------------- 7. the launch that loses

@pytest.mark.parametrize("executor", ["inline", "local"])
def test_a_launch_whose_runs_are_all_held_says_so_and_starts_nothing(tmp_path, executor):
    folder, runs = _claims(tmp_path), tmp_path / "runs"
    for spec in _specs(folder):
        _live_lock(runs / spec.digest())
    result = runner.invoke(app, ["run-claim", "table_9.*", "--claims-dir", str(folder),
                                 "--runs-dir", str(runs), "--executor", executor, "--quiet"])
    assert result.exit_code == 3, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert "2 run(s) are being trained by another launch (" in line
    assert "job 7_0" in line and "follow them with `trades-repro status`" in line
    assert not list(runs.glob("*/job.json")) and not (runs / executors.SUBMITIT_DIR).exists()


def test_a_local_job_that_finds_its_run_busy_leaves_job_json_as_it_was(tmp_path):
    """Two launches planned at once: the loser's process finds the lock held."""
    spec = _specs(_claims(tmp_path))[0]
    runs = tmp_path / "runs"
    job = executors.RunJob(spec.model_dump(mode="json"), str(runs), POLICIES, "tiny")
    _live_lock(job.run_dir)
    before = json.dumps({"executor": "local", "job_id": "11", "where": "CPU"})
    (job.run_dir / executors.JOB_FILE).write_text(before)
    local = executors.build("local", runs, config=executors.ExecutorConfig())
    (outcome,) = local.run([job], lambda line: None)
    assert outcome.status == "busy"
    assert (job.run_dir / executors.JOB_FILE).read_text() == before


# ------------------------------------------------------- 8. brackets in the table

def test_status_table_keeps_text_in_brackets(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    folder, runs = _claims(tmp_path), tmp_path / "runs"
    stale, failed = _specs(folder)
    pid = _dead_pid()
    _lock(runs / stale.digest(), host=socket.gethostname(), pid=pid)
    executors.record_failure(runs / failed.digest(), "TrainingError: nan at epoch 3 [step 12]")
    result = runner.invoke(app, ["status", "--claims-dir", str(folder), "--runs-dir",
                                 str(runs)])
    assert result.exit_code == 0, result.output
    assert f"[stale lock: process {pid} on {socket.gethostname()} is gone]" in result.stdout
    assert "nan at epoch 3 [step 12]" in result.stdout


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -------------------------------------------- 9. signals to the launcher alone

class Sleeper:
    """A stand-in run: holds its lock for a minute (pickled by value into the job)."""

    label = "sleeper"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.digest = run_dir.name

    def __call__(self) -> None:
        with runlock.hold(self.run_dir):
            time.sleep(60)


class SlowToStop(Sleeper):
    """A run that takes 2 s to reach its lock's release after Ctrl-C, as one inside a long
    CUDA kernel or a compile does, or any run on a loaded machine: submitit's controller
    SIGKILLs its run 1 s after passing SIGINT on, which left such a lock stale."""

    def __call__(self) -> None:
        with runlock.hold(self.run_dir):
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                time.sleep(2)
                raise


class Terminated(Exception):  # noqa: N818 - what the test's own SIGTERM handler raises
    pass


def _signal_once_held(run_dir: Path, signum: int) -> None:
    deadline = time.time() + 60
    while runlock.read(run_dir) is None and time.time() < deadline:
        time.sleep(0.05)
    if runlock.read(run_dir) is not None:  # never after the test gave up
        os.kill(os.getpid(), signum)


@pytest.mark.parametrize(("signum", "kind"), [(signal.SIGINT, Sleeper),
                                             (signal.SIGTERM, Sleeper),
                                             (signal.SIGTERM, SlowToStop)])
def test_a_signal_to_the_launcher_stops_its_local_runs_and_frees_their_locks(tmp_path,
                                                                             signum, kind):
    def terminated(*_):
        raise Terminated

    job = kind(tmp_path / "run")
    local = executors.Local(executors.LocalConfig(jobs=1), tmp_path / "_submitit", 0.05)
    previous = signal.signal(signal.SIGTERM, terminated)  # the default would end pytest
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        job.run_dir.mkdir()
        threading.Thread(target=_signal_once_held, args=(job.run_dir, signum),
                         daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            local.run([job], lambda line: None)
        assert signal.getsignal(signal.SIGTERM) is terminated  # put back
        assert runlock.read(job.run_dir) is None
        assert "released by" in (job.run_dir / runlock.LOG_FILE).read_text()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        signal.signal(signal.SIGTERM, previous)
        left = runlock.read(job.run_dir)
        if left is not None:
            with contextlib.suppress(ProcessLookupError):  # died holding it: the failure
                os.kill(left.pid, signal.SIGKILL)


# ----------------------------------------------------------- 10. corrupt run folders

def _status(folder: Path, runs: Path, *extra: str):
    return runner.invoke(app, ["status", "--claims-dir", str(folder), "--runs-dir", str(runs),
                               "--tier", "instant", *extra])


def test_a_garbled_job_json_is_bad_input_naming_it(tmp_path):
    folder, runs = _claims(tmp_path), tmp_path / "runs"
    run_dir = runs / _specs(folder)[0].digest()
    run_dir.mkdir(parents=True)
    (run_dir / executors.JOB_FILE).write_text("garbage")
    assert_one_line_error(_status(folder, runs), str(run_dir / executors.JOB_FILE))


def test_a_file_where_a_run_folder_belongs_is_named_not_a_crash(tmp_path):
    folder, runs = _claims(tmp_path), tmp_path / "runs"
    runs.mkdir()
    path = runs / _specs(folder)[0].digest()
    path.write_text("not a folder")
    result = _status(folder, runs, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["runs"][0]["note"] == f"{path} is a file, not a run folder"
    dry = runner.invoke(app, ["run-claim", "table_9.*", "--claims-dir", str(folder),
                              "--runs-dir", str(runs), "--dry-run"])
    assert_one_line_error(dry, str(path), "not a run folder")


# ---------------------------------------------- 11. options of another executor

@pytest.mark.parametrize(("name", "given", "needles"), [
    ("inline", {"jobs": 4, "partition": "gpu"}, ["--jobs (local)", "--partition (slurm)"]),
    ("local", {"partition": "gpu", "gpus": 4}, ["--partition", "--gpus (slurm)"]),
    ("slurm", {"jobs_per_gpu": 2}, ["--jobs-per-gpu (local)"]),
])
def test_options_of_another_executor_are_refused(tmp_path, name, given, needles):
    config = executors.ExecutorConfig(slurm={"cluster": "debug"})
    with pytest.raises(BadInput, match=f"--executor {name} does not take") as refused:
        executors.build(name, tmp_path, config=config, overrides=given)
    for needle in needles:
        assert needle in str(refused.value)


def test_the_readmes_commands_still_build(tmp_path, monkeypatch):
    monkeypatch.setattr(executors.shutil, "which", lambda name: f"/usr/bin/{name}")
    config = executors.ExecutorConfig()
    assert executors.build("local", tmp_path, config=config,
                           overrides={"jobs_per_gpu": 2}).config.jobs_per_gpu == 2
    assert executors.build("local", tmp_path, config=config, overrides={"jobs": 2})
    slurm = executors.build("slurm", tmp_path, config=config, overrides={
        "partition": "gpu", "time": "24:00:00", "gpus": 1, "cpus": 8, "mem_gb": 32.0,
        "account": "myproj", "qos": "normal", "jobs": None})
    assert slurm.config.minutes() == 1440


def test_run_claim_refuses_another_executors_options_in_one_line(tmp_path):
    result = runner.invoke(app, ["run-claim", "table_9.*", "--claims-dir",
                                 str(_claims(tmp_path)), "--runs-dir", str(tmp_path / "runs"),
                                 "--jobs", "4", "--partition", "gpu", "--dry-run"])
    assert_one_line_error(result, "--executor inline does not take", "--jobs (local)",
                          "--partition (slurm)")


def test_demo_with_one_job_still_runs_inline(tmp_path, monkeypatch):
    import trades_repro.demo as demolib

    built = []
    real = executors.build
    monkeypatch.setattr(executors, "build", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(demolib, "plan", lambda catalogue, download: [])
    claims = Path(__file__).resolve().parents[1] / "claims"
    result = runner.invoke(app, ["demo", "--jobs", "1", "--runs-dir", str(tmp_path / "runs"),
                                 "--claims-dir", str(claims), "--quiet"])
    assert result.exit_code == 0, result.output
    assert built == ["inline"]


# ------------------------------------------------------------- 12. a missing runs dir

def test_status_of_a_missing_runs_dir_is_bad_input(tmp_path):
    folder = _claims(tmp_path)
    missing = tmp_path / "nowhere"
    result = runner.invoke(app, ["status", "--claims-dir", str(folder), "--runs-dir",
                                 str(missing)])
    assert_one_line_error(result, str(missing))
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, ["status", "--claims-dir", str(folder), "--runs-dir",
                                str(tmp_path / "empty")])
    assert empty.exit_code == 0, empty.output
