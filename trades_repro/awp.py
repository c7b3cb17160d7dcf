"""Adversarial Weight Perturbation on the TRADES loss (Wu et al. 2020; paper App. H).

App. H trains TRADES with AWP to test whether flattening the weight-loss landscape removes
the PGD-10 / AutoAttack gap (it does not, Table 7). We follow the official TRADES-AWP code
(github.com/csdongxian/AWP, ``trades_AWP/utils_awp.py`` and ``trades_AWP/train_trades_cifar.py``)
in everything that changes the perturbation:

* **Order within a step.** TPGD inputs first (model in eval mode), then
  :meth:`TradesAWP.compute` and :meth:`TradesAWP.perturb`, then the ordinary TRADES loss,
  backward and optimiser step *at the perturbed weights*, then :meth:`TradesAWP.restore`,
  which subtracts the same ``diff``: the update is kept, the perturbation is not.
* **What is ascended.** One step of plain SGD (no momentum, no weight decay) on a scratch
  proxy network loaded with the model's state, in train mode, *up* the TRADES loss
  ``CE(f(x), y) + β · (1/B) Σ_b KL(softmax f(x_b) ‖ softmax f(x'_b))`` — the same Eq. 1 form
  and KL direction as training (official ``kl_div(log_softmax(adv), softmax(nat),
  'batchmean')``), with the clean distribution not detached.
* **Which parameters.** Parameters whose name contains ``"weight"`` and that have more than
  one dimension: conv and linear weights. BatchNorm affine parameters, biases and buffers
  are never perturbed.
* **Radius.** Per layer, ``d_l = γ · ‖w_l‖ / (‖w̃_l − w_l‖ + 1e-20) · (w̃_l − w_l)`` with
  ``w̃`` the proxy's weights after its step, so ``‖d_l‖ = γ‖w_l‖`` (Frobenius norms). The
  default ``γ = 0.005`` is App. B's AWP radius and the TRADES-AWP default.
* **BatchNorm.** Only the proxy's running statistics move during the ascent (the recipe's
  reason for a proxy); the model's buffers, weights and ``.grad`` are untouched.
* **Warm-up.** The recipe applies AWP when ``epoch >= awp_warmup`` with 1-based epochs and
  default ``awp_warmup = 10``: epochs 1-9 are plain TRADES and AWP starts *in* epoch 10.
  :func:`awp_active` is exactly that test.

Where we differ, none of it changing the perturbation beyond float rounding:

* The recipe returns ``d`` at radius ``‖w_l‖`` and multiplies by γ inside
  ``perturb``/``restore``; we fold γ into ``compute``.
* The recipe evaluates the proxy on the clean batch twice (once for CE, once as KL target);
  we use one clean forward. In train mode BatchNorm uses the batch's own statistics, so the
  loss and its gradient are the same (the proxy's running statistics are scratch).
* Proxy learning rate. TRADES-AWP builds its proxy optimiser with the training lr
  (``SGD(proxy.parameters(), lr=args.lr)``, 0.1); AT-AWP uses 0.01. Runs take
  ``method.awp.proxy_lr`` (default 0.1, as TRADES-AWP); :class:`TradesAWP` alone defaults to
  0.01. The value cancels in the normalisation above — one plain SGD step gives
  ``w̃ − w = lr · ∇L`` — so it matters only through float rounding of ``w̃ − w``.
* Order of the model's train-mode forwards (after ``perturb``). The recipe's loop runs them
  adversarial, clean (KL target), clean (CE); ours, the official TRADES step's (see
  ``trades_repro.steps``), runs clean, adversarial, then re-applies the clean batch's
  BatchNorm update without a third forward. BatchNorm normalises with the batch's own
  statistics in train mode, so the perturbation, loss and gradients are the same; only the
  running statistics differ slightly: with momentum 0.1 the adversarial batch's weight in
  them is 0.1 · 0.9² = 0.081 in the recipe and 0.1 · 0.9 = 0.09 here (the clean batch's
  0.19 and 0.181), with the same ``num_batches_tracked``.
* With ``γ = 0`` the recipe switches AWP off entirely; here ``compute`` returns zeros.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trades_repro.losses import trades_objective

_EPS = 1e-20  # the recipe's guard against a zero ascent step in a layer


class TradesAWP:
    """One-step adversarial weight perturbation of ``model`` on the TRADES loss.

    Args:
        model: the network being trained; perturbed in place by :meth:`perturb`.
        proxy: a scratch network with the same parameter names and shapes (e.g.
            ``copy.deepcopy(model)``), sharing no parameters with ``model``.
        gamma: relative per-layer radius γ ≥ 0 (App. B: 0.005).
        proxy_lr: lr of the proxy's plain SGD step; cancels up to rounding (module doc).
        beta: TRADES β ≥ 0 of the ascended loss; use the training β.

    Example:
        >>> awp = TradesAWP(net, copy.deepcopy(net), beta=3.0)
        >>> diff = awp.compute(x, x_adv, y)   # after TPGD, before the TRADES loss
        >>> awp.perturb(diff); loss.backward(); optimizer.step(); awp.restore(diff)
    """

    def __init__(self, model: nn.Module, proxy: nn.Module, *, gamma: float = 0.005,
                 proxy_lr: float = 0.01, beta: float) -> None:
        _check_args(gamma, proxy_lr, beta)
        _check_proxy(model, proxy)
        self.model, self.proxy = model, proxy
        self.gamma, self.beta = gamma, beta
        # maximize=True: the step goes up the loss, as the recipe's step on −loss does
        self._proxy_optim = torch.optim.SGD(proxy.parameters(), lr=proxy_lr, maximize=True)
        self._params = {name: p for name, p in model.named_parameters()
                        if p.dim() > 1 and "weight" in name}

    def compute(self, x_nat: Tensor, x_adv: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The perturbation ``{name: d_l}`` with ``‖d_l‖ = γ‖w_l‖`` (detached tensors).

        Args:
            x_nat: clean inputs ``[B, C, H, W]``.
            x_adv: TPGD inputs, same shape.
            y: labels ``[B]`` (int64).
        """
        self._ascend(x_nat.detach(), x_adv.detach(), y)
        proxy_params = dict(self.proxy.named_parameters())
        with torch.no_grad():
            return {name: self._scaled(w, proxy_params[name] - w)
                    for name, w in self._params.items()}

    def perturb(self, diff: dict[str, Tensor]) -> None:
        """``w_l += d_l`` in place for every layer in ``diff``."""
        self._add(diff, sign=1.0)

    def restore(self, diff: dict[str, Tensor]) -> None:
        """``w_l -= d_l`` in place; undoes :meth:`perturb` up to one rounding per element."""
        self._add(diff, sign=-1.0)

    def _ascend(self, x_nat: Tensor, x_adv: Tensor, y: Tensor) -> None:
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        loss = trades_objective(self.proxy(x_nat), self.proxy(x_adv), y, self.beta)
        self._proxy_optim.zero_grad(set_to_none=True)
        loss.backward()
        self._proxy_optim.step()
        self._proxy_optim.zero_grad(set_to_none=True)  # free the proxy's grads

    def _scaled(self, w: Tensor, step: Tensor) -> Tensor:
        return self.gamma * w.norm() / (step.norm() + _EPS) * step

    def _add(self, diff: dict[str, Tensor], sign: float) -> None:
        unknown = diff.keys() - self._params.keys()
        if unknown:
            raise ValueError(f"TradesAWP: diff names no perturbable parameter: {sorted(unknown)}")
        with torch.no_grad():
            for name, d in diff.items():
                self._params[name].add_(d, alpha=sign)


def awp_active(epoch: int, warmup: int) -> bool:
    """Whether AWP runs in ``epoch`` (1-based): the recipe's ``epoch >= awp_warmup``.

    So ``warmup = 10`` (the TRADES-AWP default) leaves epochs 1-9 unperturbed and perturbs
    from epoch 10 on; ``warmup`` 0 or 1 perturbs every epoch.

    Example:
        >>> awp_active(9, 10), awp_active(10, 10)
        (False, True)
    """
    if epoch < 1:
        raise ValueError(f"awp_active: epochs are 1-based, got epoch={epoch}")
    if warmup < 0:
        raise ValueError(f"awp_active: warmup must be >= 0, got {warmup}")
    return epoch >= warmup


def _check_args(gamma: float, proxy_lr: float, beta: float) -> None:
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"TradesAWP: gamma must be finite and >= 0, got {gamma}")
    if not (math.isfinite(proxy_lr) and proxy_lr > 0):
        raise ValueError(f"TradesAWP: proxy_lr must be finite and > 0, got {proxy_lr}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"TradesAWP: beta must be finite and >= 0, got {beta}")


def _check_proxy(model: nn.Module, proxy: nn.Module) -> None:
    shapes = {n: p.shape for n, p in model.named_parameters()}
    if shapes != {n: p.shape for n, p in proxy.named_parameters()}:
        raise ValueError("TradesAWP: proxy must have the model's parameter names and shapes")
    if {id(p) for p in model.parameters()} & {id(p) for p in proxy.parameters()}:
        raise ValueError("TradesAWP: proxy shares parameters with the model; pass a copy")
