"""`--tf32`: TF32 for the attacks only when asked, as a record of its own that claims never use.

The pinned fp32 stays the default and keeps every existing record's key (`settings_key`
leaves ``tf32`` out when it is False); a TF32 record gets another key, runs its attacks with
TF32 set and restores the flags after, and `made_with` never takes it for a run's own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _evalutil import prototype_linear
from safetensors.torch import save_file
from test_evaluate import _data, _Linear, _settings
from typer.testing import CliRunner

from trades_repro import checklist, numerics, store
from trades_repro import diagnose as dg
from trades_repro import evaluate as ev
from trades_repro.cli import app
from trades_repro.evalfile import made_with, read_eval, write_eval
from trades_repro.records import EvalFile, EvalSettings, settings_key
from trades_repro.runclaim import is_evaluated
from trades_repro.spec import EvalSpec, parse_spec
from trades_repro.train import train
from trades_repro.verify import policy_record

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ("evidence/cpu", "docs/examples")  # folders whose eval.json files must resume
SHA = "a" * 64
runner = CliRunner()


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def restore_flags():
    before = numerics.current()
    yield
    numerics._apply(before)


def _start_from(tf32: bool) -> None:
    """The opposite of what the block must set, so that the block has to set it."""
    numerics._apply({"tf32_matmul": tf32, "tf32_cudnn": tf32, "cudnn_deterministic": False,
                     "cudnn_benchmark": False})


# ------------------------------------------------------------------------------ the key


@pytest.mark.parametrize("fingerprint", [None, "f" * 64])
def test_tf32_false_keeps_the_key_of_settings_written_without_the_field(fingerprint):
    settings = _settings(model_fingerprint=fingerprint)
    assert settings.tf32 is False  # the default: the pinned fp32
    unset = {"tf32"} | ({"model_fingerprint"} if fingerprint is None else set())
    old_text = settings.model_dump_json(exclude=unset)  # as written before the field existed
    assert "tf32" not in old_text
    old = EvalSettings.model_validate_json(old_text)  # an old record still reads
    assert old.tf32 is False and old == settings
    expected = hashlib.sha256(f"{SHA}|{old_text}".encode()).hexdigest()[:16]
    assert settings_key(SHA, settings) == settings_key(SHA, old) == expected


def _committed_records() -> list:
    records = []
    for folder in COMMITTED:
        for path in sorted((ROOT / folder).rglob(store.EVAL_FILE)):
            try:
                evals = EvalFile.model_validate_json(path.read_text())
            except ValueError:  # one we cannot read says nothing about keys
                continue
            records += [(path, r) for r in evals.checkpoints.values()]
    return records


def test_every_committed_eval_record_still_resumes():
    records = _committed_records()
    assert records, "no committed eval.json found: the check would check nothing"
    moved = [f"{path}: {r.key}" for path, r in records
             if r.key != settings_key(r.sha256, r.settings)]
    assert not moved
    assert not [r for _, r in records if r.settings.tf32]  # all made before the flag


def test_tf32_true_gives_another_key():
    fp32, tf32 = _settings(), _settings(tf32=True)
    assert settings_key(SHA, tf32) != settings_key(SHA, fp32)
    fingerprinted = _settings(model_fingerprint="f" * 64)
    assert (settings_key(SHA, fingerprinted.model_copy(update={"tf32": True}))
            != settings_key(SHA, fingerprinted))
    assert json.loads(tf32.model_dump_json())["tf32"] is True  # and it is written down


# ----------------------------------------------------------------------- the flags inside


class _Observed(_Linear):
    """`_Linear` (same weights) that notes the TF32 flags at every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[bool, bool]] = set()

    def forward(self, x):
        self.seen.add(_tf32_flags())
        return super().forward(x)


@pytest.mark.parametrize("tf32", [True, False])
def test_evaluate_model_sets_tf32_inside_only_when_asked_and_restores(restore_flags, tf32):
    _start_from(not tf32)
    x, y = _data()
    model = _Observed()
    record = ev.evaluate_model(model, x, y, _settings(tf32=tf32), ("pgd10",),
                               identity=("m", SHA, []))
    assert model.seen == {(tf32, tf32)}  # every forward: pre-flight, PGD-10, re-check, landscape
    assert record.backend["tf32_matmul"] is tf32 and record.backend["tf32_cudnn"] is tf32
    assert record.backend["cudnn_deterministic"] and not record.backend["cudnn_benchmark"]
    assert record.settings.tf32 is tf32 and record.complete
    assert _tf32_flags() == (not tf32, not tf32)  # restored on exit


@pytest.mark.parametrize("tf32", [True, False])
def test_the_checklist_follows_the_settings_tf32(restore_flags, monkeypatch, tf32):
    _start_from(not tf32)
    seen = []
    monkeypatch.setattr(checklist, "_items", lambda *args: seen.append(_tf32_flags()) or [])
    x, y = _data()
    checklist.run_checklist(_Linear(), x, y, _settings(tf32=tf32))
    assert seen == [(tf32, tf32)]
    assert _tf32_flags() == (not tf32, not tf32)


# ------------------------------------------------------------------ never a run's own


def _record(tf32: bool, policies: list[str] | None = None) -> ev.CheckpointEval:
    settings = _settings(tf32=tf32)
    return ev.CheckpointEval(checkpoint="best.safetensors", sha256=SHA, key=settings_key(
        SHA, settings), settings=settings, requested=["pgd10"], policies=policies or [])


def test_made_with_refuses_a_tf32_record():
    evaluation = EvalSpec(n_examples=12, square_queries=50)
    assert made_with(_record(False), evaluation)
    assert not made_with(_record(True), evaluation)
    assert not made_with(_record(True), SimpleNamespace(n_examples=None, square_queries=50))


def test_verify_takes_the_fp32_record_even_where_the_tf32_one_has_more(tmp_path):
    evaluation = EvalSpec(n_examples=12, square_queries=50)
    tf32 = _record(True, ["best_pgd10"])
    tf32.attacks["square"] = ev.AttackResult(name="square", paper_column="Square",
                                             accuracy=1.0, n_robust=1, n_examples=1,
                                             robust="1", seconds=0.0)
    evals = EvalFile(source=str(tmp_path), checkpoints={tf32.key: tf32})
    write_eval(tmp_path / store.EVAL_FILE, evals, "cpu")
    assert policy_record(tmp_path, "best_pgd10", evaluation) is None
    fp32 = _record(False, ["best_pgd10"])
    evals.checkpoints[fp32.key] = fp32
    write_eval(tmp_path / store.EVAL_FILE, evals, "cpu")
    assert policy_record(tmp_path, "best_pgd10", evaluation).key == fp32.key


# --------------------------------------------------------------------------- the CLI

TINY_RUN = {
    "name": "tf32_cli", "seed": 0, "device": "cpu",
    "data": {"dataset": "synthetic", "validation": "test"},
    "model": {"arch": "small_cnn", "width": 16},
    # a small ε so that 6 epochs on 512 images reach ~0.95 clean: 0.6 s on one core
    "method": {"beta": 1, "attack": {"eps": 0.02, "step_size": 0.01, "steps": 1}},
    "validation": {"eps": 0.02, "step_size": 0.005, "steps": 2},
    "optim": {"epochs": 6, "batch_size": 32},
    "evaluation": {"n_examples": 40, "attacks": ["pgd10"]},
}


def _backend_tf32(record) -> tuple[bool, bool]:
    return record.backend["tf32_matmul"], record.backend["tf32_cudnn"]


def test_evaluate_tf32_writes_a_record_of_its_own_that_run_claim_ignores(tmp_path,
                                                                           restore_flags):
    spec = parse_spec(TINY_RUN)
    run = train(spec, tmp_path / "runs", progress=False).run_dir
    result = runner.invoke(app, ["evaluate", str(run), "--tf32", "--quiet"])
    assert result.exit_code == 3, result.output  # PGD-10 alone: no verdict
    assert "TF32 attacks" in result.stdout
    (fast,) = read_eval(run / store.EVAL_FILE).checkpoints.values()
    assert fast.settings.tf32 and fast.complete and _backend_tf32(fast) == (True, True)
    assert not is_evaluated(run, spec, ("best_pgd10",))  # complete, but not the run's own
    result = runner.invoke(app, ["evaluate", str(run), "--quiet"])
    assert result.exit_code == 3, result.output
    records = read_eval(run / store.EVAL_FILE).checkpoints
    assert records[fast.key] == fast and len(records) == 2  # kept beside, not replaced
    (own,) = [r for r in records.values() if r.key != fast.key]
    assert not own.settings.tf32 and _backend_tf32(own) == (False, False)
    assert own.settings == fast.settings.model_copy(update={"tf32": False})
    assert is_evaluated(run, spec, ("best_pgd10",))
    assert policy_record(run, "best_pgd10", spec.evaluation).key == own.key


def test_diagnose_tf32_and_without_make_two_records(tmp_path, monkeypatch, restore_flags):
    (tmp_path / "tf32_nets.py").write_text(
        "from torch import nn\n\n\ndef linear():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    weights, out = tmp_path / "linear.safetensors", tmp_path / "out"
    save_file(prototype_linear().state_dict(), weights)
    args = ["diagnose", str(weights), "--dataset", "digits", "--eps", "0.1", "--factory",
            "tf32_nets:linear", "--attacks", "pgd10", "--n-examples", "20", "--out", str(out),
            "--quiet", "--json"]
    fast = runner.invoke(app, [*args, "--tf32"])
    assert fast.exit_code == 3, fast.output
    printed = json.loads(fast.stdout)
    assert printed["settings"]["tf32"] is True and printed["backend"]["tf32_cudnn"] is True
    pinned = runner.invoke(app, args)
    assert pinned.exit_code == 3, pinned.output
    records = read_eval(out / store.EVAL_FILE).checkpoints
    assert set(records) == {printed["key"], json.loads(pinned.stdout)["key"]}
    assert len(records) == 2
    assert sorted(r.settings.tf32 for r in records.values()) == [False, True]
    assert all(_backend_tf32(r) == (r.settings.tf32,) * 2 for r in records.values())
    lines = {r.settings.tf32: dg.settings_line(r) for r in records.values()}
    assert lines[True].endswith(", TF32 attacks (not the pinned fp32)")
    assert "TF32" not in lines[False]


def test_the_library_entry_points_default_to_the_pinned_fp32(tmp_path, restore_flags):
    """run-claim's jobs and the study's probes call `evaluate_run` without `tf32`: a TF32
    default would make every run's evaluation a record its claims never use."""
    run = train(parse_spec(TINY_RUN), tmp_path / "runs", progress=False).run_dir
    (record,) = dg.evaluate_run(run)
    assert not record.settings.tf32 and _backend_tf32(record) == (False, False)
    (tmp_path / "tf32_default_nets.py").write_text(
        "from torch import nn\n\n\ndef linear():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    weights = tmp_path / "linear.safetensors"
    save_file(prototype_linear().state_dict(), weights)
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        record = dg.diagnose(weights, dataset="digits", factory="tf32_default_nets:linear",
                             eps=0.1, n_examples=10, attacks=("pgd10",))
    finally:
        sys.path.remove(str(tmp_path))
    assert not record.settings.tf32 and _backend_tf32(record) == (False, False)
