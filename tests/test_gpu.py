"""GPU smoke test: the CUDA path end to end, with every performance knob (`nox -s gpu`).

Never selected in CI (no GPU there): `nox` runs ``-m "not gpu"``, and without CUDA these
tests skip. Two epochs of CIFAR-shaped synthetic ResNet-18 training with bf16, channels_last,
torch.compile, TF32 and cuDNN autotuning, killed with SIGKILL in its second epoch and
resumed; then `evaluate` on the run and `diagnose` on its checkpoint (through the real
CIFAR-10 loader, fed the synthetic test images in CIFAR's on-disk format). The figures go to
``benchmarks/results/gpu_smoke-<device>-<time>.json`` (or ``$GPU_SMOKE_OUT``).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_data import _accept_tiny_files
from torchvision.datasets import CIFAR10
from typer.testing import CliRunner

from trades_repro import store
from trades_repro.cli import app
from trades_repro.data import load_splits
from trades_repro.spec import parse_spec

# GPU_SMOKE_DRY=1 rehearses the test's own logic on a CPU (small CNN, no compile) before
# spending GPU time on it; the record then says so.
DRY = os.environ.get("GPU_SMOKE_DRY") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not (DRY or torch.cuda.is_available()), reason="needs CUDA"),
              # a smoke test: a CUDA-only library warning (inductor's, cuDNN's) is printed
              # into its log, not turned into a failure as the suite's "error" filter would
              pytest.mark.filterwarnings("default::UserWarning")]
DEVICE = "cpu" if DRY else "cuda"

ROOT = Path(__file__).resolve().parents[1]
KNOBS = {"precision": "bf16", "channels_last": True, "compile": True, "tf32": True,
         "cudnn_benchmark": True}
SPEC = {
    "name": "gpu_smoke", "seed": 0, "device": "cuda",
    # no crop/flip: a class here is a fixed random-pixel prototype, which shifted crops blur
    "data": {"dataset": "synthetic", "validation": "test", "augment": False,
             "synthetic": {"n_train": 4000, "n_test": 500, "num_classes": 10, "channels": 3,
                           "image_size": 32}},
    "model": {"arch": "resnet18"},
    "method": {"beta": 6, "attack": {"eps": "8/255", "step_size": "2/255", "steps": 10}},
    # lr 0.01: at the paper's 0.1 (batch 128-256) this synthetic set's loss diverges within
    # an epoch (measured: 2.4, 3.6, 6.7, 9.5 over the first four steps; NaN on an H200).
    # Batch 64: enough steps in 2 epochs to leave chance accuracy (small CNN on a CPU, 1,000
    # images: clean 0.10 at batch 256, 0.92 at batch 64), and a short last batch (4000 % 64)
    "optim": {"lr": 0.01, "batch_size": 64, "epochs": 2},
    "validation": {"eps": "8/255", "step_size": "2/255", "steps": 10},
    "performance": KNOBS,
    "evaluation": {"n_examples": 500, "attacks": ["pgd10", "square"]},
}
if DRY:
    SPEC = {**SPEC, "device": "cpu", "model": {"arch": "small_cnn", "width": 8},
            "data": {**SPEC["data"], "synthetic": {**SPEC["data"]["synthetic"],
                                                   "n_train": 1000, "n_test": 100}},
            "performance": {**KNOBS, "compile": False},
            "evaluation": {"n_examples": 100, "attacks": ["pgd10", "square"],
                           "square_queries": 20}}


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trades_repro", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _out_dir() -> Path:
    out = Path(os.environ.get("GPU_SMOKE_OUT", ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _train_until_killed(spec_file: Path, runs: Path, run_dir: Path) -> dict:
    """Start training, SIGKILL it once epoch 1 is on disk; how far it got.

    Its output goes to `train.log` beside the record as it is written (with progress and
    dynamo's recompile log), so a run stopped from outside still says where its time went.
    """
    started = time.perf_counter()
    metrics = run_dir / store.METRICS_FILE
    log = _out_dir() / "train.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_LOGS": "recompiles"}
    with log.open("w") as sink, subprocess.Popen(
            [sys.executable, "-m", "trades_repro", "train", str(spec_file), "--runs-dir",
             str(runs)], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env=env) as proc:
        while proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.05)
        assert proc.poll() is None, f"training ended before the kill:\n{log.read_text()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text(errors="replace")
    return {"killed_after_s": round(time.perf_counter() - started, 1),
            "epochs_on_disk_at_kill": len(metrics.read_text().splitlines()),
            "recompiles": text.count("Recompiling function"),
            "recompile_limit_hit": "recompile_limit" in text}


def _cifar_from(spec, folder: Path, monkeypatch) -> None:
    """The synthetic test images as a CIFAR-10 release on disk (torchvision's layout)."""
    test = load_splits(spec.data, spec.seed).test
    pixels = (test.images * 255).round().to(torch.uint8).reshape(len(test.labels), -1).numpy()
    base = folder / CIFAR10.base_folder
    base.mkdir(parents=True)
    files = {f: (pixels[:10], test.labels[:10]) for f, _ in CIFAR10.train_list}
    files[CIFAR10.test_list[0][0]] = (pixels, test.labels)
    for name, (data, labels) in files.items():
        entry = {"batch_label": name, "data": np.ascontiguousarray(data),
                 "labels": labels.tolist(), "filenames": []}
        (base / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (base / CIFAR10.meta["filename"]).write_bytes(pickle.dumps(meta, protocol=2))
    _accept_tiny_files(monkeypatch, CIFAR10, base)


def _write_record(figures: dict) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import provenance, write_record

    record = provenance(torch.device(DEVICE), {"knobs": SPEC["performance"], "spec": SPEC,
                                               "dry_run": DRY})
    record["figures"] = figures
    return write_record("gpu_smoke", record, out_dir=_out_dir())


def test_gpu_train_kill_resume_evaluate_diagnose(tmp_path, monkeypatch):
    spec = parse_spec(SPEC)
    spec_file, runs = tmp_path / "gpu_smoke.yaml", tmp_path / "runs"
    spec_file.write_text(yaml.safe_dump(SPEC))
    run_dir = store.run_dir_for(spec, runs)
    figures = {"kill": _train_until_killed(spec_file, runs, run_dir)}
    # train, attack and no-grad forward, each once more when the batch first changes
    # (tests/test_compile.py); past dynamo's limit a frame silently runs eager
    assert figures["kill"]["recompiles"] <= 5 and not figures["kill"]["recompile_limit_hit"], \
        figures["kill"]

    started = time.perf_counter()
    resumed = _cli("train", str(spec_file), "--runs-dir", str(runs), "--quiet")
    figures["resume_s"] = round(time.perf_counter() - started, 1)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    records = store.read_metrics(run_dir)
    assert [r.epoch for r in records] == [1, 2]
    provenance = store.read_json(run_dir / store.PROVENANCE_FILE)
    assert provenance["status"] == "finished"
    figures["epochs"] = [r.model_dump() for r in records]
    figures["training_backend"] = provenance.get("backend")

    started = time.perf_counter()
    evaluated = _cli("evaluate", str(run_dir), "--quiet")
    figures["evaluate_s"] = round(time.perf_counter() - started, 1)
    figures["evaluate_exit"] = evaluated.returncode
    # a verdict (0 clear, 1 flagged) or inconclusive (3): two epochs decide nothing
    assert evaluated.returncode in (0, 1, 3), evaluated.stdout + evaluated.stderr
    evals = json.loads((run_dir / "eval.json").read_text())
    figures["eval"] = evals
    record = next(iter(evals["checkpoints"].values()))
    assert record["backend"]["tf32_cudnn"] is False and record["backend"]["cudnn_deterministic"]

    _cifar_from(spec, tmp_path / "cifar", monkeypatch)
    started = time.perf_counter()
    diagnosed = CliRunner().invoke(app, [
        "diagnose", str(run_dir / store.BEST_FILE), "--dataset", "cifar10", "--model",
        SPEC["model"]["arch"], "--width", str(SPEC["model"].get("width", 32)), "--data-root",
        str(tmp_path / "cifar"), "--n-examples", str(SPEC["evaluation"]["n_examples"]),
        "--attacks", "square-only",
        "--square-queries", str(SPEC["evaluation"].get("square_queries", 5000)),
        "--device", DEVICE, "--json", "--quiet"])
    figures["diagnose_s"] = round(time.perf_counter() - started, 1)
    figures["diagnose_exit"] = diagnosed.exit_code
    figures["diagnose"] = diagnosed.output[-4000:]
    path = _write_record(figures)
    assert diagnosed.exit_code in (0, 1, 3), diagnosed.output  # a verdict, or inconclusive
    print(f"record: {path}")
