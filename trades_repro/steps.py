"""One optimiser step of each training variant, and App. G's per-step gradient metrics.

The TRADES step gives official TRADES' results (`trades.py` and its training loop: the same
TPGD iterates, loss, gradients, weights and BatchNorm buffers; `tests/test_exact_path.py`)
with fewer passes:

* inner max: :func:`~trades_repro.attacks.tpgd` computes the eval-mode clean distribution
  once instead of at each of the 10 steps (11 forwards and 10 backwards instead of 20 + 10);
* outer loss: official TRADES runs three train-mode forwards: clean (for CE), adversarial,
  and clean again (for the KL target). In train mode BatchNorm normalises with the batch's
  own statistics, so the third forward returns the first one's logits: reusing them gives
  the same loss and gradient. The third forward's only other effect is one more momentum
  update of BatchNorm's running statistics with the clean batch's statistics, and one more
  `num_batches_tracked`; :class:`CleanStatsRepeat` applies exactly that without the forward.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from trades_repro.attacks import pgd, tpgd
from trades_repro.awp import TradesAWP
from trades_repro.losses import trades_terms
from trades_repro.spec import ExperimentSpec


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class StepResult:
    """One step's figures as 0-dim device tensors: reading them is the caller's host sync."""

    loss: Tensor
    clean_correct: Tensor
    adv_correct: Tensor
    batch_metrics: dict[str, float] | None  # App. G metrics when monitored


def inner_max(model: nn.Module, x: Tensor, y: Tensor, spec: ExperimentSpec,
              generator: torch.Generator) -> Tensor:
    """The variant's inner maximisation: TPGD (Eq. 1) or PGD on CE (App. F's "Modified")."""
    a = spec.method.attack
    if spec.method.name == "trades_pgd_inner":
        return pgd(model, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps,
                   random_start=True, generator=generator)
    return tpgd(model, x, eps=a.eps, step_size=a.step_size, steps=a.steps,
                init_std=a.init_std, project_start=a.init_projected, generator=generator)


class CleanStatsRepeat:
    """Official TRADES' third (clean) forward, as far as BatchNorm's buffers see it.

    A train-mode BatchNorm with momentum m moves its running statistic r to
    (1 − m)·r + m·s, where s is the batch's statistic. Official TRADES updates with the clean
    batch (r1), the adversarial batch (r2), then the clean batch again at the same weights,
    so with the same s: r3 = (1 − m)·r2 + m·s. The clean batch's term m·s is read off the
    first update, m·s = r1 − (1 − m)·r0, so no third forward is needed. The update must be
    applied after backward: autograd saved the running statistics with the forward.

    Use: construct before the clean forward, call :meth:`clean_done` right after it, and
    :meth:`apply` after backward.
    """

    def __init__(self, model: nn.Module) -> None:
        layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training
                  and m.track_running_stats]
        if any(m.momentum is None for m in layers):
            raise ValueError("CleanStatsRepeat: BatchNorm momentum=None (cumulative average) "
                             "is not supported")
        self._stats = [t for m in layers for t in (m.running_mean, m.running_var)]
        self._keep = [1.0 - m.momentum for m in layers for _ in range(2)]
        self._counts = [m.num_batches_tracked for m in layers]
        self._before = torch._foreach_mul(self._stats, self._keep) if layers else []  # (1-m)·r0
        self._term: list[Tensor] | None = None

    def clean_done(self) -> None:
        """Record m·s of the clean batch (call right after its train-mode forward)."""
        self._term = torch._foreach_sub(self._stats, self._before) if self._stats else []

    @torch.no_grad()
    def apply(self) -> None:
        """r ← (1 − m)·r + m·s and num_batches_tracked + 1, in every BatchNorm layer."""
        if self._term is None:
            raise RuntimeError("CleanStatsRepeat.apply: clean_done() was not called")
        if self._stats:  # one foreach kernel per op for all layers: no per-layer launches
            torch._foreach_mul_(self._stats, self._keep)
            torch._foreach_add_(self._stats, self._term)
            torch._foreach_add_(self._counts, 1)
        self._term = None


@dataclass(frozen=True)
class Outer:
    """The outer loss's terms and logits, and the pending third BatchNorm update."""

    ce: Tensor
    kl: Tensor
    logits_nat: Tensor
    logits_adv: Tensor
    bn_repeat: CleanStatsRepeat


def outer_terms(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Outer:
    """CE and KL of Eq. 1 from two train-mode forwards; see the module docstring."""
    model.train()
    repeat = CleanStatsRepeat(model)
    logits_nat = model(x)
    repeat.clean_done()
    logits_adv = model(x_adv)
    ce, kl = trades_terms(logits_nat, logits_adv, y)
    return Outer(ce, kl, logits_nat, logits_adv, repeat)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               spec: ExperimentSpec, generator: torch.Generator,
               awp: TradesAWP | None = None) -> StepResult:
    """Inner max → (AWP perturb) → Eq. 1 outer loss → SGD step → (AWP restore).

    No host sync unless App. G's metrics are monitored: the loss and hit counts come back
    as device tensors, and the caller checks finiteness (see `train.train_epoch`).
    """
    x_adv = inner_max(model, x, y, spec, generator)
    diff = awp.compute(x, x_adv, y) if awp is not None else None
    if diff is not None:
        awp.perturb(diff)
    beta, monitored = spec.method.beta, spec.monitor.batch_metrics
    with _autocast(spec, x):
        out = outer_terms(model, x, x_adv, y)
    loss = out.ce + beta * out.kl
    optimizer.zero_grad(set_to_none=True)
    metrics = _backward_with_norms(model, out.ce, loss) if monitored else None
    if not monitored:
        loss.backward()
    out.bn_repeat.apply()
    optimizer.step()
    if diff is not None:
        awp.restore(diff)
    if monitored:
        after = _full_grad_after_step(model, x, x_adv, y, spec)
        metrics["grad_cosine_similarity"] = F.cosine_similarity(
            metrics.pop("_grad_before"), after, dim=0).item()
    return StepResult(loss.detach(), _hits(out.logits_nat, y), _hits(out.logits_adv, y),
                      metrics)


def _hits(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(1) == y).sum()


def _autocast(spec: ExperimentSpec, x: Tensor):
    if spec.performance.precision == "bf16":
        return torch.autocast(x.device.type, dtype=torch.bfloat16)
    return nullcontext()


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _backward_with_norms(model: nn.Module, ce: Tensor, loss: Tensor) -> dict:
    """The step's own backward of the full loss (Eq. 4), plus CE's gradient (Eq. 5) taken
    first from the same graph; β·KL's (Eq. 6) is their difference.

    The gradient the optimiser sees comes from the same `loss.backward()` as an unmonitored
    step, bit for bit: summing separately taken CE and KL gradients instead rounds
    differently, and that float noise, compounded over an epoch, made a monitored run a
    different run (epoch 1's training loss 1.689 against 1.679 on Fashion-MNIST).
    """
    params = _params(model)
    g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    loss.backward()
    full = [_zero_if_none(p.grad, p) for p in params]
    g_kl = tuple(g - _zero_if_none(c, p) for g, c, p in zip(full, g_ce, params, strict=True))
    grad_before = torch.cat([g.detach().flatten().float() for g in full])
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
        out = outer_terms(model, x, x_adv, y)
    grads = torch.autograd.grad(out.ce + spec.method.beta * out.kl, _params(model),
                                allow_unused=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return torch.cat([_zero_if_none(g, p).flatten().float()
                      for g, p in zip(grads, _params(model), strict=True)])
