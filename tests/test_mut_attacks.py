"""Attacks, pinned where mutation testing found the suite silent (docs/testing.md).

Also the paper's PGD-10 (App. B) as the library ships it, and the L∞ projection against an
elementwise clamp written in plain Python floats.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from trades_repro.attacks import pgd, project_linf, tpgd
from trades_repro.diagnose import _diagnose_spec
from trades_repro.spec import load_spec, parse_spec

f64 = torch.float64
SPEC_DIR = Path(__file__).resolve().parents[1] / "spec"


def _clamp_box(v: float, x: float, eps: float) -> float:
    """Π of one coordinate: into [x − ε, x + ε], then into the image range [0, 1]."""
    return min(max(min(max(v, x - eps), x + eps), 0.0), 1.0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-2, 3), st.floats(-0.5, 1.5)), min_size=1, max_size=8),
    st.floats(0, 0.5),
)
def test_project_linf_is_an_elementwise_clamp(pairs: list[tuple[float, float]], eps: float) -> None:
    """Centres outside [0, 1] included (App. A's noised inputs): then [0, 1] wins."""
    v, x = (torch.tensor(column, dtype=f64) for column in zip(*pairs, strict=True))
    want = [_clamp_box(a, b, eps) for a, b in pairs]
    assert project_linf(v, x, eps).tolist() == want


def test_pgd10_defaults_are_app_b() -> None:
    """App. B: ε = 8/255, α = 2/255, 10 steps; PGD-10 validates with the same ε and α
    (the paper gives PGD-10 no other step size), from a uniform random start (Madry)."""
    specs = [parse_spec({}), load_spec(SPEC_DIR / "cifar100_default.yaml")]
    for spec in specs:
        v, a = spec.validation, spec.method.attack
        assert (v.eps, v.step_size, v.steps, v.random_start) == (8 / 255, 2 / 255, 10, True)
        assert (a.eps, a.step_size, a.steps, a.init_std) == (8 / 255, 2 / 255, 10, 0.001)
    # `diagnose` on a checkpoint: any ε, with App. B's α/ε = 1/4 and 10 steps
    v = _diagnose_spec(
        "digits", None, "small_cnn", 8, False, 4 / 255, None, ("pgd10",), 100, 0, None, False
    ).validation
    assert v.step_size == pytest.approx(1 / 255, rel=1e-15) and v.steps == 10


def _net(seed: int, d: int = 6, k: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, k)).double().eval()


def _independent_pgd(
    model: nn.Module, x: Tensor, y: Tensor, start: Tensor, eps: float, alpha: float, steps: int
) -> Tensor:
    """Madry's loop: per-example CE by hand, sign step, clamp coordinate by coordinate."""
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    x_adv = start
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = -F.log_softmax(model(x_adv), dim=1).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.maximum(torch.minimum(x_adv.detach() + alpha * grad.sign(), hi), lo)
    return x_adv


def test_the_shipped_pgd10_is_madrys_loop_with_app_b_values() -> None:
    v = parse_spec({}).validation
    model, g = _net(0), torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 6, generator=g, dtype=f64), torch.randint(0, 4, (5,), generator=g)
    u = torch.rand(x.shape, generator=g, dtype=f64)
    start = (x + v.eps * (2 * u - 1)).clamp((x - v.eps).clamp(min=0), (x + v.eps).clamp(max=1))
    got = pgd(
        model,
        x,
        y,
        eps=v.eps,
        step_size=v.step_size,
        steps=v.steps,
        random_start=v.random_start,
        noise=u,
    )
    want = _independent_pgd(model, x, y, start, 8 / 255, 2 / 255, 10)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    # ten steps of 2/255 can cross the 16/255-wide box: some coordinates reach its faces
    assert ((got - x).abs() > 8 / 255 - 1e-12).any()


def test_random_start_maps_the_draws_to_x_plus_eps_times_2u_minus_1() -> None:
    """The draws u ∈ [0, 1) may come in another dtype (evaluate passes float32) and are used
    at x's precision: for small u, 2u − 1 is inexact in float32."""
    x = torch.full((4, 1), 0.5, dtype=f64)
    u = torch.tensor([[1e-3], [0.1234567], [0.5], [0.9999]], dtype=torch.float32)
    start = pgd(
        nn.Linear(1, 2).double(),
        x,
        torch.zeros(4, dtype=torch.long),
        eps=0.1,
        step_size=0.0,
        steps=0,
        noise=u,
    )
    want = [[0.5 + 0.1 * (2 * a - 1)] for (a,) in u.tolist()]
    assert start.dtype == f64 and start.tolist() == want


def test_a_seeded_start_is_the_noise_path_with_draws_in_x_dtype() -> None:
    """`generator` and `noise` are one start: U[0, 1) drawn in x's dtype from the generator."""
    model, x, y = _net(1), torch.rand(3, 6, dtype=f64), torch.tensor([0, 1, 3])
    kwargs = dict(eps=0.1, step_size=0.0, steps=0)
    seeded = pgd(model, x, y, generator=torch.Generator().manual_seed(7), **kwargs)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(7), dtype=f64)
    assert torch.equal(seeded, pgd(model, x, y, noise=u, **kwargs))


def test_noise_of_the_wrong_shape_is_refused_by_name() -> None:
    model, x, y = _net(2), torch.rand(3, 6, dtype=f64), torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match=r"^pgd: noise shape \(3, 5\) != x \(3, 6\)$"):
        pgd(model, x, y, eps=0.1, step_size=0.01, steps=1, noise=torch.rand(3, 5))


@pytest.mark.parametrize("attack", ["pgd", "tpgd"])
def test_the_start_is_drawn_on_x_device_whatever_the_default_device(attack: str) -> None:
    """A caller's `torch.set_default_device` must not move the start off x's device (on
    the meta device a tensor has no data, so a start drawn there cannot be used)."""
    model, x, y = _net(3), torch.rand(3, 6, dtype=f64), torch.tensor([0, 1, 3])
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        if attack == "pgd":
            x_adv = pgd(model, x, y, eps=0.1, step_size=0.01, steps=2, generator=g)
        else:
            x_adv = tpgd(model, x, eps=0.1, step_size=0.01, steps=2, generator=g)
    assert x_adv.device == x.device and x_adv.isfinite().all()


def test_tpgd_with_zero_init_std_starts_at_x() -> None:
    """σ = 0 is allowed (the KL gradient then vanishes at the start, so nothing moves)."""
    model, x = _net(4), torch.rand(3, 6, dtype=f64)
    assert torch.equal(tpgd(model, x, eps=0.1, step_size=0.01, steps=0, init_std=0.0), x)


@pytest.mark.parametrize("attack", ["pgd", "tpgd"])
def test_a_coordinate_with_zero_gradient_does_not_move(attack: str) -> None:
    """sign(0) = 0: an input the model ignores keeps its start value through every step."""
    model = _net(5)
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0  # the model ignores input 0: its gradient is exactly 0
    x, y = torch.rand(3, 6, dtype=f64), torch.tensor([0, 1, 3])
    kwargs = dict(eps=0.1, step_size=0.03, steps=4)
    if attack == "pgd":
        x_adv = pgd(model, x, y, random_start=False, **kwargs)
    else:
        x_adv = tpgd(model, x, init_std=0.0, **kwargs)
    assert torch.equal(x_adv[:, 0], x[:, 0])
