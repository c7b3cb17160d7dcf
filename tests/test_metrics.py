"""FOSC (Eq. 2), SGCS (Eq. 3) and App. E's relation between them, against brute force."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from trades_repro.attacks import pgd
from trades_repro.metrics import accuracy, attack_sgcs, correct, fosc, sgcs

f64 = torch.float64
unit = st.floats(-1.0, 1.0)


def _fosc_brute(x_adv: Tensor, x: Tensor, grad: Tensor, eps: float) -> Tensor:
    """max over every vertex δ ∈ {−ε, ε}^d of ⟨x + δ − x_adv, grad⟩, one example at a time."""
    out = []
    for xa, x0, g in zip(x_adv.flatten(1), x.flatten(1), grad.flatten(1), strict=True):
        values = [torch.dot(x0 + eps * torch.tensor(v, dtype=f64) - xa, g)
                  for v in itertools.product((-1.0, 1.0), repeat=x0.numel())]
        out.append(max(values))
    return torch.stack(out)


@st.composite
def fosc_cases(draw: st.DrawFn) -> tuple[Tensor, Tensor, Tensor, float]:
    batch, rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 5))
    n = batch * rows * cols

    def tensor(elements: st.SearchStrategy[float]) -> Tensor:
        values = draw(st.lists(elements, min_size=n, max_size=n))
        return torch.tensor(values, dtype=f64).reshape(batch, rows, cols)

    eps = draw(st.floats(0.0, 0.5))
    x = tensor(st.floats(-2.0, 2.0))  # FOSC's box ignores [0, 1], so x may lie anywhere
    return x + eps * tensor(unit), x, tensor(st.floats(-10.0, 10.0)), eps


@settings(max_examples=100, deadline=None)
@given(fosc_cases())
def test_fosc_is_the_max_over_box_vertices(case: tuple[Tensor, Tensor, Tensor, float]) -> None:
    x_adv, x, grad, eps = case
    value = fosc(x_adv, x, grad, eps)
    assert value.shape == (x.shape[0],)
    torch.testing.assert_close(value, _fosc_brute(x_adv, x, grad, eps), rtol=1e-12, atol=1e-12)
    assert (value >= -1e-12).all()  # x_adv lies inside the box


def test_fosc_is_zero_at_the_maximising_vertex_and_positive_elsewhere() -> None:
    grad = torch.tensor([[1.0, -2.0, 0.0]], dtype=f64)
    x = torch.full((1, 3), 0.5, dtype=f64)
    assert fosc(x + 0.1 * grad.sign(), x, grad, 0.1).item() == pytest.approx(0.0, abs=1e-15)
    assert fosc(x, x, grad, 0.1).item() == pytest.approx(0.3)  # ε‖g‖₁ = 0.1 · 3


def test_fosc_rejects_bad_arguments() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shapes"):
        fosc(x, x, torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="eps"):
        fosc(x, x, x, -0.1)


def _sgcs_brute(grads: Tensor) -> Tensor:
    n, out = grads.shape[0], []
    for b in range(grads.shape[1]):
        signs = [grads[i, b].flatten().sign() for i in range(n)]
        pairs = [F.cosine_similarity(signs[i], signs[j], dim=0)
                 for i in range(n) for j in range(n) if i != j]
        out.append(torch.stack(pairs).mean())
    return torch.stack(out)


@st.composite
def traces(draw: st.DrawFn) -> Tensor:
    steps, batch, d = draw(st.integers(2, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    # Small integers so that exact zeros (zero sign entries) and exact ties are common.
    values = draw(st.lists(st.integers(-2, 2), min_size=steps * batch * d,
                           max_size=steps * batch * d))
    return torch.tensor(values, dtype=f64).reshape(steps, batch, d)


@settings(max_examples=100, deadline=None)
@given(traces())
def test_sgcs_matches_pairwise_cosine_brute_force(grads: Tensor) -> None:
    value = sgcs(grads)
    assert value.shape == (grads.shape[1],)
    torch.testing.assert_close(value, _sgcs_brute(grads), rtol=0, atol=1e-12)
    assert ((value >= -1 - 1e-12) & (value <= 1 + 1e-12)).all()


@settings(max_examples=50, deadline=None)
@given(traces(), st.randoms(use_true_random=False))
def test_sgcs_ignores_step_order(grads: Tensor, rng: random.Random) -> None:
    order = list(range(grads.shape[0]))
    rng.shuffle(order)
    torch.testing.assert_close(sgcs(grads[order]), sgcs(grads), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sgcs_is_one_for_a_constant_trace(dtype: torch.dtype) -> None:
    g = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    trace = g.expand(11, *g.shape)  # PGD-10 records 11 gradients
    assert (sgcs(trace) == 1).all()  # exactly: the Gram entries are integers


def test_sgcs_known_values() -> None:
    up, down, zero = torch.ones(1, 1, 2), -torch.ones(1, 1, 2), torch.zeros(1, 1, 2)
    assert sgcs(torch.cat([up, down])).item() == -1.0
    assert sgcs(torch.cat([up, zero])).item() == 0.0  # a zero gradient has CosSim 0
    assert sgcs(torch.cat([up, up, down])).item() == pytest.approx(-1 / 3)


def test_sgcs_of_a_low_precision_trace_is_computed_in_fp32() -> None:
    """bf16 holds integers exactly only up to 256: the Gram entries (up to d) must not be
    computed in the trace's dtype (found by mutation testing: `.to(None)` survived)."""
    signs = torch.randint(0, 2, (5, 2, 1000), generator=torch.Generator().manual_seed(0))
    trace = (2 * signs - 1).to(f64)
    low = sgcs(trace.to(torch.bfloat16))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), _sgcs_brute(trace), rtol=0, atol=1e-6)


def test_sgcs_of_scalar_inputs() -> None:
    """A trace [n, B] (one number per example) is d = 1, not an error."""
    trace = torch.tensor([[1.0, -2.0], [3.0, 2.0], [-1.0, 0.5]], dtype=f64)
    torch.testing.assert_close(sgcs(trace), _sgcs_brute(trace.unsqueeze(2)), rtol=0,
                               atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(traces())
def test_attack_sgcs_averages_the_step_gradients_only(grads: Tensor) -> None:
    """Eq. 3 over x^0 … x^{k-1}, whose signs moved the iterate; x^k's gradient is FOSC's."""
    if grads.shape[0] < 3:  # k >= 2 steps recorded as k + 1 gradients
        grads = torch.cat([grads, grads[:1]])
    torch.testing.assert_close(attack_sgcs(grads), _sgcs_brute(grads[:-1]), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 4, 3), (0, 4), (5,)])
def test_sgcs_needs_two_steps(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="n >= 2"):
        sgcs(torch.ones(shape))


def test_correct_and_accuracy() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 0, 2])
    assert correct(logits, y).tolist() == [True, True, False, False]
    assert accuracy(logits, y) == 0.5
    with pytest.raises(ValueError, match="^accuracy: empty batch$"):
        accuracy(logits[:0], y[:0])


class Wiggly1D(nn.Module):
    """Three logits from a scalar input: a sine, a parabola and a constant."""

    def __init__(self, a: float, b: float, w1: float, w2: float, c: float) -> None:
        super().__init__()
        self.a, self.b, self.w1, self.w2, self.c = a, b, w1, w2, c

    def forward(self, x: Tensor) -> Tensor:
        t = x[:, 0]
        sine = self.w1 * torch.sin(self.a * t + self.b)
        return torch.stack([sine, self.w2 * t**2 + self.c * t, torch.zeros_like(t)], dim=1)


@settings(max_examples=60, deadline=None)
@given(
    params=st.tuples(st.floats(-30, 30), st.floats(-3, 3), *[st.floats(-5, 5)] * 3),
    x01=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    y_seed=st.integers(0, 2**16),
    eps=st.floats(0.01, 0.2),
    steps=st.integers(1, 10),
    overshoot=st.floats(1.01, 3.0),
    random_start=st.booleans(),
)
def test_app_e_holds_when_sgcs_includes_the_gradient_at_x_k(
    params: tuple[float, ...], x01: list[float], y_seed: int, eps: float, steps: int,
    overshoot: float, random_start: bool,
) -> None:
    """App. E repaired: a PGD-k attacker with kα > ε in 1-D; FOSC(x^k) > 0 ⇒ SGCS < 1 when
    SGCS also counts the gradient at x^k, where FOSC is evaluated (k + 1 gradients).

    The proof assumes the walk from x^0 reaches the box boundary, i.e. the box is not cut by
    [0, 1] (x ∈ [ε, 1 − ε] here) and x^0 = x; a random start may sit up to ε on the wrong
    side, so then kα > 2ε is needed. With Eq. 3's k step gradients alone the implication is
    false: see `test_app_e_fails_under_eq3_at_a_boundary_point_whose_gradient_points_back`.
    """
    x = torch.tensor(x01, dtype=f64).unsqueeze(1) * (1 - 2 * eps) + eps
    y = torch.randint(0, 3, (len(x01),), generator=torch.Generator().manual_seed(y_seed))
    alpha = overshoot * (2 if random_start else 1) * eps / steps
    x_adv, trace = pgd(Wiggly1D(*params), x, y, eps=eps, step_size=alpha, steps=steps,
                       random_start=random_start, record=True,
                       generator=torch.Generator().manual_seed(y_seed))
    value, similarity = fosc(x_adv, x, trace[-1], eps), sgcs(trace)
    # Rounding of (x + ε) − x leaves FOSC ~1e-16·|∇ℓ| at a boundary point; 1e-9 is far above.
    positive = value > 1e-9 * (1 + trace[-1, :, 0].abs())
    assert math.isfinite(value.sum().item())  # a NaN would make the check below vacuous
    assert (similarity[positive] < 1).all()


class Peak1D(nn.Module):
    """Two logits from a scalar input: the cross-entropy of label 1 peaks at t = 0.59."""

    def forward(self, x: Tensor) -> Tensor:
        t = x[:, 0]
        return torch.stack([-50.0 * (t - 0.59) ** 2, torch.zeros_like(t)], dim=1)


def test_app_e_fails_under_eq3_at_a_boundary_point_whose_gradient_points_back() -> None:
    """App. E's statement read with Eq. 3 (SGCS over the k step gradients) is false.

    Its proof takes FOSC(x^k) = 0 to follow from x^k on the boundary of the ε-box, but FOSC
    also needs ∇ℓ(x^k) to point out of the box: PGD-3 from x = 0.5 (ε = 0.1, α = 0.04, so
    kα > ε and x ∈ [ε, 1 − ε], App. E's assumptions) climbs 0.54, 0.58, 0.62 → 0.6, past the
    peak at 0.59. Its three steps agree (SGCS = 1), while ∇ℓ(x^k) < 0 points back, so
    FOSC = ε|∇ℓ| − (x^k − x)∇ℓ = 2ε|∇ℓ(x^k)| > 0. The claim
    `appendix_e.positive_fosc_implies_sgcs_below_one` reads this pass as its failure.
    """
    x, y, eps = torch.tensor([[0.5]], dtype=f64), torch.tensor([1]), 0.1
    x_adv, trace = pgd(Peak1D(), x, y, eps=eps, step_size=0.04, steps=3,
                       random_start=False, record=True)
    at_x_k = trace[-1, 0, 0]
    assert x_adv.item() == pytest.approx(x.item() + eps)  # on the boundary
    assert (trace[:-1, 0, 0] > 0).all() and at_x_k < 0  # three steps up, ∇ℓ(x^k) back
    assert attack_sgcs(trace).item() == 1.0
    assert fosc(x_adv, x, trace[-1], eps).item() == pytest.approx(2 * eps * abs(at_x_k.item()))
    assert fosc(x_adv, x, trace[-1], eps).item() > 0.05
