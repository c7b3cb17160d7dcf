"""A spec that asks for CUDA on a machine without it: exit 3 (needs a GPU), nothing failed.

Exit 1 would say the run failed, and a `failed.json` would make every later launch skip the
run until `--retry-failed`, even on a GPU node. These tests pretend CUDA is absent, so they
hold on a GPU machine too.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from claimsutil import claim, claims_folder
from factories import digits
from typer.testing import CliRunner

from trades_repro import executors, runclaim
from trades_repro.cli import app
from trades_repro.errors import Inconclusive, NeedsGPU

runner = CliRunner()


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_line_exit_3(result, needle: str) -> None:
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_train_on_cuda_without_a_gpu_exits_3_and_writes_nothing(tmp_path, no_cuda):
    spec = tmp_path / "cuda.yaml"
    spec.write_text(yaml.safe_dump(digits(device="cuda")))
    result = runner.invoke(app, ["train", str(spec), "--runs-dir", str(tmp_path / "runs"),
                                 "--quiet"])
    _one_line_exit_3(result, "device: 'cuda' requested but no CUDA device is available")
    assert not list((tmp_path / "runs").rglob("*.json"))  # no provenance, no failed.json


def test_run_claim_refuses_cuda_runs_before_training_any(tmp_path, no_cuda):
    arms = {"gpu": {"label": "digits on cuda", "tiers": {"instant": {
        "set": {"device": "cuda", "evaluation.attacks": ["pgd10", "square"]}, "seeds": 2}}}}
    folder = claims_folder(tmp_path, arms, [claim(
        "table_9.rate", "instability_rate", arm="gpu", values_from="ours",
        expected={"k": 0, "n": 2}, test={"name": "fisher_exact"})])
    result = runner.invoke(app, ["run-claim", "all", "--tier", "instant", "--claims-dir",
                                 str(folder), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    _one_line_exit_3(result, "2 run(s) to train ask for device: cuda")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("failed.json"))


def test_a_job_that_lands_without_a_gpu_is_not_marked_failed(tmp_path, monkeypatch):
    def no_gpu(self, report, progress):
        raise NeedsGPU("device: 'cuda' requested but no CUDA device is available")

    monkeypatch.setattr(executors.RunJob, "_train_and_evaluate", no_gpu)
    job = executors.RunJob(_spec().model_dump(mode="json"), str(tmp_path), ("best_pgd10",))
    job.run_dir.mkdir()
    outcome = job.run(lambda _: None, False)
    assert (outcome.status, outcome.message) == (
        "needs_gpu", "device: 'cuda' requested but no CUDA device is available")
    assert not (job.run_dir / executors.FAILED_FILE).exists()


def test_run_claim_turns_a_no_gpu_outcome_into_exit_3(tmp_path, monkeypatch):
    class NoGpuNode:
        def run(self, jobs, report):
            return [executors.Outcome(job.digest, "needs_gpu", "no CUDA") for job in jobs]

    planned = runclaim.PlannedRun(spec=_spec(), arms=("a",), state="train")
    with pytest.raises(Inconclusive, match=r"^1 run\(s\) found no CUDA GPU where they ran"):
        runclaim.execute([planned], tmp_path, report=lambda _: None, progress=False,
                         executor=NoGpuNode())


def _spec():
    from trades_repro.spec import parse_spec

    return parse_spec(digits())


def test_the_refusal_counts_and_names_only_pending_cuda_runs(no_cuda):
    from trades_repro.spec import parse_spec

    cuda = [parse_spec(digits(device="cuda", seed=s)) for s in (0, 1, 2)]
    done = runclaim.PlannedRun(spec=cuda[0], arms=("a",), state="done")
    first = runclaim.PlannedRun(spec=cuda[1], arms=("b", "c"), state="resume")
    second = runclaim.PlannedRun(spec=cuda[2], arms=("d",), state="train")
    on_cpu = runclaim.PlannedRun(spec=_spec(), arms=("e",), state="train")
    with pytest.raises(Inconclusive) as refused:
        runclaim.require_device("instant", [done, on_cpu, first, second])
    assert str(refused.value) == (f"2 run(s) to train ask for device: cuda (first: "
                                  f"{first.digest}, b, c) and no CUDA GPU is visible")
    runclaim.require_device("instant", [done, on_cpu])  # nothing to train on CUDA


def test_the_no_gpu_outcome_message_names_the_first_run(tmp_path):
    class NoGpuNode:
        def run(self, jobs, report):
            return [executors.Outcome(job.digest, "needs_gpu", "no CUDA") for job in jobs]

    planned = runclaim.PlannedRun(spec=_spec(), arms=("a",), state="train")
    with pytest.raises(Inconclusive) as refused:
        runclaim.execute([planned], tmp_path, report=lambda _: None, progress=False,
                         executor=NoGpuNode())
    assert str(refused.value) == (f"1 run(s) found no CUDA GPU where they ran (first: "
                                  f"{planned.digest}: no CUDA); nothing was marked failed")
