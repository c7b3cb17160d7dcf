"""The fidelity gate for the fast knobs: a knob may change rounding, not results.

Digits (640 training images, TPGD-3, 4 epochs, seed 0) trained with fp32 and with each knob;
the knob's run must agree with fp32 on clean and PGD-10 validation accuracy, averaged over
the last two epochs, within 0.06.

Why 0.06: the validation set has 300 images, so one accuracy has a binomial standard error
of ≤ 0.029 and two runs' mean over two epochs differ by ≲ 0.03 from sampling alone; rounding
differences make two runs drift apart like that. Changing the *seed* moves the same
figure by up to 0.11 (measured: seeds 0, 1, 2), so a knob within 0.06 is closer to fp32 than
another seed is. Measured here: bf16 |Δ| = 0.004 clean, 0.023 PGD-10; channels_last 0.000
and 0.005. `torch.compile` is gated on a GPU only (its CPU compile takes minutes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import digits

from trades_repro.spec import parse_spec
from trades_repro.train import train

TOLERANCE = 0.06  # see the module docstring


def _last_two(raw: dict, runs: Path) -> tuple[float, float]:
    records = train(parse_spec(raw), runs, progress=False).records[-2:]
    return (sum(r.val_clean_acc for r in records) / 2,
            sum(r.val_pgd10_acc for r in records) / 2)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> tuple[float, float]:
    return _last_two(digits(optim={"epochs": 4}), tmp_path_factory.mktemp("fp32"))


@pytest.mark.slow
@pytest.mark.parametrize("knob", [{"precision": "bf16"}, {"channels_last": True}],
                         ids=["bf16", "channels_last"])
def test_fast_knob_agrees_with_fp32_on_clean_and_pgd10(fp32, knob, tmp_path):
    clean, robust = _last_two(digits(optim={"epochs": 4}, performance=knob), tmp_path)
    assert abs(clean - fp32[0]) <= TOLERANCE, (clean, fp32)
    assert abs(robust - fp32[1]) <= TOLERANCE, (robust, fp32)
