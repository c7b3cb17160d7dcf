"""Shared test configuration: hypothesis profiles and small shared fixtures."""

from __future__ import annotations

import os

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
