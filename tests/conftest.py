"""Shared test configuration: hypothesis profiles and small shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI: reproducible examples and no per-example deadline (2 shared cores are slow and noisy).
settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Tiny tensors: one thread is as fast, and immune to the 40x slow-down of spinning OpenMP
# threads when another process shares the 2 cores (measured while developing).
torch.set_num_threads(1)


@pytest.fixture
def debian_fashion_mnist() -> Path:
    """The real files from `apt-get install dataset-fashion-mnist`; CI must have them."""
    from trades_repro import data

    folder = data.DEBIAN_FASHION_MNIST
    if all((folder / f"{stem}.gz").is_file() for stem in data.FASHION_MNIST_FILES):
        return folder
    message = f"{folder} missing: run `apt-get install dataset-fashion-mnist`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
