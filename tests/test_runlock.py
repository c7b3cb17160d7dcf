"""The run lock: one holder per run folder; a stale holder (process or job gone) taken over."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace

import pytest
import yaml
from factories import assert_one_line_error, digits
from typer.testing import CliRunner

from trades_repro import runlock
from trades_repro.cli import app


def _plant(run_dir, **fields) -> runlock.Holder:
    """A lock file as another process would have left it."""
    holder = replace(runlock.Holder.me(), token="theirs", **fields)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runlock.LOCK_FILE).write_text(json.dumps(asdict(holder)))
    return holder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    me = runlock.acquire(tmp_path)
    assert runlock.read(tmp_path) == me and me.pid > 0 and me.host
    runlock.release(tmp_path, me)
    assert runlock.read(tmp_path) is None
    log = (tmp_path / runlock.LOG_FILE).read_text()
    assert "acquired by" in log and "released by" in log


def test_a_garbled_metrics_file_does_not_stop_the_lock(tmp_path):
    """metrics.jsonl only hints the ETA (resume rebuilds it from last.pt): bytes that are
    not UTF-8 in it crashed acquire with UnicodeDecodeError, exit 4."""
    (tmp_path / "metrics.jsonl").write_bytes(b"\xff\xfe\n{\"epoch\": 2}\n")
    holder = runlock.acquire(tmp_path)
    assert holder.epoch == 2
    runlock.release(tmp_path, holder)


def test_a_live_holder_makes_the_run_busy(tmp_path):
    _plant(tmp_path)  # this very process: alive
    with pytest.raises(runlock.RunBusy, match="being trained by"):
        runlock.acquire(tmp_path)
    assert runlock.read(tmp_path).token == "theirs"


def test_a_dead_process_lock_is_taken_over_and_logged(tmp_path):
    pid = _dead_pid()
    _plant(tmp_path, pid=pid)
    me = runlock.acquire(tmp_path)
    assert runlock.read(tmp_path).token == me.token
    assert f"took over by {me.describe()}: process {pid}" in \
        (tmp_path / runlock.LOG_FILE).read_text()


def test_a_reused_pid_is_another_process(tmp_path):
    _plant(tmp_path, pid_start="1")  # our pid, but a process that started at boot
    assert runlock.acquire(tmp_path).token != "theirs"


def test_a_requeued_slurm_task_takes_its_old_lock_over(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "current_job_id", lambda: "4242_3")
    _plant(tmp_path, host="node-a", pid=12345, job_id="4242_3")
    runlock.acquire(tmp_path)
    assert "job 4242_3 was requeued" in (tmp_path / runlock.LOG_FILE).read_text()


@pytest.mark.parametrize(("state", "stale"), [("RUNNING", False), ("", True),
                                              ("CANCELLED", True), (None, False)])
def test_another_hosts_lock_asks_slurm_then_the_heartbeat(tmp_path, monkeypatch, state,
                                                           stale):
    monkeypatch.setattr(runlock, "_slurm_state", lambda job: state)
    holder = _plant(tmp_path, host="node-b", pid=1, job_id="77", scheduler="slurm")
    reason = runlock.stale_reason(holder, tmp_path)
    assert (reason is not None) == stale


def test_without_slurm_a_silent_heartbeat_is_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "_slurm_state", lambda job: None)
    holder = _plant(tmp_path, host="node-b", pid=1)
    assert runlock.stale_reason(holder, tmp_path) is None
    old = time.time() - runlock.STALE_AFTER_S - 5
    import os

    os.utime(tmp_path / runlock.LOCK_FILE, (old, old))
    assert "no heartbeat" in runlock.stale_reason(holder, tmp_path)


def test_two_takers_of_one_stale_lock_take_it_once(tmp_path):
    _plant(tmp_path, pid=_dead_pid())
    results, barrier = [], threading.Barrier(4)

    def take() -> None:
        barrier.wait()
        try:
            results.append(runlock.acquire(tmp_path))
        except runlock.RunBusy:
            results.append(None)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r is not None for r in results) == 1
    assert (tmp_path / runlock.LOG_FILE).read_text().count("took over") == 1


def test_hold_releases_on_error_and_beats(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with pytest.raises(KeyError), runlock.hold(tmp_path):
        lock = tmp_path / runlock.LOCK_FILE
        before = lock.stat().st_mtime_ns
        deadline = time.monotonic() + 10  # a beat, however late a loaded machine runs it
        while lock.stat().st_mtime_ns == before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.stat().st_mtime_ns > before
        raise KeyError("boom")
    assert not (tmp_path / runlock.LOCK_FILE).exists()


def test_a_ctrl_c_while_the_heartbeat_starts_still_releases_the_lock(tmp_path, monkeypatch):
    """The lock exists as soon as it is taken; the release used to be guarded only after the
    heartbeat thread had started, which waits for that thread to be scheduled. A Ctrl-C in
    that wait (a launcher stopping a run just started, on a loaded machine) left the lock
    held by a dead process."""
    def interrupted(self):
        assert runlock.read(tmp_path) is not None  # taken already
        raise KeyboardInterrupt

    monkeypatch.setattr(runlock.threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt), runlock.hold(tmp_path):
        pytest.fail("the block must not run")
    assert runlock.read(tmp_path) is None
    log = (tmp_path / runlock.LOG_FILE).read_text()
    assert "acquired by" in log and "released by" in log


def test_train_refuses_a_run_another_process_holds(tmp_path):
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(digits()))
    from trades_repro.spec import load_spec
    from trades_repro.store import run_dir_for

    runs = tmp_path / "runs"
    _plant(run_dir_for(load_spec(spec_file), runs))
    result = CliRunner().invoke(app, ["train", str(spec_file), "--runs-dir", str(runs)])
    assert_one_line_error(result, "being trained by")


def test_a_second_taker_that_saw_the_same_stale_lock_does_not_take_it_again(tmp_path):
    """The race of two takers, made deterministic: both read the same stale holder; only the
    first may take the lock, and a take-over in progress elsewhere stops a third (the threaded
    race test almost never reaches this code: the first taker's live pid turns others away)."""
    stale = replace(runlock.Holder.me(), token="theirs", pid=_dead_pid())
    (tmp_path / runlock.LOCK_FILE).write_text(json.dumps(asdict(stale)))
    first, second = runlock.Holder.me(), runlock.Holder.me()
    assert runlock._take_over(tmp_path, stale, first, "gone")
    assert not runlock._take_over(tmp_path, stale, second, "gone")
    assert runlock.read(tmp_path).token == first.token
    (tmp_path / runlock.TAKEOVER_FILE).write_text("{}")
    assert not runlock._take_over(tmp_path, runlock.read(tmp_path), second, "gone")
    assert runlock.read(tmp_path).token == first.token
