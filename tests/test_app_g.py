"""App. G's batch metrics (Eqs. 4-7) against the equations, computed here independently.

`steps.train_step` takes CE's gradient from the step's own graph and KL's as the difference
(so that monitoring leaves the step bit-identical). Here each equation is computed the
plain way: a separate graph per term, the KL of Eq. 1 written out, the SGD update applied
by hand, on a float64 net without BatchNorm. The step takes its norms in float32 (what
batches.jsonl stores), so the two agree to float32 rounding (REL); a wrong term, a missing
β or a re-attacked x_adv is off by far more.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from factories import digits
from hypothesis import given, settings
from hypothesis import strategies as st

from trades_repro import steps
from trades_repro.spec import parse_spec

LR = 0.1
REL = 1e-6  # float32 norms of float64 gradients


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12), torch.nn.Tanh(),
                               torch.nn.Linear(12, 10)).double()


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(9, 1, 8, 8, generator=gen, dtype=torch.float64)
    x_adv = (x + 0.1 * torch.rand(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return x, x_adv, torch.randint(0, 10, (9,), generator=gen)


def _ours(seed: int, beta: float, monkeypatch) -> dict:
    """train_step's App. G metrics, with the inner max fixed to a known x_adv."""
    x, x_adv, y = _batch(seed)
    monkeypatch.setattr(steps, "inner_max", lambda *args: x_adv)
    net = _net(seed)
    spec = parse_spec(digits(method={"beta": beta}, monitor={"batch_metrics": True}))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    return steps.train_step(net, opt, x, y, spec, torch.Generator()).batch_metrics


def _grad(net: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))])


def _terms(net, x, x_adv, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1's two terms: CE(f(x), y) and the batch mean of KL(f(x) ‖ f(x + δ))."""
    logits, logits_adv = net(x), net(x_adv)
    p = F.softmax(logits, dim=1)
    kl = (p * (F.log_softmax(logits, dim=1) - F.log_softmax(logits_adv, dim=1))).sum(1).mean()
    return F.cross_entropy(logits, y), kl


def _reference(seed: int, beta: float) -> dict:
    x, x_adv, y = _batch(seed)
    net = _net(seed)
    g_ce = _grad(net, _terms(net, x, x_adv, y)[0])  # Eq. 5
    g_kl = _grad(net, beta * _terms(net, x, x_adv, y)[1])  # Eq. 6
    ce, kl = _terms(net, x, x_adv, y)
    before = _grad(net, ce + beta * kl)  # Eq. 4's ∇θ L, a graph of its own
    with torch.no_grad():  # one plain SGD step by hand
        offset = 0
        for p in net.parameters():
            p -= LR * before[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
    ce, kl = _terms(net, x, x_adv, y)  # the same batch and x_adv at the new weights
    after = _grad(net, ce + beta * kl)
    return {"w_grad_norm": before.norm().item(), "ce_norm": g_ce.norm().item(),
            "kl_norm": g_kl.norm().item(),
            "grad_cosine_similarity": (before @ after / (before.norm() * after.norm())).item()}


SEEDS_AND_BETAS = given(seed=st.integers(0, 10_000), beta=st.sampled_from([1.0, 3.0, 6.0]))


@settings(max_examples=15, deadline=None)
@SEEDS_AND_BETAS
def test_app_g_w_grad_norm_is_eq_4(seed, beta, monkeypatch_session):
    got = _ours(seed, beta, monkeypatch_session)
    assert got["w_grad_norm"] == pytest.approx(_reference(seed, beta)["w_grad_norm"], rel=REL)


@settings(max_examples=15, deadline=None)
@SEEDS_AND_BETAS
def test_app_g_ce_norm_is_eq_5(seed, beta, monkeypatch_session):
    got = _ours(seed, beta, monkeypatch_session)
    assert got["ce_norm"] == pytest.approx(_reference(seed, beta)["ce_norm"], rel=REL)


@settings(max_examples=15, deadline=None)
@SEEDS_AND_BETAS
def test_app_g_kl_norm_is_eq_6_with_its_beta(seed, beta, monkeypatch_session):
    """Eq. 6's KL_Norm carries the 1/λ = β factor: it is the norm of β·KL's gradient."""
    got, want = _ours(seed, beta, monkeypatch_session), _reference(seed, beta)
    assert got["kl_norm"] == pytest.approx(want["kl_norm"], rel=REL, abs=1e-12)


@settings(max_examples=15, deadline=None)
@SEEDS_AND_BETAS
def test_app_g_grad_cosine_is_eq_7(seed, beta, monkeypatch_session):
    """Eq. 7: ∇L before the step against ∇L after it, on the same batch and x_adv."""
    got = _ours(seed, beta, monkeypatch_session)["grad_cosine_similarity"]
    assert got == pytest.approx(_reference(seed, beta)["grad_cosine_similarity"], rel=REL)


@pytest.fixture(scope="module")
def monkeypatch_session():
    """A monkeypatch that hypothesis's repeated examples may share (function-scoped ones may
    not be reused across examples)."""
    with pytest.MonkeyPatch.context() as patch:
        yield patch
