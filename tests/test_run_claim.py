"""`run-claim` end to end on a tiny digits arm: plan, train, evaluate, verify, resume."""

from __future__ import annotations

import json

import pytest
from claimsutil import claim, claims_folder, own_count
from typer.testing import CliRunner

from trades_repro.cli import app

runner = CliRunner()
TINY = {"data.train_subset": 640, "optim.epochs": 3, "method.attack.steps": 3,
        "method.attack.step_size": 0.04, "evaluation.n_examples": 12,
        "evaluation.attacks": ["pgd10", "square"], "evaluation.square_queries": 200}


def _folder(tmp_path, **overrides):
    arms = {"tiny": {"label": "tiny digits", "tiers": {"instant": {
        "set": {**TINY, **overrides}, "seeds": 2}}}}
    claims = [
        own_count("table_9.rate", "tiny", 0, 2),
        claim("table_9.prop", "property", values_from="ours",
              test={"name": "pytest", "node": "tests/test_metrics.py::test_sgcs_known_values"}),
    ]
    return claims_folder(tmp_path, arms, claims)


@pytest.mark.slow
def test_run_claim_trains_evaluates_verifies_and_then_skips_everything(tmp_path):
    folder, runs = _folder(tmp_path), tmp_path / "runs"
    args = ["run-claim", "all", "--tier", "instant", "--claims-dir", str(folder),
            "--runs-dir", str(runs), "--quiet"]
    first = runner.invoke(app, args)
    assert first.exit_code in (0, 1), first.output  # the rate may fail; it must be judged
    assert "2 runs (0 finished, 0 to evaluate, 0 to resume, 2 to train), 1 property" in \
        first.stdout
    report = (runs / "report_instant.md").read_text()
    assert "`table_9.rate`" in report and "not run" not in report
    prop = json.loads((runs / "_properties" / "table_9.prop.json").read_text())
    assert prop["outcome"] == "passed" and prop["git_sha"]
    evals = [json.loads(p.read_text()) for p in runs.glob("*/eval.json")]
    assert len(evals) == 2
    assert all({"pgd10", "square"} <= set(next(iter(e["checkpoints"].values()))["attacks"])
               for e in evals)
    again = runner.invoke(app, args)
    assert again.exit_code == first.exit_code
    assert "2 runs (2 finished, 0 to evaluate, 0 to resume, 0 to train)" in again.stdout


@pytest.mark.slow
def test_a_failed_run_does_not_stop_the_others_and_exits_1(tmp_path):
    folder, runs = _folder(tmp_path, **{"optim.lr": 1e12}), tmp_path / "runs"
    result = runner.invoke(app, ["run-claim", "all", "--tier", "instant", "--claims-dir",
                                 str(folder), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("failed: ") == 2 and "Traceback" not in result.stderr
    assert (runs / "_properties" / "table_9.prop.json").is_file()  # the rest still ran


def test_an_unexpected_error_in_a_run_exits_4_not_1(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("our own bug")

    monkeypatch.setattr("trades_repro.train.train", broken)
    folder, runs = _folder(tmp_path), tmp_path / "runs"
    result = runner.invoke(app, ["run-claim", "table_9.rate", "--tier", "instant",
                                 "--claims-dir", str(folder), "--runs-dir", str(runs),
                                 "--quiet"])
    assert result.exit_code == 4, result.output
    assert "KeyError" in result.stderr and "traceback in" in result.stderr
