"""Crash safety: a run killed at any moment resumes to the same bytes an unbroken run writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from factories import digits

from trades_repro import store
from trades_repro import train as trainlib
from trades_repro.spec import parse_spec

# Healing with threshold 0 fires every epoch, so Algorithm 1's counter must survive resumes;
# App. G metrics exercise batches.jsonl; 4 short epochs.
RESUMABLE = digits(optim={"epochs": 4}, monitor={"batch_metrics": True},
                   healing={"enabled": True, "fosc_threshold": 0.0, "noise_batches": 3})
EVIDENCE = (store.METRICS_FILE, store.BATCHES_FILE, store.BEST_FILE, store.CHECKPOINTS_FILE)


def _evidence(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in EVIDENCE}


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_step", [10, 27])  # last step of epoch 1; mid epoch 3
def test_interrupted_run_resumes_to_identical_evidence(tmp_path, monkeypatch, crash_step):
    spec = parse_spec(RESUMABLE)
    reference = trainlib.train(spec, tmp_path / "ref", progress=False).run_dir
    real_step, calls = trainlib.train_step, {"n": 0}

    def crashing(*args):
        calls["n"] += 1
        if calls["n"] == crash_step:
            raise Crash
        return real_step(*args)

    monkeypatch.setattr(trainlib, "train_step", crashing)
    with pytest.raises(Crash):
        trainlib.train(spec, tmp_path / "cut", progress=False)
    monkeypatch.setattr(trainlib, "train_step", real_step)
    resumed = trainlib.train(spec, tmp_path / "cut", progress=False)
    assert not resumed.skipped
    assert _evidence(resumed.run_dir) == _evidence(reference)
    provenance = store.read_json(resumed.run_dir / store.PROVENANCE_FILE)
    assert provenance["status"] == "finished"
    committed = (crash_step - 1) // 10  # 10 steps per epoch; epoch 1 never committed: restart
    assert [r["epoch"] for r in provenance["resumed"]] == ([committed] if committed else [])


def _train_command(spec_file: Path, runs: Path) -> list[str]:
    return [sys.executable, "-m", "trades_repro", "train", str(spec_file),
            "--runs-dir", str(runs), "--quiet"]


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}


def _committed_epoch(run_dir: Path) -> int:
    path = run_dir / store.LAST_FILE
    if not path.exists():
        return 0
    return torch.load(path, weights_only=True, map_location="cpu")["state"]["epoch"]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_sigkill_at_any_moment_loses_nothing_and_changes_nothing(tmp_path):
    """Really kill -9 a training subprocess three times, then let it finish."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(RESUMABLE))
    run_dir = tmp_path / "cut" / parse_spec(RESUMABLE).digest()
    subprocess.run(_train_command(spec_file, tmp_path / "ref"), env=_env(), check=True,
                   timeout=600)
    reference = tmp_path / "ref" / run_dir.name
    for wait_for in (
        lambda: (run_dir / store.PROVENANCE_FILE).exists(),  # during epoch 1
        lambda: _lines(run_dir / store.METRICS_FILE) >= 2,  # right after a commit
        lambda: _lines(run_dir / store.BATCHES_FILE) >= 25,  # mid-epoch 3
    ):
        proc = subprocess.Popen(_train_command(spec_file, tmp_path / "cut"), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not wait_for() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        finished_before = _lines(run_dir / store.METRICS_FILE)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _committed_epoch(run_dir) >= finished_before  # no finished epoch lost
    subprocess.run(_train_command(spec_file, tmp_path / "cut"), env=_env(), check=True,
                   timeout=600)
    assert _evidence(run_dir) == _evidence(reference)
    assert store.read_json(run_dir / store.PROVENANCE_FILE)["status"] == "finished"
