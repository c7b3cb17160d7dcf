"""AWP, pinned where mutation testing found tests/test_awp.py silent (docs/testing.md):
App. B's default radius, the proxy's one plain SGD step, β = 0, and the whole messages."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo  # noqa: F401  torch.optim imports it on first use (~6 s); here, at collection
import torch.nn.functional as F
from torch import Tensor, nn

from trades_repro.awp import TradesAWP
from trades_repro.spec import AWPSpec

f64 = torch.float64


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(9, 5, generator=g, dtype=f64)
    x_adv = (x + 0.05 * torch.randn(x.shape, generator=g, dtype=f64)).clamp(0, 1)
    return x, x_adv, torch.randint(0, 3, (9,), generator=g)


def _loss_grads(
    model: nn.Module, batch: tuple[Tensor, Tensor, Tensor], beta: float
) -> dict[str, Tensor]:
    """∇ of CE + β·KL(clean ‖ adv) (batch mean) in train mode, on a copy, written out."""
    scratch = copy.deepcopy(model).train()
    x, x_adv, y = batch
    nat, adv = scratch(x), scratch(x_adv)
    p = F.softmax(nat, dim=1)
    kl = (p * (F.log_softmax(nat, dim=1) - F.log_softmax(adv, dim=1))).sum(1).mean()
    loss = F.cross_entropy(nat, y) + beta * kl
    params = dict(scratch.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def test_default_radius_is_app_bs_0_005() -> None:
    """App. B: "For AWP, we choose radius 0.005"; the library default and the spec's."""
    model, batch = _net(), _batch()
    diff = TradesAWP(model, copy.deepcopy(model), beta=3.0).compute(*batch)
    params = dict(model.named_parameters())
    for name, d in diff.items():
        assert d.norm().item() == pytest.approx(0.005 * params[name].norm().item(), rel=1e-12)
    assert AWPSpec().gamma == 0.005


@pytest.mark.parametrize("proxy_lr", [None, 0.3])
def test_the_proxy_takes_one_plain_sgd_step_up_the_loss(proxy_lr: float | None) -> None:
    """Every proxy parameter moves by lr·∇L (lr 0.01 unless given; no momentum, no decay),
    and the proxy's gradients are freed afterwards (a network's worth of memory)."""
    model, batch = _net(), _batch()
    kwargs = {} if proxy_lr is None else {"proxy_lr": proxy_lr}
    awp = TradesAWP(model, copy.deepcopy(model), beta=2.0, **kwargs)
    awp.compute(*batch)
    lr, grads = proxy_lr or 0.01, _loss_grads(model, batch, 2.0)
    for (name, w), q in zip(model.named_parameters(), awp.proxy.parameters(), strict=True):
        torch.testing.assert_close(q.detach(), w.detach() + lr * grads[name], rtol=0, atol=1e-15)
        assert q.grad is None, name


def test_beta_zero_ascends_the_cross_entropy_alone() -> None:
    """β ≥ 0 (the docstring's range): β = 0 is allowed and perturbs along ∇CE only."""
    model, batch = _net(), _batch()
    diff = TradesAWP(model, copy.deepcopy(model), gamma=0.01, beta=0.0).compute(*batch)
    grads, params = _loss_grads(model, batch, 0.0), dict(model.named_parameters())
    for name, d in diff.items():
        g = grads[name]
        want = 0.01 * params[name].detach().norm() / g.norm() * g
        torch.testing.assert_close(d, want, rtol=1e-9, atol=1e-15)


def test_bad_proxies_are_refused_with_whole_messages() -> None:
    model = _net()
    with pytest.raises(
        ValueError,
        match=r"^TradesAWP: proxy shares parameters with the model; "
        r"pass a copy$",
    ):
        TradesAWP(model, model, beta=3.0)
    with pytest.raises(
        ValueError,
        match=r"^TradesAWP: proxy must have the model's parameter "
        r"names and shapes$",
    ):
        TradesAWP(model, nn.Linear(2, 2), beta=3.0)
