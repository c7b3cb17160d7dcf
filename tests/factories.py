"""Spec builders and CLI assertions shared by tests (importable: pytest puts tests/ on sys.path)."""

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




def assert_one_line_error(result, *needles: str) -> None:
    """A CLI result that exited 2 with exactly one stderr line containing every needle."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
