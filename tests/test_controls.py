"""Positive and negative controls of the masking verdict, all-or-nothing and graded.

A small TRADES model trained on digits is wrapped in ways that mask gradients by
construction. Every rule must flag the three all-or-nothing wrappers and flag nothing on the
model itself (the AutoAttack rule included). The graded control masks a known share of the
classes: the paired rule must move from clear to inconclusive to flagged as that share grows.
Square runs at AutoAttack's standard 5,000 queries; only n is reduced to save time.
"""

from __future__ import annotations

import pytest
import torch
from _evalutil import (
    EPS,
    ClassMasked,
    Quantized,
    RandomDither,
    Saturated,
    digits_test,
    trained_net,
    trained_run,
)

from trades_repro.evaluate import DIAGNOSE_RULE, PRIMARY_RULE, EvalSettings, evaluate_model
from trades_repro.spec import LandscapeSpec

N_GRADED = 100  # clear needs n ~ 100: with no discordant image the interval is ±3.6 points
N_ALL_OR_NOTHING = 40  # margins of 0.4-0.55: decided at n = 40 (closing note of issue 16)
SQUARE_QUERIES = 5000  # AutoAttack's standard budget: never reduced in the controls
CONTROLS = {"quantized": (Quantized, "zero_gradients"), "saturated": (Saturated, "zero_gradients"),
            "random_dither": (RandomDither, "randomized")}


@pytest.fixture(scope="module")
def base_net(tmp_path_factory):
    return trained_net(trained_run(tmp_path_factory.getbasetemp()))


def _evaluate(model, attacks=("pgd10", "square"), n=N_GRADED):
    x, y = digits_test(n)
    settings = EvalSettings(dataset="digits", n_examples=n, eps=EPS, step_size=EPS / 4,
                            steps=10, random_start=True, batch_size=500, seed=0,
                            square_queries=SQUARE_QUERIES, device="cpu", n_classes=10,
                            landscape=LandscapeSpec(radius=EPS, steps=5))
    return evaluate_model(model, x, y, settings, attacks, identity=("control", "0" * 64, []))


def _verdicts(record):
    return {v.rule: v for v in record.verdicts}


@pytest.fixture(scope="module")
def base_record(base_net):
    return _evaluate(base_net, attacks=("pgd10", "square", "autoattack"))


@pytest.mark.slow
def test_the_trained_model_is_not_flagged_by_any_rule(base_record):
    verdicts = _verdicts(base_record)
    assert base_record.attacks["pgd10"].accuracy > 0.3, "the base model must be somewhat robust"
    assert not any(v.flagged for v in verdicts.values()), verdicts
    assert verdicts[DIAGNOSE_RULE.name].outcome == "clear"
    # AutoAttack's gap on a regular model is a few points; at n = 100 its interval may reach
    # 8 points (inconclusive), but it must never be flagged
    assert verdicts["pgd10_minus_autoattack_v2"].outcome in ("clear", "inconclusive")
    assert not base_record.flags, "no AutoAttack check may fire on a regular model"


@pytest.mark.slow
@pytest.mark.parametrize("control", list(CONTROLS))
def test_gradient_masking_controls_are_flagged(base_net, control):
    wrapper, check = CONTROLS[control]
    record = _evaluate(wrapper(base_net), n=N_ALL_OR_NOTHING)
    verdicts = _verdicts(record)
    v1, v2 = verdicts[PRIMARY_RULE.name], verdicts[DIAGNOSE_RULE.name]
    assert v1.flagged is True, f"{control}: margin {v1.margin:+.3f}"
    assert v1.margin >= PRIMARY_RULE.threshold + 0.05, "the margin should not be marginal"
    assert v2.outcome == "flagged", (v2.ci_low, v2.ci_high)
    # pyautoattack's checks run once per model even with the square-only preset
    assert check in {f.check for f in record.preflight.checks}


def _mask_for(base_record, y, target: float) -> list[int]:
    """The first classes 0, 1, ... whose masking gives the predicted margin nearest `target`.

    Masking class k stops PGD-10 on its clean-correct images (zero gradient) while Square
    still breaks the ones it broke on the base model: each such image counts in b. Images of
    unmasked classes keep their base contribution (+1 for b, -1 for c).
    """
    clean, square = base_record.clean.robust, base_record.attacks["square"].robust
    pgd10 = base_record.attacks["pgd10"].robust
    masked_gain = [int(c == "1" and s == "0") for c, s in zip(clean, square, strict=True)]
    base_diff = [int(c == p == "1" and s == "0") - int(c == s == "1" and p == "0")
                 for c, p, s in zip(clean, pgd10, square, strict=True)]

    def margin(k: int) -> float:
        return sum(g if int(label) < k else d
                   for g, d, label in zip(masked_gain, base_diff, y, strict=True)) / len(y)

    best = min(range(11), key=lambda k: abs(margin(k) - target))
    return list(range(best))


@pytest.mark.slow
def test_graded_control_moves_from_clear_to_inconclusive_to_flagged(base_net, base_record):
    _, y = digits_test(N_GRADED)
    outcomes = {0.0: _verdicts(base_record)[DIAGNOSE_RULE.name]}
    for target in (DIAGNOSE_RULE.threshold, 0.3):  # near the threshold; well above it
        masked = _mask_for(base_record, y, target)
        record = _evaluate(ClassMasked(base_net, masked))
        outcomes[target] = _verdicts(record)[DIAGNOSE_RULE.name]
    margins = [outcomes[k].margin for k in sorted(outcomes)]
    assert margins == sorted(margins), f"the margin must grow with the masked share: {margins}"
    assert [outcomes[k].outcome for k in sorted(outcomes)] == ["clear", "inconclusive",
                                                               "flagged"], outcomes


def test_controls_mask_gradients_by_construction():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = (torch.randint(0, 17, (4, 1, 8, 8)) / 16).requires_grad_(True)
    y = net(x).argmax(1)  # correct by definition: the saturated gradient must vanish
    for wrapper in (Quantized(net), Saturated(net), ClassMasked(net, list(range(10)))):
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(wrapper(x), y), x)
        assert grad.abs().max() == 0, type(wrapper).__name__
    none = ClassMasked(net, [])
    assert torch.equal(none(x), net(x))  # masking no class is the model itself
    dither = RandomDither(net)
    assert (dither(x) - net(x)).abs().max() < 0.5  # predictions barely move
    grads = [torch.autograd.grad(dither(x)[:, 0].sum(), x)[0].sign() for _ in range(2)]
    assert (grads[0] != grads[1]).float().mean() > 0.3  # gradient signs are redrawn
