"""Resume across devices and data folders: last.pt's device streams are tagged with their
device type; another device type re-seeds them from (seed, epoch) and provenance says so.

No GPU here: CUDA generator states are fabricated by shape (Philox seed + offset, 16 bytes),
and a CPU -> CUDA resume is simulated by patching the engine's device-type check.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from factories import assert_one_line_error, digits
from typer.testing import CliRunner

from trades_repro import engine, rngstate, store
from trades_repro import train as trainlib
from trades_repro.cli import app
from trades_repro.spec import parse_spec

SPEC = parse_spec(digits(data={"train_subset": 128, "val_size": 64}))  # 2 epochs of 2 steps
CUDA_STATE_BYTES = 16  # torch's CUDA generator state: Philox seed (8) + offset (8)


class Crash(Exception):
    pass


def _cut_after_epoch_1(runs: Path, monkeypatch, spec=SPEC, steps_per_epoch: int = 2) -> Path:
    """Train until the first step of epoch 2, then crash: last.pt holds epoch 1."""
    real_step, calls = trainlib.train_step, {"n": 0}

    def crashing(*args):
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 1:
            raise Crash
        return real_step(*args)

    monkeypatch.setattr(trainlib, "train_step", crashing)
    with pytest.raises(Crash):
        trainlib.train(spec, runs, progress=False)
    monkeypatch.setattr(trainlib, "train_step", real_step)
    return store.run_dir_for(spec, runs)


def _fake_cuda_checkpoint(run_dir: Path, *, legacy: bool = False) -> None:
    """Rewrite last.pt as a GPU run would have written it (states shaped as CUDA's)."""
    path = run_dir / store.LAST_FILE
    saved = torch.load(path, weights_only=True)
    cuda = torch.zeros(CUDA_STATE_BYTES, dtype=torch.uint8)
    for stream in ("attack", "healing"):
        saved["rng"][stream] = cuda if legacy else {"device": "cuda", "state": cuda}
    # legacy: get_rng_state_all() of a 2-GPU node; new: the run's own GPU only
    saved["rng"]["cuda"] = [cuda, cuda] if legacy else {"device": "cuda", "state": cuda}
    for group in saved["optimizer"]["param_groups"]:
        group.update(fused=True, foreach=None)  # build_optimizer's CUDA kernel
    saved["device"] = "cuda:0"
    torch.save(saved, path)


def _reseeded_state(stream: str, epoch: int) -> torch.Tensor:
    value = rngstate.reseed_value(SPEC.seed, epoch, stream)
    return torch.Generator().manual_seed(value).get_state()


@pytest.mark.parametrize("legacy", [False, True])
def test_cuda_checkpoint_resumes_on_cpu_by_reseeding_device_streams(tmp_path, monkeypatch,
                                                                    legacy):
    run_dir = _cut_after_epoch_1(tmp_path / "runs", monkeypatch)
    _fake_cuda_checkpoint(run_dir, legacy=legacy)
    session = engine.build_session(SPEC, run_dir)
    assert torch.equal(session.attack_gen.get_state(), _reseeded_state("attack", 1))
    assert torch.equal(session.healing_gen.get_state(), _reseeded_state("healing", 1))
    assert all(g["foreach"] and not g["fused"] for g in session.optimizer.param_groups)
    entry = store.read_json(run_dir / store.PROVENANCE_FILE)["resumed"][-1]
    assert entry["epoch"] == 1 and entry["device"] == "cpu"
    assert entry["rng_reseeded"]["streams"] == ["attack", "healing"]
    assert entry["rng_reseeded"]["saved_on"] == "cuda"


def test_cuda_to_cpu_resume_finishes_and_is_deterministic(tmp_path, monkeypatch):
    metrics = []
    for name in ("a", "b"):
        run_dir = _cut_after_epoch_1(tmp_path / name, monkeypatch)
        _fake_cuda_checkpoint(run_dir)
        result = trainlib.train(SPEC, tmp_path / name, progress=False)
        assert [r.epoch for r in result.records] == [1, 2]
        assert store.is_finished(run_dir)
        metrics.append((run_dir / store.METRICS_FILE).read_bytes())
    assert metrics[0] == metrics[1]  # the re-seed depends on (seed, epoch) only


def test_cpu_checkpoint_resumes_on_a_gpu_by_reseeding(tmp_path, monkeypatch):
    run_dir = _cut_after_epoch_1(tmp_path / "runs", monkeypatch)
    monkeypatch.setattr(rngstate, "device_type", lambda session: "cuda")  # as a GPU node would
    session = engine.build_session(SPEC, run_dir)
    assert torch.equal(session.attack_gen.get_state(), _reseeded_state("attack", 1))
    entry = store.read_json(run_dir / store.PROVENANCE_FILE)["resumed"][-1]
    assert entry["rng_reseeded"]["saved_on"] == "cpu"
    assert entry["rng_reseeded"]["streams"] == ["attack", "healing"]


def test_same_device_resume_restores_the_saved_streams(tmp_path, monkeypatch):
    run_dir = _cut_after_epoch_1(tmp_path / "runs", monkeypatch)
    saved = torch.load(run_dir / store.LAST_FILE, weights_only=True)["rng"]
    session = engine.build_session(SPEC, run_dir)
    assert torch.equal(session.attack_gen.get_state(), saved["attack"]["state"])
    entry = store.read_json(run_dir / store.PROVENANCE_FILE)["resumed"][-1]
    assert "rng_reseeded" not in entry


def test_unrestorable_state_stops_with_one_line(tmp_path, monkeypatch):
    run_dir = _cut_after_epoch_1(tmp_path / "runs", monkeypatch)
    saved = torch.load(run_dir / store.LAST_FILE, weights_only=True)
    saved["rng"]["attack"] = {"device": "cpu", "state": torch.zeros(7, dtype=torch.uint8)}
    torch.save(saved, run_dir / store.LAST_FILE)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", str(spec_file), "--runs-dir",
                                      str(tmp_path / "runs"), "--quiet"])
    assert_one_line_error(result, "attack random state", "delete last.pt")


def test_moved_data_folder_resumes_the_same_run(tmp_path, monkeypatch):
    """The digest leaves data.root out: a run started on one copy of the data resumes on a
    copy elsewhere (node-local scratch), and provenance records both places."""
    first = tmp_path / "shared" / "fashion"
    moved = tmp_path / "scratch" / "fashion"
    _write_fashion_mnist(first)
    spec = parse_spec(digits(data={"dataset": "fashion_mnist", "root": str(first),
                                   "train_subset": 128, "validation": "test"}))
    run_dir = _cut_after_epoch_1(tmp_path / "runs", monkeypatch, spec)
    shutil.move(first, moved)
    moved_spec = parse_spec({**spec.model_dump(mode="json"),
                             "data": {**spec.model_dump(mode="json")["data"],
                                      "root": str(moved), "download": True}})
    assert store.run_dir_for(moved_spec, tmp_path / "runs") == run_dir
    result = trainlib.train(moved_spec, tmp_path / "runs", progress=False)
    assert not result.skipped and [r.epoch for r in result.records] == [1, 2]
    provenance = store.read_json(run_dir / store.PROVENANCE_FILE)
    assert provenance["data"]["root"] == str(first)
    assert provenance["resumed"][-1]["data"]["root"] == str(moved)
    assert store.read_json(run_dir / store.SPEC_FILE)["data"]["root"] == str(moved)


def _write_fashion_mnist(folder: Path, n_train: int = 200, n_test: int = 32) -> None:
    """Random 28x28 images in the real IDX layout (the loader checks magic and sizes)."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=generator, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)


def _write_idx(path: Path, values: torch.Tensor) -> None:
    header = (0x800 + values.dim()).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in values.shape)
    path.write_bytes(header + values.numpy().tobytes())
