"""Projection, PGD and TPGD: the box, the trace, eval mode and the official conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import lsq_linear
from torch import Tensor, nn

from trades_repro.attacks import pgd, project_linf, tpgd

f64 = torch.float64


def _vector(draw: st.DrawFn, n: int, lo: float, hi: float) -> Tensor:
    return torch.tensor(draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n)), dtype=f64)


@st.composite
def projection_cases(draw: st.DrawFn) -> tuple[Tensor, Tensor, float]:
    d = draw(st.integers(1, 8))
    return _vector(draw, d, -1.5, 2.5), _vector(draw, d, 0.0, 1.0), draw(st.floats(1e-3, 0.5))


@settings(max_examples=100, deadline=None)
@given(projection_cases())
def test_project_linf_is_the_nearest_point_of_box_and_image_range(
    case: tuple[Tensor, Tensor, float],
) -> None:
    v, x, eps = case
    z = project_linf(v, x, eps)
    lo, hi = np.maximum(x.numpy() - eps, 0.0), np.minimum(x.numpy() + eps, 1.0)
    # Bounded least squares min ‖z − v‖₂ s.t. lo ≤ z ≤ hi, solved by scipy, not by clamping.
    nearest = lsq_linear(np.eye(len(v)), v.numpy(), bounds=(lo, hi), method="bvls", tol=1e-14)
    np.testing.assert_allclose(z.numpy(), nearest.x, rtol=0, atol=1e-9)
    assert ((z.numpy() >= lo) & (z.numpy() <= hi)).all()


@settings(max_examples=100, deadline=None)
@given(projection_cases())
def test_project_linf_is_idempotent(case: tuple[Tensor, Tensor, float]) -> None:
    v, x, eps = case
    z = project_linf(v, x, eps)
    assert torch.equal(project_linf(z, x, eps), z)


@settings(max_examples=100, deadline=None)
@given(projection_cases())
def test_project_linf_is_the_identity_inside(case: tuple[Tensor, Tensor, float]) -> None:
    u, x, eps = case
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    # u ∈ [−1.5, 2.5] mapped into [lo, hi]; the clamp only absorbs rounding at the ends.
    inside = (lo + (hi - lo) * (u + 1.5) / 4).clamp(lo, hi)
    assert torch.equal(project_linf(inside, x, eps), inside)


def test_project_linf_stays_in_image_range_for_noised_inputs() -> None:
    x = torch.tensor([-0.3, 1.4, 0.5])  # App. A adds N(0, 0.1) noise to images before TPGD
    z = project_linf(torch.tensor([0.2, 0.9, 0.7]), x, 0.1)
    assert torch.equal(z, torch.tensor([0.0, 1.0, 0.6]))


class Mlp(nn.Sequential):
    def __init__(self, d: int, k: int, seed: int, batchnorm: bool = False) -> None:
        torch.manual_seed(seed)
        norm = [nn.BatchNorm1d(8)] if batchnorm else []
        super().__init__(nn.Flatten(), nn.Linear(d, 8), *norm, nn.Tanh(), nn.Linear(8, k))


def _batch(seed: int, b: int = 3, d: int = 5, k: int = 4) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, d, generator=g, dtype=f64), torch.randint(0, k, (b,), generator=g)


def _run(attack: str, model: nn.Module, x: Tensor, y: Tensor, seed: int = 0,
         **kwargs: object) -> Tensor | tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    if attack == "pgd":
        return pgd(model, x, y, generator=g, **kwargs)
    return tpgd(model, x, generator=g, **kwargs)


def _objective(attack: str, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
    """Per-example attack loss written out independently (model assumed in eval mode)."""
    if attack == "pgd":
        return F.cross_entropy(model(x_adv), y, reduction="none")
    p = F.softmax(model(x), dim=1)
    return (p * (F.log_softmax(model(x), dim=1) - F.log_softmax(model(x_adv), dim=1))).sum(1)


def _grad(attack: str, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
    """Input gradient of the summed per-example loss: each example's own, not divided by B."""
    x_adv = x_adv.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_objective(attack, model, x, y, x_adv).sum(), x_adv)
    return grad


ATTACKS = ["pgd", "tpgd"]


@settings(max_examples=30, deadline=None)
@given(
    attack=st.sampled_from(ATTACKS),
    seed=st.integers(0, 2**16),
    eps=st.floats(0.0, 0.3),
    step_ratio=st.floats(0.05, 1.5),
    steps=st.integers(1, 5),
)
def test_iterates_stay_in_box_and_follow_the_recorded_signs(
    attack: str, seed: int, eps: float, step_ratio: float, steps: int
) -> None:
    """Runs with 0..k steps and one seed give x^0..x^k of one k-step run (same start).

    TPGD's x^0 is official TRADES' unprojected x + σ·N(0, I): only x^1.. must be in the box.
    """
    model, (x, y) = Mlp(5, 4, seed).double().eval(), _batch(seed)
    alpha = step_ratio * eps
    iterates = [_run(attack, model, x, y, seed, eps=eps, step_size=alpha, steps=j)
                for j in range(steps + 1)]
    _, trace = _run(attack, model, x, y, seed, eps=eps, step_size=alpha, steps=steps,
                    record=True)
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    for j, x_j in enumerate(iterates):
        if j > 0 or attack == "pgd":
            assert ((x_j >= lo) & (x_j <= hi)).all(), f"x^{j} left the box"
        torch.testing.assert_close(trace[j], _grad(attack, model, x, y, x_j))
    for j in range(steps):
        stepped = (iterates[j] + alpha * trace[j].sign()).clamp(lo, hi)
        torch.testing.assert_close(iterates[j + 1], stepped, rtol=0, atol=1e-15)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("steps", [0, 1, 7])
def test_record_trace_shape_and_last_gradient_at_returned_point(attack: str, steps: int) -> None:
    model, (x, y) = Mlp(5, 4, 1).double(), _batch(1)
    x = x.reshape(3, 1, 5)  # a non-flat input, so the trace keeps every input dimension
    x_adv, trace = _run(attack, model, x, y, eps=0.1, step_size=0.03, steps=steps, record=True)
    assert trace.shape == (steps + 1, 3, 1, 5)
    assert not x_adv.requires_grad and not trace.requires_grad
    torch.testing.assert_close(trace[-1], _grad(attack, model.eval(), x, y, x_adv))


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_increase_their_objective(attack: str) -> None:
    """Guards the sign of the step: ascent, not descent, with no clipping in play."""
    model, (x, y) = Mlp(5, 4, 3).double().eval(), _batch(3)
    x = 0.25 + 0.5 * x
    start = _run(attack, model, x, y, eps=0.05, step_size=0.005, steps=0)
    x_adv = _run(attack, model, x, y, eps=0.05, step_size=0.005, steps=5)
    with torch.no_grad():
        before = _objective(attack, model, x, y, start)
        after = _objective(attack, model, x, y, x_adv)
    assert (after > before).all()


def _official_tpgd(model: nn.Module, x: Tensor, start: Tensor, eps: float, step_size: float,
                   steps: int) -> Tensor:
    """TPGD the way official TRADES writes its loop: clean forward each step, box, then [0, 1]."""
    x_adv = start
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1),
                        reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv


@pytest.mark.parametrize("saturated", [False, True], ids=["interior", "saturated"])
def test_tpgd_matches_the_official_loop_in_eval_mode(saturated: bool) -> None:
    """Bit for bit, also where pixels sit at 0 or 1 and the start noise leaves [0, 1]."""
    model, (x, _) = Mlp(5, 4, 4, batchnorm=True).double(), _batch(4, b=6)
    with torch.no_grad():
        model(torch.rand(32, 5, dtype=f64))  # give BatchNorm non-trivial running statistics
    x = (x.round() if saturated else 0.1 + 0.8 * x)  # round: every pixel at 0 or 1
    x_adv = tpgd(model, x, eps=8 / 255, step_size=2 / 255, steps=10,
                 generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=f64)
    official = _official_tpgd(model.eval(), x, x + 0.001 * noise, 8 / 255, 2 / 255, 10)
    torch.testing.assert_close(x_adv, official, rtol=0, atol=0)


def test_tpgd_project_start_puts_the_start_in_the_box() -> None:
    model, (x, _) = Mlp(5, 4, 4).double(), _batch(4, b=6)
    x = x.round()  # saturated pixels: about half the start noise leaves [0, 1]
    raw, projected = (tpgd(model, x, eps=8 / 255, step_size=2 / 255, steps=0, project_start=p,
                           generator=torch.Generator().manual_seed(5)) for p in (False, True))
    assert not ((raw >= 0) & (raw <= 1)).all()
    assert ((projected >= 0) & (projected <= 1)).all()
    torch.testing.assert_close(projected, project_linf(raw, x, 8 / 255), rtol=0, atol=0)


def _bn_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or
            "num_batches" in k}


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("training", [True, False])
def test_attacks_leave_batchnorm_statistics_and_mode_untouched(attack: str,
                                                               training: bool) -> None:
    model, (x, y) = Mlp(5, 4, 5, batchnorm=True).double(), _batch(5, b=8)
    model.train(training)
    before = _bn_state(model)
    assert len(before) == 3  # running_mean, running_var, num_batches_tracked
    _run(attack, model, x, y, eps=0.1, step_size=0.03, steps=3, record=True)
    for key, value in _bn_state(model).items():
        assert torch.equal(value, before[key]), key
    assert all(m.training is training for m in model.modules())


class ModeSpy(nn.Module):
    """Records the mode of every forward pass; raises after ``fail_after`` calls if set."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.seen: list[bool] = []
        self.fail_after = fail_after

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(self.training)
        if self.fail_after is not None and len(self.seen) > self.fail_after:
            raise RuntimeError("spy failure")
        return x


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_run_in_eval_mode_and_keep_mixed_submodule_modes(attack: str) -> None:
    spy = ModeSpy()
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), spy, nn.Linear(8, 4)).double()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model must stay frozen
    x, y = _batch(6)
    _run(attack, model, x, y, eps=0.1, step_size=0.03, steps=2, record=True)
    assert spy.seen and not any(spy.seen)
    assert [m.training for m in model.modules()] == [True, True, False, True, True]


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_restore_the_mode_when_the_model_raises(attack: str) -> None:
    model = nn.Sequential(nn.Linear(5, 4), ModeSpy(fail_after=1)).double().train()
    x, y = _batch(7)
    with pytest.raises(RuntimeError, match="spy failure"):
        _run(attack, model, x, y, eps=0.1, step_size=0.03, steps=3)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_leave_parameter_gradients_alone(attack: str) -> None:
    model, (x, y) = Mlp(5, 4, 8).double(), _batch(8)
    _run(attack, model, x, y, eps=0.1, step_size=0.03, steps=3, record=True)
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    _run(attack, model, x, y, eps=0.1, step_size=0.03, steps=3)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_are_deterministic_given_a_seeded_generator(attack: str) -> None:
    model, (x, y) = Mlp(5, 4, 9).double(), _batch(9)
    kwargs = dict(eps=0.1, step_size=0.01, steps=4)
    first = _run(attack, model, x, y, seed=11, **kwargs)
    assert torch.equal(first, _run(attack, model, x, y, seed=11, **kwargs))
    assert not torch.equal(first, _run(attack, model, x, y, seed=12, **kwargs))


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_work_under_no_grad(attack: str) -> None:
    """Evaluation loops often run under ``torch.no_grad()``; the attack must still ascend."""
    model, (x, y) = Mlp(5, 4, 10).double(), _batch(10)
    kwargs = dict(eps=0.1, step_size=0.03, steps=3, record=True)
    expected = _run(attack, model, x, y, **kwargs)
    with torch.no_grad():
        got = _run(attack, model, x, y, **kwargs)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_pgd_without_random_start_starts_at_x() -> None:
    model, (x, y) = Mlp(5, 4, 12).double(), _batch(12)
    assert torch.equal(pgd(model, x, y, eps=0.1, step_size=0.03, steps=0,
                           random_start=False), x)


def test_pgd_random_start_is_uniform_over_the_box() -> None:
    x = torch.full((20_000, 1), 0.5, dtype=f64)
    start = pgd(nn.Linear(1, 2).double(), x, torch.zeros(20_000, dtype=torch.long), eps=0.1,
                step_size=0.0, steps=0, generator=torch.Generator().manual_seed(0))
    delta = (start - x).flatten()
    assert delta.abs().max() <= 0.1
    # Uniform on [−0.1, 0.1]: mean 0 and std 0.1/√3 ≈ 0.0577; 20k draws give ~4e-4 noise.
    assert abs(delta.mean().item()) < 2e-3
    assert abs(delta.std().item() - 0.1 / 3**0.5) < 2e-3


BAD_ARGS = [
    dict(eps=-0.1, step_size=0.01, steps=1),
    dict(eps=float("nan"), step_size=0.01, steps=1),
    dict(eps=0.1, step_size=-0.01, steps=1),
    dict(eps=0.1, step_size=0.01, steps=-1),
    dict(eps=0.1, step_size=0.01, steps=2.5),
]


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("kwargs", BAD_ARGS)
def test_attacks_reject_bad_arguments(attack: str, kwargs: dict[str, float]) -> None:
    model, (x, y) = Mlp(5, 4, 13).double(), _batch(13)
    with pytest.raises(ValueError, match="must be"):
        _run(attack, model, x, y, **kwargs)


def test_tpgd_rejects_negative_init_std() -> None:
    model, (x, _) = Mlp(5, 4, 14).double(), _batch(14)
    with pytest.raises(ValueError, match="init_std"):
        tpgd(model, x, eps=0.1, step_size=0.01, steps=1, init_std=-1.0)
