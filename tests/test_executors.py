"""Executors: inline, local processes and SLURM (through submitit) train each digest once."""

from __future__ import annotations

import gc
import json
import os
import pickle
import signal
import stat
import threading
import time
from pathlib import Path

import pytest
from factories import assert_one_line_error, digits

from trades_repro import executors, runclaim, runlock
from trades_repro.errors import BadInput
from trades_repro.spec import ExperimentSpec

# 640 images, 2 epochs: passes evaluation's pre-flight (above-chance clean accuracy); ~5 s
TINY = {"data": {"train_subset": 640, "val_size": 100}, "optim": {"epochs": 2},
        "validation": {"steps": 3}, "monitor": {"sgcs": False},
        "evaluation": {"n_examples": 12, "attacks": ["pgd10"]}}
POLICIES = ("best_pgd10",)


def _spec(seed: int = 0, **extra) -> ExperimentSpec:
    return ExperimentSpec.model_validate(digits(seed=seed, **{**TINY, **extra}))


def _job(spec: ExperimentSpec, runs: Path) -> executors.RunJob:
    return executors.RunJob(spec.model_dump(mode="json"), str(runs), POLICIES, "tiny")


def _planned(spec: ExperimentSpec, runs: Path) -> runclaim.PlannedRun:
    return runclaim.PlannedRun(spec, ("tiny",), runclaim.run_state(spec, runs, POLICIES), POLICIES)


# ------------------------------------------------------------------------------ plumbing

def test_slots_go_round_robin_over_the_gpus_with_at_most_k_each():
    assert executors.slot_devices(["0", "1"], None, 2) == ["0", "1", "0", "1"]
    assert executors.slot_devices(["0", "1"], 3, 2) == ["0", "1", "0"]
    assert executors.slot_devices(["0", "1"], 9, 1) == ["0", "1"]  # capped by jobs-per-gpu
    assert executors.slot_devices([], 2, 1) == [None, None]  # CPU: --jobs processes
    assert executors.slot_devices([], None, 1) == [None]


def test_gpu_parameters_pin_one_device_per_process(monkeypatch):
    assert executors.gpu_parameters("3") == {"gpus_per_node": 1, "visible_gpus": (3,)}
    assert executors.gpu_parameters(None) == {"gpus_per_node": 0}
    assert "CUDA_VISIBLE_DEVICES=GPU-ab" in executors.gpu_parameters("GPU-ab")["setup"][0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert executors.visible_gpus() == ["2", "5"]  # the parent's ids, not 0..n-1


@pytest.mark.parametrize(("value", "minutes"), [(90, 90), ("90", 90), ("2:00:00", 120),
                                                ("1-12:00:00", 2160), ("0:30:01", 31)])
def test_slurm_time_in_minutes(value, minutes):
    assert executors.SlurmConfig(time=value).minutes() == minutes


def test_bad_executor_input_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="unknown 'cloud'"):
        executors.build("cloud", tmp_path, config=executors.ExecutorConfig())
    with pytest.raises(BadInput, match="time"):
        executors.build("slurm", tmp_path, config=executors.ExecutorConfig(),
                        overrides={"time": "soon"})
    with pytest.raises(BadInput) as caught:  # no 'time.constrained-int': the field alone
        executors.build("slurm", tmp_path, config=executors.ExecutorConfig(),
                        overrides={"time": 0})
    assert str(caught.value) == "--executor slurm: time: Input should be greater than or equal to 1"
    bad = tmp_path / "bad.yaml"
    bad.write_text("slurm: {partitoin: gpu}\n")
    with pytest.raises(BadInput, match="bad.yaml"):
        executors.load_config(bad)


def test_the_example_config_loads_and_the_command_line_wins(monkeypatch):
    monkeypatch.setattr(executors.shutil, "which", lambda name: f"/usr/bin/{name}")  # a cluster
    example = Path(__file__).resolve().parents[1] / "spec" / "slurm.example.yaml"
    config = executors.load_config(example)
    slurm = executors.build("slurm", Path("runs"), config=config,
                            overrides={"partition": "other", "qos": None})
    assert slurm.config.partition == "other" and slurm.config.qos == config.slurm.qos


def test_a_run_job_pickles_and_requeues_as_itself(tmp_path):
    spec = _spec()
    job = _job(spec, tmp_path)
    assert job.digest == spec.digest()  # the JSON round trip keeps the digest
    again = pickle.loads(pickle.dumps(job.checkpoint()))  # what submitit does on USR2
    assert again.function.digest == spec.digest() and again.function.runs_dir == str(tmp_path)


# ----------------------------------------------------------------- failures and retries

def test_failed_runs_wait_for_retry_failed(tmp_path, monkeypatch):
    spec = _spec()
    executors.record_failure(tmp_path / spec.digest(), "TrainingError: non-finite loss")
    assert _planned(spec, tmp_path).state == "failed"
    calls = []
    monkeypatch.setattr(executors.RunJob, "_train_and_evaluate",
                        lambda self, report, progress: calls.append(self.digest))
    failures = runclaim.execute([_planned(spec, tmp_path)], tmp_path, report=print,
                                progress=False)
    assert not calls and "failed earlier: TrainingError" in failures[0][1]
    failures = runclaim.execute([_planned(spec, tmp_path)], tmp_path, report=print,
                                progress=False, retry_failed=True)
    assert calls == [spec.digest()] and not failures
    assert not (tmp_path / spec.digest() / executors.FAILED_FILE).exists()


def test_a_run_failure_is_recorded_and_an_interrupt_is_not(tmp_path):
    spec = _spec(optim={"lr": 1e12})
    outcome = _job(spec, tmp_path).run(print, progress=False)
    assert outcome.status == "failed" and "TrainingError" in outcome.message
    assert executors.failure(tmp_path / spec.digest()).startswith("TrainingError")
    other = tmp_path / "other"
    other.mkdir()
    (other / "provenance.json").write_text(json.dumps(
        {"status": "failed", "error": "KeyboardInterrupt: "}))
    assert executors.failure(other) is None  # Ctrl-C'd: resumed, not a failure


def test_a_run_held_elsewhere_is_left_to_its_holder(tmp_path, monkeypatch):
    spec = _spec()
    runlock.acquire(tmp_path / spec.digest())  # a live holder (this process)
    monkeypatch.setattr(executors.RunJob, "_train_and_evaluate",
                        lambda *a: pytest.fail("trained a held run"))
    lines = []
    planned = _planned(spec, tmp_path)
    assert planned.state == "running"  # seen at planning: not started at all
    assert runclaim.execute([planned], tmp_path, report=lines.append, progress=False) == []
    assert any("being trained by" in line and "left to it" in line for line in lines)
    raced = runclaim.PlannedRun(spec, ("tiny",), "train", POLICIES)  # taken after the plan
    assert runclaim.execute([raced], tmp_path, report=lines.append, progress=False) == []
    assert any("busy" in line and "being trained by" in line for line in lines)


def test_two_concurrent_launches_train_each_digest_once(tmp_path, monkeypatch):
    import trades_repro.train as trainlib

    trained, real = [], trainlib.train

    def counting(spec, runs_dir, **kwargs):
        result = real(spec, runs_dir, **kwargs)
        if not result.skipped:
            trained.append(spec.digest())
        return result

    monkeypatch.setattr(trainlib, "train", counting)
    specs = [_spec(seed) for seed in (0, 1)]
    plans = [[_planned(s, tmp_path) for s in specs] for _ in range(2)]
    launches = [threading.Thread(target=runclaim.execute, args=(p, tmp_path),
                                 kwargs={"report": lambda line: None, "progress": False})
                for p in plans]
    for launch in launches:
        launch.start()
    for launch in launches:
        launch.join()
    assert sorted(trained) == sorted(s.digest() for s in specs)
    assert all(_planned(s, tmp_path).state == "done" for s in specs)


# --------------------------------------------------------------------------- submitit

@pytest.mark.slow
def test_the_local_executor_runs_two_runs_in_two_processes(tmp_path):
    specs = [_spec(seed) for seed in (0, 1)]
    local = executors.build("local", tmp_path, config=executors.ExecutorConfig(),
                            overrides={"jobs": 2})
    outcomes = local.run([_job(s, tmp_path) for s in specs], print)
    assert sorted(o.status for o in outcomes) == ["done", "done"], outcomes
    jobs = {o.job_id for o in outcomes}
    assert len(jobs) == 2 and None not in jobs  # two submitit jobs, two processes
    for spec in specs:
        run_dir = tmp_path / spec.digest()
        assert _planned(spec, tmp_path).state == "done"
        assert json.loads((run_dir / executors.JOB_FILE).read_text())["job_id"] in jobs
        assert "start tiny" in (run_dir / executors.RUN_LOG).read_text()


@pytest.mark.slow
def test_a_killed_run_is_taken_up_and_ends_as_an_unbroken_one(tmp_path):
    spec = _spec(optim={"epochs": 4})
    broken, unbroken = tmp_path / "broken", tmp_path / "unbroken"
    local = executors.build("local", broken, config=executors.ExecutorConfig())
    handle = local._start(_job(spec, broken), None, print)
    run_dir = broken / spec.digest()
    deadline = time.time() + 120
    while not _epochs(run_dir) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(runlock.read(run_dir).pid, signal.SIGKILL)
    assert executors._collect(handle, _job(spec, broken)).status == "lost"
    assert 0 < _epochs(run_dir) < 4
    assert _planned(spec, broken).state == "resume"  # not failed: taken up next time
    assert _job(spec, broken).run(print, progress=False).status == "done"
    assert "took over" in (run_dir / runlock.LOG_FILE).read_text()
    assert _job(spec, unbroken).run(print, progress=False).status == "done"
    metrics = [(d / spec.digest() / "metrics.jsonl").read_text() for d in (broken, unbroken)]
    assert metrics[0] == metrics[1]


def _epochs(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_slurm_executor_runs_an_array_through_submitits_debug_executor(tmp_path):
    """(submitit's DebugJob leaves its log file handlers unclosed: ignored here, collected
    here.)"""
    config = executors.ExecutorConfig(slurm={"cluster": "debug", "partition": "gpu"})
    slurm = executors.build("slurm", tmp_path, config=config)
    specs = [_spec(seed) for seed in (0, 1)]
    outcomes = slurm.run([_job(s, tmp_path) for s in specs], print)
    assert [o.status for o in outcomes] == ["done", "done"], outcomes
    assert all(_planned(s, tmp_path).state == "done" for s in specs)
    gc.collect()


def test_the_sbatch_script_asks_for_an_array_that_requeues(tmp_path, monkeypatch):
    """A fake `sbatch` keeps the script submitit generates and answers with a job id
    (submitit also wants an `srun` on the PATH)."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "kept.sh"
    bin_dir.mkdir()
    for name, body in (("sbatch", f'cp "$1" {kept}\necho "Submitted batch job 4242"'),
                       ("srun", "exit 1")):
        fake = bin_dir / name
        fake.write_text(f"#!/bin/sh\n{body}\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    overrides = {"partition": "gpu", "time": "1-00:00:00", "gpus": 1, "cpus": 6, "mem_gb": 32,
                 "account": "lab", "qos": "normal"}
    slurm = executors.build("slurm", tmp_path, config=executors.ExecutorConfig(),
                            overrides=overrides)
    work = [_job(_spec(seed), tmp_path) for seed in (0, 1, 2)]
    outcomes = slurm.run(work, print)
    assert [o.job_id for o in outcomes] == ["4242_0", "4242_1", "4242_2"]
    assert {o.status for o in outcomes} == {"submitted"}
    script = kept.read_text()
    for line in ("--partition=gpu", "--array=0-2%3", "--requeue", "--signal=USR2@",
                 "--time=1440", "--gpus-per-node=1", "--cpus-per-task=6", "--mem=32GB",
                 "--account=lab", "--qos=normal"):
        assert f"#SBATCH {line}" in script, (line, script)
    job = json.loads((work[1].run_dir / executors.JOB_FILE).read_text())
    assert job["job_id"] == "4242_1" and job["executor"] == "slurm"


# -------------------------------------------------------------------------------- the CLI

def _claims(tmp_path) -> Path:
    from claimsutil import claim, claims_folder

    tiny = {"data.train_subset": 640, "data.val_size": 100, "optim.epochs": 2,
            "evaluation.n_examples": 12, "evaluation.attacks": ["pgd10"]}
    arms = {"tiny": {"label": "tiny digits", "tiers": {"instant": {"set": tiny, "seeds": 2}}}}
    return claims_folder(tmp_path, arms, [claim(
        "table_9.rate", "instability_rate", arm="tiny", values_from="ours",
        expected={"k": 0, "n": 2}, test={"name": "fisher_exact"})])


def test_run_claim_submits_to_slurm_and_says_how_to_follow(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from trades_repro.cli import app

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", 'echo "Submitted batch job 77"'), ("srun", "exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    runs = tmp_path / "runs"
    args = ["run-claim", "table_9.*", "--claims-dir", str(_claims(tmp_path)), "--runs-dir",
            str(runs), "--executor", "slurm", "--partition", "gpu", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "follow: trades-repro status 'table_9.*' --tier instant" in result.stdout
    jobs = sorted(json.loads(p.read_text())["job_id"] for p in runs.glob("*/job.json"))
    assert jobs == ["77_0", "77_1"]
    status = CliRunner().invoke(app, ["status", "--claims-dir", str(_claims(tmp_path)),
                                      "--runs-dir", str(runs), "--json"])
    (row,) = json.loads(status.stdout)
    assert row["pending"] == 2 and {r["job_id"] for r in row["runs"]} == {"77_0", "77_1"}


def test_run_claim_rejects_an_unknown_executor_in_one_line(tmp_path):
    from factories import assert_one_line_error
    from typer.testing import CliRunner

    from trades_repro.cli import app

    result = CliRunner().invoke(app, ["run-claim", "table_9.*", "--claims-dir",
                                      str(_claims(tmp_path)), "--runs-dir",
                                      str(tmp_path / "runs"), "--executor", "cloud"])
    assert_one_line_error(result, "--executor: unknown 'cloud'")


def test_slurm_without_sbatch_or_srun_is_bad_input_before_anything_starts(tmp_path,
                                                                          monkeypatch):
    """Off a cluster, submitit raised 'Could not detect "srun"' mid-launch, after the
    property tests had started: exit 4, 'failed unexpectedly'."""
    from typer.testing import CliRunner

    from trades_repro.cli import app

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))  # sbatch, no srun
    with pytest.raises(BadInput, match=r"--executor slurm: srun not found on PATH"):
        executors.build("slurm", tmp_path, config=executors.ExecutorConfig())
    debug = executors.ExecutorConfig(slurm={"cluster": "debug"})
    assert executors.build("slurm", tmp_path, config=debug).config.cluster == "debug"

    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run-claim", "table_9.*", "--claims-dir",
                                      str(_claims(tmp_path)), "--runs-dir", str(runs),
                                      "--executor", "slurm", "--quiet"])
    assert_one_line_error(result, "--executor slurm: sbatch and srun not found on PATH",
                          "--executor local")
    assert not runs.exists()  # no property tests, no run folder
