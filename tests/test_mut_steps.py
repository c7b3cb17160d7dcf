"""The training step against official TRADES written out here, on a tiny float64 network.

Fast stand-ins for the end-to-end tests (tests/test_exact_path.py trains digits), written
where mutation testing found them silent (docs/testing.md): the App. F inner PGD, the spec's
TPGD start, AWP's order in a step, App. G's four metrics (Eqs. 4-7), bf16 autocast, hit
counts, and networks without BatchNorm or with a parameter outside the loss.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo  # noqa: F401  torch.optim imports it on first use (~6 s); here, at collection
import torch.nn.functional as F
from factories import digits
from torch import Tensor, nn

from trades_repro import steps
from trades_repro.awp import TradesAWP
from trades_repro.spec import ExperimentSpec, parse_spec

f64 = torch.float64
ATTACK = {"eps": 0.1, "step_size": 0.03, "steps": 3, "init_std": 0.01}  # σ not the default
LR, SEED = 0.1, 5


class Net(nn.Module):
    """Linear → (BatchNorm) → tanh → linear; optionally a parameter the loss never sees."""

    def __init__(
        self, batchnorm: bool = True, spare: bool = False, dtype: torch.dtype = f64
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.body = nn.Sequential(nn.Linear(6, 8), norm, nn.Tanh(), nn.Linear(8, 4))
        self.spare = nn.Parameter(torch.ones(3)) if spare else None
        self.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _spec(name: str = "trades", **extra: object) -> ExperimentSpec:
    return parse_spec(digits(method={"name": name, "attack": ATTACK}, **extra))


def _batch(dtype: torch.dtype = f64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(7, 6, generator=g, dtype=dtype), torch.randint(0, 4, (7,), generator=g)


def _box(v: Tensor, x: Tensor, eps: float) -> Tensor:
    return torch.maximum(torch.minimum(v, (x + eps).clamp(max=1)), (x - eps).clamp(min=0))


def _ascend(model: nn.Module, x: Tensor, start: Tensor, loss_of, a: dict) -> Tensor:
    """Sign ascent in eval mode, as official TRADES and Madry et al. write their loops."""
    model.eval()
    x_adv = start
    for _ in range(a["steps"]):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(x_adv), x_adv)
        x_adv = _box(x_adv.detach() + a["step_size"] * grad.sign(), x, a["eps"])
    model.train()
    return x_adv.detach()


def _official_tpgd(model: nn.Module, x: Tensor, a: dict = ATTACK) -> Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(SEED), dtype=x.dtype)
    return _ascend(
        model,
        x,
        x + a["init_std"] * noise,
        lambda v: F.kl_div(
            F.log_softmax(model(v), dim=1), F.softmax(model(x), dim=1), reduction="sum"
        ),
        a,
    )


def _madry_pgd(model: nn.Module, x: Tensor, y: Tensor, a: dict = ATTACK) -> Tensor:
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(SEED), dtype=x.dtype)
    start = _box(x + a["eps"] * (2 * u - 1), x, a["eps"])
    return _ascend(
        model, x, start, lambda v: -F.log_softmax(model(v), dim=1).gather(1, y[:, None]).sum(), a
    )


def _official_loss(
    model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float = 3.0
) -> tuple[Tensor, Tensor]:
    """Official TRADES' outer terms, its three train-mode forwards: CE, β·KL(clean ‖ adv)/B."""
    model.train()
    ce = F.cross_entropy(model(x), y)
    adv = F.log_softmax(model(x_adv), dim=1)
    kl = F.kl_div(adv, F.softmax(model(x), dim=1), reduction="sum")  # third forward
    return ce, beta * kl / len(x)


def _grads(model: nn.Module, loss: Tensor) -> list[Tensor]:
    params = [p for p in model.parameters() if p is not getattr(model, "spare", None)]
    return list(torch.autograd.grad(loss, params))


def _flat(grads: list[Tensor]) -> Tensor:
    return torch.cat([g.flatten() for g in grads])


def _step(model: nn.Module, x: Tensor, y: Tensor, spec: ExperimentSpec, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(99)  # the global RNG is not the step's: only `generator` may be used
    return steps.train_step(model, optimizer, x, y, spec, g, **kwargs)


def _sgd_reference(
    model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Weights after one plain SGD step on official TRADES' loss, and the BatchNorm buffers
    its three forwards leave (`num_batches_tracked` + 3), from a copy."""
    ref = copy.deepcopy(model)
    ce, kl = _official_loss(ref, x, x_adv, y)
    weights = [
        p.detach() - LR * g
        for p, g in zip(ref.body.parameters(), _grads(ref, ce + kl), strict=True)
    ]
    return weights, dict(ref.named_buffers())


def _assert_weights(model: nn.Module, want: list[Tensor]) -> None:
    for p, w in zip(model.body.parameters(), want, strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-12)


def test_inner_max_of_trades_is_tpgd_from_the_specs_gaussian_start() -> None:
    model, (x, _) = Net(), _batch()
    g = torch.Generator().manual_seed(SEED)
    got = steps.inner_max(model, x, None, _spec(), g)
    torch.testing.assert_close(got, _official_tpgd(model, x), rtol=0, atol=1e-15)


def test_inner_max_of_the_modified_variant_is_madry_pgd_on_the_labels() -> None:
    """App. F's "Modified": PGD on CE from a uniform start drawn from the step's generator."""
    model, (x, y) = Net(), _batch()
    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(99)
    got = steps.inner_max(model, x, y, _spec("trades_pgd_inner"), g)
    torch.testing.assert_close(got, _madry_pgd(model, x, y), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["trades", "trades_pgd_inner"])
@pytest.mark.parametrize("batchnorm", [True, False], ids=["batchnorm", "no_batchnorm"])
def test_a_step_is_sgd_on_the_official_loss_at_the_attacked_batch(
    name: str, batchnorm: bool
) -> None:
    """Also the hit counts: argmax of the train-mode logits before the step, per input."""
    model, (x, y) = Net(batchnorm), _batch()
    x_adv = _madry_pgd(model, x, y) if name == "trades_pgd_inner" else _official_tpgd(model, x)
    want, buffers = _sgd_reference(model, x, x_adv, y)
    with torch.no_grad():
        ref = copy.deepcopy(model).train()
        hits = [int((ref(v).argmax(dim=1) == y).sum()) for v in (x, x_adv)]
        ce, kl = _official_loss(ref, x, x_adv, y)
    out = _step(model, x, y, _spec(name))
    _assert_weights(model, want)
    assert dict(model.named_buffers()).keys() == buffers.keys()
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=0, atol=1e-15)
    assert [int(out.clean_correct), int(out.adv_correct)] == hits
    assert all(0 < h < len(y) for h in hits)  # B odd: a count and its complement differ
    torch.testing.assert_close(out.loss, ce + kl, rtol=1e-12, atol=0)


def test_awp_perturbs_after_the_attack_and_restores_after_the_step() -> None:
    """App. H's order: TPGD at w, d = γ‖w‖ ∇L/‖∇L‖ per multi-dim weight, SGD at w + d,
    then − d; so the kept update is − lr · ∇L(w + d)."""
    model, (x, y) = Net(), _batch()
    x_adv = _official_tpgd(model, x)
    scratch = copy.deepcopy(model)
    ce, kl = _official_loss(scratch, x, x_adv, y)
    weights = {n: p for n, p in scratch.named_parameters() if p.dim() > 1}
    g = dict(zip(weights, torch.autograd.grad(ce + kl, list(weights.values())), strict=True))
    d = {n: 0.01 * w.norm() / g[n].norm() * g[n] for n, w in weights.items()}
    with torch.no_grad():
        for n, p in scratch.named_parameters():
            p.add_(d.get(n, torch.zeros_like(p)))
    ce, kl = _official_loss(scratch, x, x_adv, y)
    update = _grads(scratch, ce + kl)
    want = [p.detach() - LR * u for p, u in zip(model.body.parameters(), update, strict=True)]
    awp = TradesAWP(model, copy.deepcopy(model), gamma=0.01, beta=3.0)
    _step(model, x, y, _spec("trades_awp"), awp=awp)
    _assert_weights(model, want)


def test_monitored_step_reports_eqs_4_to_7_and_trains_as_unmonitored() -> None:
    """W_Grad_Norm, CE_Norm, KL_Norm (of β·KL) and the cosine of ∇L before and after the
    step on the same inputs (not re-attacked); a parameter outside the loss keeps no
    gradient and is not decayed, with or without the monitor."""
    spec, (x, y) = _spec(monitor={"batch_metrics": True}), _batch()
    model, plain = Net(spare=True), Net(spare=True)
    x_adv = _official_tpgd(copy.deepcopy(model), x)
    ref = copy.deepcopy(model)
    ce, kl = _official_loss(ref, x, x_adv, y)
    g_ce, g_kl = _flat(_grads(ref, ce)), _flat(_grads(ref, kl))
    results = []
    for net, monitored in ((model, True), (plain, False)):
        net.spare.grad = torch.full_like(net.spare, 2.0)  # left over from elsewhere
        optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, weight_decay=0.1)
        s = spec if monitored else _spec()
        results.append(
            steps.train_step(net, optimizer, x, y, s, torch.Generator().manual_seed(SEED))
        )
        assert net.spare.grad is None and torch.equal(net.spare, torch.ones(3, dtype=f64))
    after = copy.deepcopy(model)
    ce, kl = _official_loss(after, x, x_adv, y)
    g_after = _flat(_grads(after, ce + kl))
    before = g_ce + g_kl
    cosine = (before @ g_after / (before.norm() * g_after.norm())).item()
    metrics = results[0].batch_metrics
    assert metrics.keys() == {"w_grad_norm", "ce_norm", "kl_norm", "grad_cosine_similarity"}
    assert metrics["w_grad_norm"] == pytest.approx(before.norm().item(), rel=1e-6)
    assert metrics["ce_norm"] == pytest.approx(g_ce.norm().item(), rel=1e-6)
    assert metrics["kl_norm"] == pytest.approx(g_kl.norm().item(), rel=1e-6)
    assert metrics["grad_cosine_similarity"] == pytest.approx(cosine, rel=1e-6)
    assert cosine < 0.999  # the step turned the gradient: a stale "after" would read 1
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_bf16_autocasts_the_outer_loss_to_bfloat16_whatever_the_default() -> None:
    """`precision: bf16` means bfloat16 even where autocast's default is another type
    (float16 on CUDA; set here for the CPU), for the step and for App. G's after-step pass."""
    model, (x, y) = Net(dtype=torch.float32), _batch(torch.float32)
    x_adv = _official_tpgd(copy.deepcopy(model), x)
    ref = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = sum(_official_loss(ref, x, x_adv, y)).item()
    fp32 = sum(_official_loss(copy.deepcopy(model), x, x_adv, y)).item()
    default = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)
    try:
        out = _step(
            model, x, y, _spec(performance={"precision": "bf16"}, monitor={"batch_metrics": True})
        )
    finally:
        torch.set_autocast_dtype("cpu", default)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert abs(out.loss.item() - fp32) > 2e-4 * abs(fp32)  # bf16's 8-bit mantissa: ~1e-3
    assert -1 <= out.batch_metrics["grad_cosine_similarity"] <= 1


def test_clean_stats_repeat_refusal_is_one_whole_message() -> None:
    with pytest.raises(
        ValueError,
        match=r"^CleanStatsRepeat: BatchNorm momentum=None "
        r"\(cumulative average\) is not supported$",
    ):
        steps.CleanStatsRepeat(nn.BatchNorm1d(3, momentum=None).train())
