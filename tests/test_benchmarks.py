"""Smoke tests of benchmarks/: tiny sizes, correctness and records only, no timings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from trades_repro.spec import parse_spec

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared `common` module


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load("bench_train_paths")
monitor = _load("bench_monitor")
common = _load("common")

TINY = {
    "name": "bench_tiny",
    "device": "cpu",
    "model": {"arch": "small_cnn", "width": 8},
    "method": {"beta": 3, "attack": {"eps": "16/255", "step_size": "4/255", "steps": 2}},
}


def _tiny_workload(steps: int = 2):
    generator = torch.Generator().manual_seed(0)
    drawn = [(torch.rand(8, 1, 8, 8, generator=generator).round(),  # saturated: 0 or 1
              torch.randint(0, 3, (8,), generator=generator)) for _ in range(steps)]
    return bench.Workload("tiny", parse_spec(TINY), drawn, (1, 8, 8), 3)


def test_exact_path_and_official_agree_on_the_first_step_and_knobs_run():
    res = bench.benchmark(_tiny_workload(), rounds=1, warmup=1, knobs=["channels_last"])
    official = res.first_loss["official"]
    # Same x_adv (bit for bit, also at saturated pixels) and the clean train-mode logits
    # reused instead of recomputed: float32 summation order only (~1e-7 relative).
    assert res.x_adv_equal
    assert res.first_loss["exact"] == pytest.approx(official, rel=1e-6)
    assert res.first_loss["channels_last"] == pytest.approx(official, rel=1e-4)
    assert set(res.ips) == {"official", "exact", "channels_last"}
    assert res.ratio["official"] == [1.0] and res.vs_exact["exact"] == [1.0]


def test_quick_arguments_and_unknown_knobs():
    args = bench.parse_args(["--quick"])
    assert args.knobs == ["channels_last"] and args.resnet_batch == 4
    with pytest.raises(SystemExit):
        bench.parse_args(["--knobs", "warp_drive"])


def test_monitor_shares_are_fractions_of_the_epoch():
    times = {"train": [8.0, 9.0], "monitored": [2.0, 1.0], "pgd10_only": [1.5, 0.5]}
    share = monitor.shares(times)
    assert share["monitor_share"] == pytest.approx([0.2, 0.1])
    assert share["fosc_sgcs_share"] == pytest.approx([0.05, 0.05])


def test_records_carry_device_versions_flags_and_figures(tmp_path):
    record = common.provenance(torch.device("cpu"), {"quick": True})
    path = common.write_record("unit", {**record, "figures": {"x": 1}}, out_dir=tmp_path)
    saved = json.loads(path.read_text())
    assert path.name.startswith("unit-cpu-")
    for key in ("device", "device_description", "torch", "git_sha", "flags", "figures",
                "load_average_end", "command"):
        assert key in saved, key
    assert common.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
