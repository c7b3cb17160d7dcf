"""Training audit: weights no epoch record describes, specs that could never work, corrupt
resume states and temporary files of killed writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from factories import assert_one_line_error, digits
from safetensors.torch import load_file
from typer.testing import CliRunner

from trades_repro import engine, store
from trades_repro import train as trainlib
from trades_repro.cli import app
from trades_repro.spec import SpecError, parse_spec

SPEC = parse_spec(digits(data={"train_subset": 128, "val_size": 64}))  # 2 epochs of 2 steps
runner = CliRunner()


class Crash(Exception):
    pass


def _force_epoch_2_pgd10(monkeypatch, acc: float) -> None:
    """Epoch 2's validation PGD-10 accuracy, as a replay that is not bit-exact may measure."""
    real = trainlib.validate

    def validate(model, val, spec, device, epoch, **kwargs):
        measured = real(model, val, spec, device, epoch, **kwargs)
        return {**measured, "val_pgd10_acc": acc} if epoch == 2 else measured

    monkeypatch.setattr(trainlib, "validate", validate)


class Commits:
    """Weights of every last.pt written, by epoch; with `kill_epoch` set, die instead of
    writing that epoch's last.pt (after its policy files, before the commit point)."""

    def __init__(self, monkeypatch, kill_epoch: int | None = None) -> None:
        self.weights: dict[int, dict] = {}
        self.abandoned: dict | None = None
        self.kill_epoch, real = kill_epoch, store.atomic_torch_save

        def save(path, obj):
            epoch = obj["state"]["epoch"]
            weights = {k: v.clone() for k, v in obj["model"].items()}
            if epoch == self.kill_epoch:
                self.abandoned = weights
                raise Crash
            real(path, obj)
            self.weights[epoch] = weights

        monkeypatch.setattr(store, "atomic_torch_save", save)


def _assert_policy_files_hold_their_epochs(run_dir: Path, committed: dict[int, dict]) -> None:
    index = store.read_json(run_dir / store.CHECKPOINTS_FILE)
    for policy in engine.POLICY_FILES:
        if index[policy]["file"] is None:
            continue
        held = load_file(run_dir / index[policy]["file"])
        weights = committed[index[policy]["epoch"]]
        assert held.keys() == weights.keys()
        assert all(torch.equal(held[k], weights[k]) for k in held), policy
    assert not list(run_dir.glob("*.pending")) and not list(run_dir.glob("*.tmp"))


# ------------------------------------------------------------ 1: policy files after a kill


def test_a_kill_before_last_pt_leaves_no_abandoned_weights_in_best(tmp_path, monkeypatch):
    """Killed between epoch 2's best.safetensors and its last.pt, then resumed with a replay
    of epoch 2 that is no longer best: best.safetensors must hold epoch 1's weights, as
    checkpoints.json says, not the abandoned attempt's."""
    runs = tmp_path / "runs"
    _force_epoch_2_pgd10(monkeypatch, 1.0)  # the first attempt's epoch 2 is best
    commits = Commits(monkeypatch, kill_epoch=2)
    with pytest.raises(Crash):
        trainlib.train(SPEC, runs, progress=False)
    abandoned, commits.kill_epoch = commits.abandoned, None
    _force_epoch_2_pgd10(monkeypatch, 0.0)  # its replay is not
    result = trainlib.train(SPEC, runs, progress=False)
    assert [r.best_pgd10 for r in result.records] == [True, False]
    assert store.read_json(result.run_dir / store.CHECKPOINTS_FILE)["best_pgd10"]["epoch"] == 1
    best = load_file(result.run_dir / store.BEST_FILE)
    assert not all(torch.equal(best[k], abandoned[k]) for k in best)
    _assert_policy_files_hold_their_epochs(result.run_dir, commits.weights)


def test_a_kill_after_last_pt_puts_the_committed_policy_file_in_place(tmp_path, monkeypatch):
    """Killed after epoch 1's last.pt but before its policy file was moved into place: the
    resume moves it there (epoch 1 is committed and is not trained again)."""
    runs, real_replace = tmp_path / "runs", os.replace
    commits = Commits(monkeypatch)

    def replace(src, dst):
        if str(src).endswith(".pending"):
            raise Crash
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        trainlib.train(SPEC, runs, progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    run_dir = store.run_dir_for(SPEC, runs)
    assert not (run_dir / store.BEST_FILE).exists()
    result = trainlib.train(SPEC, runs, progress=False)
    provenance = store.read_json(run_dir / store.PROVENANCE_FILE)
    assert [r["epoch"] for r in provenance["resumed"]] == [1]
    assert [r.epoch for r in result.records] == [1, 2]
    _assert_policy_files_hold_their_epochs(run_dir, commits.weights)


# ------------------------------------------------------------ 2, 3: specs that cannot work


def _spec_file(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_healing_without_fosc_is_refused_naming_both_fields(tmp_path):
    raw = digits(healing={"enabled": True}, monitor={"fosc": False})
    with pytest.raises(SpecError, match=r"healing\.enabled.*monitor\.fosc"):
        parse_spec(raw)
    result = runner.invoke(app, ["train", str(_spec_file(tmp_path, raw)), "--runs-dir",
                                 str(tmp_path / "runs"), "--quiet"])
    assert_one_line_error(result, "spec.yaml", "healing.enabled", "monitor.fosc")
    assert not (tmp_path / "runs").exists()
    parse_spec(digits(healing={"enabled": False}, monitor={"fosc": False}))  # no healing: fine


def test_nesterov_without_momentum_is_refused_naming_both_fields(tmp_path):
    raw = digits(optim={"momentum": 0, "nesterov": True})
    with pytest.raises(SpecError, match=r"optim\.nesterov.*optim\.momentum"):
        parse_spec(raw)
    result = runner.invoke(app, ["train", str(_spec_file(tmp_path, raw)), "--runs-dir",
                                 str(tmp_path / "runs"), "--quiet"])
    assert_one_line_error(result, "spec.yaml", "optim.nesterov", "optim.momentum")
    parse_spec(digits(optim={"momentum": 0, "nesterov": False}))  # plain SGD: fine


# ------------------------------------------------------------ 4: corrupt resume states


@pytest.fixture(scope="module")
def cut_runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per method, a run killed in epoch 2's first step: (its spec file, its run folder)."""
    root = tmp_path_factory.mktemp("cut")
    out = {}
    for method in ("trades", "trades_awp"):
        raw = digits(data={"train_subset": 128, "val_size": 64},
                     method={"name": method, "awp": {"warmup": 1}})
        spec, real_step, calls = parse_spec(raw), trainlib.train_step, {"n": 0}

        def crashing(*args, _real=real_step, _calls=calls):
            _calls["n"] += 1
            if _calls["n"] == 3:  # two steps per epoch: epoch 1 is committed
                raise Crash
            return _real(*args)

        trainlib.train_step = crashing
        try:
            with pytest.raises(Crash):
                trainlib.train(spec, root / method, progress=False)
        finally:
            trainlib.train_step = real_step
        out[method] = (_spec_file(root / method, raw), store.run_dir_for(spec, root / method))
    return out


def _drop(mapping: dict, key: str) -> None:
    del mapping[key]


CORRUPTIONS = {
    "no noise_left": lambda s: _drop(s["state"], "noise_left"),
    "epoch not a number": lambda s: s["state"].update(epoch="1"),
    "bad record": lambda s: s["state"].update(records=[{"epoch": "x"}]),
    "bad policies": lambda s: s["state"].update(policies={"bogus": 1}),
    "no model key": lambda s: _drop(s["model"], next(iter(s["model"]))),
    "wrong model shape": lambda s: s["model"].update({next(iter(s["model"])): torch.zeros(3)}),
    "no param groups": lambda s: s["optimizer"].update(param_groups=[]),
    "wrong momentum shape": lambda s: s["optimizer"]["state"][0].update(
        momentum_buffer=torch.zeros(1)),
    "bad torch rng": lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
    "bad numpy rng": lambda s: s["rng"].update(numpy=[]),
    "no data rng": lambda s: _drop(s["rng"], "data"),
    "no attack rng": lambda s: _drop(s["rng"], "attack"),
}


def _spoil_and_train(cut_runs, tmp_path, method: str, corrupt) -> tuple[object, Path]:
    spec_file, folder = cut_runs[method]
    run_dir = tmp_path / "runs" / folder.name
    shutil.copytree(folder, run_dir)
    saved = torch.load(run_dir / store.LAST_FILE, weights_only=True)
    corrupt(saved)
    torch.save(saved, run_dir / store.LAST_FILE)
    result = runner.invoke(app, ["train", str(spec_file), "--runs-dir", str(run_dir.parent),
                                 "--quiet"])
    return result, run_dir


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_resume_state_is_bad_input_naming_last_pt(cut_runs, tmp_path, name):
    result, run_dir = _spoil_and_train(cut_runs, tmp_path, "trades", CORRUPTIONS[name])
    assert_one_line_error(result, str(run_dir / store.LAST_FILE),
                          "move it aside to train this run again from its start")


def test_a_corrupt_awp_proxy_is_bad_input_naming_last_pt(cut_runs, tmp_path):
    result, run_dir = _spoil_and_train(cut_runs, tmp_path, "trades_awp",
                                       lambda s: s.update(awp_proxy=None))
    assert_one_line_error(result, str(run_dir / store.LAST_FILE), "move it aside")


def test_an_intact_resume_state_still_resumes(cut_runs, tmp_path):
    result, run_dir = _spoil_and_train(cut_runs, tmp_path, "trades", lambda s: None)
    assert result.exit_code == 0, result.output
    assert len(store.read_metrics(run_dir)) == 2


# ------------------------------------------------------------ 5: temporary files


OWN_TEMPS = (".last.pt.k1.tmp", ".metrics.jsonl.k2.tmp", ".batches.jsonl.k3.tmp",
             ".best.safetensors.k4.tmp", ".best_pgd10_fosc_ok.safetensors.k5.tmp",
             ".provenance.json.k6.tmp", ".checkpoints.json.k7.tmp",
             "..best.safetensors.e2.pending.k8.tmp")
OTHERS = (".eval.json.k9.tmp", ".run.lock.k10.tmp", "notes.tmp")


def _litter(run_dir: Path) -> None:
    for name in (*OWN_TEMPS, *OTHERS):
        (run_dir / name).write_bytes(b"half a file")


def _assert_only_others_left(run_dir: Path) -> None:
    left = {p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")}
    assert left == set(OTHERS)


def test_a_resume_removes_the_temporary_files_of_killed_writes(cut_runs, tmp_path):
    _, folder = cut_runs["trades"]
    run_dir = tmp_path / folder.name
    shutil.copytree(folder, run_dir)
    _litter(run_dir)
    spec = parse_spec(yaml.safe_load(cut_runs["trades"][0].read_text()))
    engine.build_session(spec, run_dir)
    _assert_only_others_left(run_dir)


def test_a_fresh_start_removes_temporary_and_uncommitted_files(tmp_path):
    run_dir = store.run_dir_for(SPEC, tmp_path)
    run_dir.mkdir(parents=True)
    _litter(run_dir)
    for name in (store.BEST_FILE, ".best.safetensors.e1.pending"):  # no epoch committed
        (run_dir / name).write_bytes(b"weights of an abandoned epoch 1")
    engine.build_session(SPEC, run_dir)
    _assert_only_others_left(run_dir)
    assert not (run_dir / store.BEST_FILE).exists()
    assert not list(run_dir.glob("*.pending"))
