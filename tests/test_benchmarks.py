"""Smoke test of benchmarks/bench_train_paths.py: tiny sizes, correctness only, no timings."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from trades_repro.spec import parse_spec

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_paths.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_paths", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

TINY = {
    "name": "bench_tiny",
    "device": "cpu",
    "model": {"arch": "small_cnn", "width": 8},
    "method": {"beta": 3, "attack": {"eps": "16/255", "step_size": "4/255", "steps": 2}},
}


def _tiny_workload(steps: int = 2):
    generator = torch.Generator().manual_seed(0)
    # Pixels in [0.1, 0.9]: the 0.001-scale start noise never leaves [0, 1], so the default
    # path's projected start equals official's unprojected one and all three x_adv coincide.
    drawn = [(0.1 + 0.8 * torch.rand(8, 1, 8, 8, generator=generator),
              torch.randint(0, 3, (8,), generator=generator)) for _ in range(steps)]
    return bench.Workload("tiny", parse_spec(TINY), drawn, (1, 8, 8), 3)


def test_three_paths_agree_on_the_first_step():
    res = bench.benchmark(_tiny_workload(), rounds=1, warmup=1)
    official = res.first_loss["official"]
    # Fidelity runs official's forwards in official's order; only (1/B)·sum vs sum/B rounds
    # differently, so agreement is to float32 rounding (~1e-7 relative), 1e-6 leaves room.
    assert res.first_loss["fidelity"] == pytest.approx(official, rel=1e-6)
    # Default: same x_adv (see _tiny_workload) and BN-train logits reused instead of recomputed
    # (the same numbers): again float rounding only.
    assert res.first_loss["default"] == pytest.approx(official, rel=1e-6)
    assert res.x_adv.fidelity_equal
    assert res.x_adv.start_outside == 0
    assert res.x_adv.default_max_diff == 0.0
    assert set(res.ips) == {"default", "fidelity", "official"}
    assert res.ratio["official"] == [1.0]


def test_paths_refuse_a_fidelity_base_spec():
    raw = {**TINY, "performance": {"fidelity": True}}
    with pytest.raises(ValueError, match="default performance"):
        bench.paths(parse_spec(raw))
