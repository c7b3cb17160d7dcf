"""`status`: done / running / failed / pending per claim and arm, from run folders alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from claimsutil import claim, claims_folder, write_run
from typer.testing import CliRunner

from trades_repro import executors, runlock, status
from trades_repro.claims import load_catalogue
from trades_repro.cli import app

SET = {"evaluation.attacks": ["pgd10", "square"], "evaluation.n_examples": 100}


@pytest.fixture
def fleet(tmp_path):
    """Four seeds of one arm: done, running (epoch 2 of 20 at 10 s/epoch), failed, and
    pending behind the stale lock of a killed process."""
    arms = {"tiny": {"label": "tiny digits", "tiers": {"instant": {"set": SET, "seeds": 4}}}}
    folder = claims_folder(tmp_path, arms, [claim(
        "table_9.rate", "instability_rate", arm="tiny", values_from="ours",
        expected={"k": 0, "n": 4}, test={"name": "fisher_exact"})])
    catalogue, runs = load_catalogue(folder), tmp_path / "runs"
    done, running, failed, pending = catalogue.specs("tiny", "instant")
    write_run(runs, done)
    run_dir = write_run(runs, running, status="running", fosc=[0.01, 0.01])
    started = time.time() - 100
    _plant(run_dir, acquired=started)
    os.utime(run_dir / "metrics.jsonl", (started + 20, started + 20))
    executors.record_failure(runs / failed.digest(), "TrainingError: non-finite loss")
    _plant(runs / pending.digest(), pid=_dead_pid())
    return folder, runs, (done, running, failed, pending)


def _plant(run_dir, **fields) -> None:
    holder = replace(runlock.Holder.me(), **{"token": "t", "job_id": "4242_1", **fields})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runlock.LOCK_FILE).write_text(json.dumps(asdict(holder)))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_each_run_gets_its_state_job_epoch_and_eta(fleet):
    folder, runs, specs = fleet
    rows = status.collect(load_catalogue(folder), load_catalogue(folder).select(), runs)
    assert len(rows) == 1 and rows[0].counts() == {"done": 1, "running": 1, "failed": 1,
                                                   "pending": 1}
    done, running, failed, pending = rows[0].runs
    assert (running.job_id, running.epoch, running.epochs) == ("4242_1", 2, 20)
    assert running.epoch_seconds == pytest.approx(10, abs=0.5)
    assert running.eta_seconds == pytest.approx(180, abs=10)
    assert failed.error == "TrainingError: non-finite loss"
    assert pending.note.startswith("stale lock: process")
    assert "epoch 2/20, 10 s/epoch, ETA 3 min (job 4242_1" in status.describe(running)


def test_a_garbled_metrics_file_still_counts_its_epochs(fleet):
    """metrics.jsonl is only read for progress here: bytes that are not UTF-8 (resume
    rebuilds the file from last.pt) crashed status with UnicodeDecodeError, exit 4."""
    folder, runs, (_, running, _, _) = fleet
    (runs / running.digest() / "metrics.jsonl").write_bytes(b"\xff\xfe\n\xff\n")
    result = CliRunner().invoke(app, ["status", "--runs-dir", str(runs), "--claims-dir",
                                 str(folder), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert [r["epoch"] for r in row["runs"] if r["state"] == "running"] == [2]


def test_the_cli_table_and_json(fleet):
    folder, runs, _ = fleet
    args = ["status", "--claims-dir", str(folder), "--runs-dir", str(runs)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert (row["claim"], row["tier"], row["arm"]) == ("table_9.rate", "instant", "tiny")
    assert [row[s] for s in status.STATES] == [1, 1, 1, 1]
    assert [r["state"] for r in row["runs"]] == ["done", "running", "failed", "pending"]
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "ETA" in table.stdout and "non-finite loss" in table.stdout


def test_without_a_tier_only_launched_tiers_show(tmp_path):
    full = {"set": {**SET, "optim.epochs": 3}, "seeds": 1}  # another digest than instant's
    arms = {"tiny": {"label": "tiny", "tiers": {"instant": {"set": SET, "seeds": 1},
                                                "full": full}}}
    folder = claims_folder(tmp_path, arms, [claim(
        "table_9.rate", "instability_rate", arm="tiny", values_from="ours",
        expected={"k": 0, "n": 1}, test={"name": "fisher_exact"})])
    catalogue, runs = load_catalogue(folder), tmp_path / "runs"
    assert status.collect(catalogue, catalogue.select(), runs) == []
    write_run(runs, catalogue.specs("tiny", "full")[0])
    assert [r.tier for r in status.collect(catalogue, catalogue.select(), runs)] == ["full"]
    rows = status.collect(catalogue, catalogue.select(), runs, tier="instant")
    assert rows[0].counts()["pending"] == 1


def _fake_squeue(tmp_path, monkeypatch, *, batch_fails: bool) -> Path:
    """An `squeue` on the PATH that logs its arguments: 700_0 runs, 700_1 is pending,
    700_2 is unknown to SLURM (ended). With `batch_fails`, a query of several ids fails."""
    bin_dir, log = tmp_path / "bin", tmp_path / "squeue.log"
    bin_dir.mkdir()
    script = bin_dir / "squeue"
    script.write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$*" in *,*) {"exit 1" if batch_fails else ":"} ;; esac
case "$*" in
  *"%i %T"*) echo "700_0 RUNNING"; echo "700_1 PENDING" ;;
  *"-j 700_0 "*) echo RUNNING ;;
  *"-j 700_1 "*) echo PENDING ;;
  *) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;
esac
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.mark.parametrize("batch_fails", [False, True])
def test_runs_held_on_other_hosts_cost_one_squeue(tmp_path, monkeypatch, batch_fails):
    """150 running runs on a cluster were 150 squeue calls per `status`; now one, and job by
    job only when that one fails (an id SLURM has purged)."""
    arms = {"tiny": {"label": "tiny digits", "tiers": {"instant": {"set": SET, "seeds": 3}}}}
    folder = claims_folder(tmp_path, arms, [claim(
        "table_9.rate", "instability_rate", arm="tiny", values_from="ours",
        expected={"k": 0, "n": 3}, test={"name": "fisher_exact"})])
    catalogue, runs = load_catalogue(folder), tmp_path / "runs"
    for task, spec in enumerate(catalogue.specs("tiny", "instant")):
        _plant(write_run(runs, spec, status="running"), host="node-b", job_id=f"700_{task}")
    log = _fake_squeue(tmp_path, monkeypatch, batch_fails=batch_fails)
    (row,) = status.collect(catalogue, catalogue.select(), runs)
    assert [r.state for r in row.runs] == ["running", "running", "pending"]
    assert row.runs[2].note == "stale lock: job 700_2 is gone"
    calls = log.read_text().splitlines()
    assert calls[0] == "-h -r -j 700_0,700_1,700_2 -o %i %T"
    assert len(calls) == (4 if batch_fails else 1)
