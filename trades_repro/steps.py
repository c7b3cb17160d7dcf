"""One optimiser step of each training variant, and App. G's per-step gradient metrics.

Default path vs `performance.fidelity` (official TRADES `trades.py` pass for pass):

* inner max: the default TPGD computes the clean distribution once and projects its start
  onto the box ∩ [0, 1]; fidelity recomputes the clean forward at every step (identical in
  eval mode) and takes the first gradient at the unprojected `x + 0.001·N(0, I)`, as the
  official loop does;
* outer loss: the default runs two train-mode forwards (clean, adversarial) and uses the clean
  logits both for CE and as the KL target; fidelity runs three (clean for CE, adversarial,
  clean again for the KL target). In train mode BatchNorm normalises with batch statistics,
  so the third forward returns the same logits: loss and gradients are the same. What
  differs is BatchNorm's running statistics, which take three momentum updates per step
  instead of two, and so the eval-mode model that validation and attacks see.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trades_repro.attacks import pgd, project_linf, tpgd
from trades_repro.awp import TradesAWP
from trades_repro.losses import trades_terms
from trades_repro.spec import ExperimentSpec


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class StepResult:
    loss: float
    clean_correct: int
    adv_correct: int
    batch_metrics: dict[str, float] | None  # App. G metrics when monitored


def inner_max(model: nn.Module, x: Tensor, y: Tensor, spec: ExperimentSpec,
              generator: torch.Generator) -> Tensor:
    """The variant's inner maximisation: TPGD (Eq. 1) or PGD on CE (App. F's "Modified")."""
    a = spec.method.attack
    if spec.method.name == "trades_pgd_inner":
        return pgd(model, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps,
                   random_start=True, generator=generator)
    if spec.performance.fidelity:
        return official_tpgd(model, x, eps=a.eps, step_size=a.step_size, steps=a.steps,
                             init_std=a.init_std, generator=generator)
    return tpgd(model, x, eps=a.eps, step_size=a.step_size, steps=a.steps,
                init_std=a.init_std, generator=generator)


def official_tpgd(model: nn.Module, x: Tensor, *, eps: float, step_size: float, steps: int,
                  init_std: float, generator: torch.Generator | None) -> Tensor:
    """TPGD exactly as official TRADES runs it (eval mode, clean forward at every step)."""
    was_training = model.training
    model.eval()
    x_adv = x.detach() + init_std * torch.randn(x.shape, generator=generator,
                                                dtype=x.dtype, device=x.device)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1),
                          reduction="sum")
            (grad,) = torch.autograd.grad(kl, [x_adv])
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    model.train(was_training)
    return x_adv.detach()


def outer_terms(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor,
                fidelity: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(CE, KL, clean logits, adversarial logits) in train mode; see the module docstring."""
    model.train()
    logits_nat = model(x)
    logits_adv = model(x_adv)
    if not fidelity:
        ce, kl = trades_terms(logits_nat, logits_adv, y)
        return ce, kl, logits_nat, logits_adv
    ce = F.cross_entropy(logits_nat, y)
    _, kl = trades_terms(model(x), logits_adv, y)  # official: a third forward as KL target
    return ce, kl, logits_nat, logits_adv


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               spec: ExperimentSpec, generator: torch.Generator,
               awp: TradesAWP | None = None) -> StepResult:
    """Inner max → (AWP perturb) → Eq. 1 outer loss → SGD step → (AWP restore)."""
    x_adv = inner_max(model, x, y, spec, generator)
    diff = awp.compute(x, x_adv, y) if awp is not None else None
    if diff is not None:
        awp.perturb(diff)
    beta, monitored = spec.method.beta, spec.monitor.batch_metrics
    with _autocast(spec, x):
        ce, kl, logits_nat, logits_adv = outer_terms(model, x, x_adv, y,
                                                     spec.performance.fidelity)
    loss = ce + beta * kl
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"non-finite training loss ({loss.item()})")
    optimizer.zero_grad(set_to_none=True)
    metrics = _backward_with_norms(model, ce, beta * kl) if monitored else loss.backward()
    optimizer.step()
    if diff is not None:
        awp.restore(diff)
    if monitored:
        after = _full_grad_after_step(model, x, x_adv, y, spec)
        metrics["grad_cosine_similarity"] = F.cosine_similarity(
            metrics.pop("_grad_before"), after, dim=0).item()
    return StepResult(loss.item(), _hits(logits_nat, y), _hits(logits_adv, y), metrics)


def _hits(logits: Tensor, y: Tensor) -> int:
    return int((logits.detach().argmax(1) == y).sum().item())


def _autocast(spec: ExperimentSpec, x: Tensor):
    if spec.performance.precision == "bf16":
        return torch.autocast(x.device.type, dtype=torch.bfloat16)
    return nullcontext()


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _backward_with_norms(model: nn.Module, ce: Tensor, weighted_kl: Tensor) -> dict:
    """Backward of CE and β·KL separately (Eqs. 5, 6); their sum is the full gradient (Eq. 4)."""
    params = _params(model)
    g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    g_kl = torch.autograd.grad(weighted_kl, params, allow_unused=True)
    full = []
    for p, a, b in zip(params, g_ce, g_kl, strict=True):
        p.grad = _zero_if_none(a, p) + _zero_if_none(b, p)
        full.append(p.grad.detach().flatten().float())
    grad_before = torch.cat(full)
    return {
        "w_grad_norm": grad_before.norm().item(),
        "ce_norm": _norm(g_ce),
        "kl_norm": _norm(g_kl),
        "_grad_before": grad_before,
    }


def _zero_if_none(g: Tensor | None, p: Tensor) -> Tensor:
    return torch.zeros_like(p) if g is None else g


def _norm(grads: tuple[Tensor | None, ...]) -> float:
    squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return torch.stack(squares).sum().sqrt().item() if squares else 0.0


def _full_grad_after_step(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor,
                          spec: ExperimentSpec) -> Tensor:
    """Eq. 7's ∇θL^after: the full loss on the *same* batch, clean and adversarial inputs
    unchanged (not re-attacked), at the updated weights.

    Re-attacking would mix the change of the adversarial examples into a metric meant to show
    how far one step turns the weight gradient. The extra train-mode forwards would move
    BatchNorm's running statistics, so they are saved and restored: measuring leaves training
    exactly as it would be without the monitor.
    """
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with _autocast(spec, x):
        ce, kl, _, _ = outer_terms(model, x, x_adv, y, spec.performance.fidelity)
    grads = torch.autograd.grad(ce + spec.method.beta * kl, _params(model), allow_unused=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return torch.cat([_zero_if_none(g, p).flatten().float()
                      for g, p in zip(grads, _params(model), strict=True)])
