"""The TRADES objective against a float64 formula written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from trades_repro.losses import trades_objective, trades_terms

f64 = torch.float64


def _log_softmax(z: Tensor) -> Tensor:
    """Explicit log-sum-exp, shifted by the row max for stability."""
    m = z.max(dim=1, keepdim=True).values
    return z - m - (z - m).exp().sum(dim=1, keepdim=True).log()


def _trades_by_hand(nat: Tensor, adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """mean_b −log p_nat[b, y_b] + β · mean_b Σ_k p_nat log(p_nat / p_adv)."""
    log_p, log_q = _log_softmax(nat), _log_softmax(adv)
    ce = -log_p[torch.arange(len(y)), y].mean()
    kl = (log_p.exp() * (log_p - log_q)).sum() / len(y)
    return ce + beta * kl


@st.composite
def logit_pairs(draw: st.DrawFn) -> tuple[Tensor, Tensor, Tensor]:
    b, k = draw(st.integers(1, 6)), draw(st.integers(2, 7))

    def logits() -> Tensor:
        values = draw(st.lists(st.floats(-20, 20), min_size=b * k, max_size=b * k))
        return torch.tensor(values, dtype=f64).reshape(b, k).requires_grad_(True)

    y = torch.tensor(draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b)))
    return logits(), logits(), y


@settings(max_examples=60, deadline=None)
@given(logit_pairs(), st.floats(0.0, 10.0))
def test_objective_and_its_gradients_match_the_hand_formula(
    case: tuple[Tensor, Tensor, Tensor], beta: float
) -> None:
    nat, adv, y = case
    got, want = trades_objective(nat, adv, y, beta), _trades_by_hand(nat, adv, y, beta)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The KL target is not detached (official TRADES), so the gradient reaches both inputs.
    got_grads = torch.autograd.grad(got, [nat, adv])
    want_grads = torch.autograd.grad(want, [nat, adv])
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(logit_pairs(), st.floats(0.0, 10.0))
def test_objective_is_ce_plus_beta_kl(case: tuple[Tensor, Tensor, Tensor], beta: float) -> None:
    nat, adv, y = case
    ce, kl = trades_terms(nat, adv, y)
    assert torch.equal(trades_objective(nat, adv, y, beta), ce + beta * kl)
    assert kl >= -1e-12
    torch.testing.assert_close(trades_terms(nat, nat, y)[1], torch.zeros((), dtype=f64))


def test_kl_direction_is_clean_first() -> None:
    """Eq. 1 is KL(f(x) ‖ f(x + δ)); the reverse direction gives a different number."""
    p, q = [0.5, 0.5], [0.9, 0.1]
    nat, adv = torch.tensor([p], dtype=f64).log(), torch.tensor([q], dtype=f64).log()
    _, kl = trades_terms(nat, adv, torch.tensor([0]))
    clean_first = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # ≈ 0.511
    assert kl.item() == pytest.approx(clean_first, rel=1e-12)
    assert clean_first != pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))


def test_kl_is_summed_over_classes_and_averaged_over_the_batch() -> None:
    """Official TRADES: KLDivLoss(size_average=False) / batch_size, not a mean over B·K."""
    nat = torch.zeros(2, 4, dtype=f64)
    adv = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2, dtype=f64)
    _, kl = trades_terms(nat, adv, torch.tensor([0, 1]))
    one = math.log(3 + math.e) - 1 / 4 - math.log(4)  # KL(uniform ‖ softmax(0, 0, 0, 1))
    assert kl.item() == pytest.approx(one, rel=1e-12)


@pytest.mark.parametrize(
    ("nat_shape", "adv_shape", "y_shape"),
    [((2, 3), (2, 4), (2,)), ((2, 3, 1), (2, 3, 1), (2,)), ((2, 3), (2, 3), (3,))],
)
def test_terms_reject_mismatched_shapes(nat_shape: tuple[int, ...], adv_shape: tuple[int, ...],
                                        y_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="must"):
        trades_terms(torch.zeros(nat_shape), torch.zeros(adv_shape),
                     torch.zeros(y_shape, dtype=torch.long))


def test_label_shape_error_names_the_batch_size() -> None:
    logits = torch.zeros(4, 10)  # B = 4, K = 10: the message must say 4, not 10
    with pytest.raises(ValueError, match=r"y must be \[B\] = \[4\], got \(3,\)"):
        trades_terms(logits, logits, torch.zeros(3, dtype=torch.long))


def test_objective_rejects_negative_beta() -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="beta"):
        trades_objective(logits, logits, torch.tensor([0, 1]), beta=-1.0)
