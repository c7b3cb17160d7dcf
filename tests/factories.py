"""Spec builders shared by the engine tests (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

SPEC_DIR = Path(__file__).resolve().parents[1] / "spec"
DIGITS = yaml.safe_load((SPEC_DIR / "digits.yaml").read_text())


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def digits(**extra) -> dict:
    """Digits for 2 epochs on a 640-image subset (10 batches of 64) with TPGD-3: seconds."""
    small = {"data": {"train_subset": 640}, "optim": {"epochs": 2},
             "method": {"attack": {"steps": 3, "step_size": 0.04}}}
    return _merge(_merge(DIGITS, small), extra)


