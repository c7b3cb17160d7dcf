"""L∞ attacks: Madry PGD on cross-entropy and TRADES' TPGD on KL (paper Eq. 1, Sec. 3.2).

Both attacks share one contract, chosen to match official TRADES and to keep evaluation
honest:

* the model runs in **eval mode** for the whole attack (BatchNorm uses, and never updates,
  its running statistics), and every submodule's previous mode is restored afterwards, even
  when the forward pass raises;
* gradients are taken with ``torch.autograd.grad`` w.r.t. the input only, so parameters'
  ``.grad`` is never touched;
* the objective is the **sum** over the batch, so each example's input gradient is its own
  loss's gradient, not divided by the batch size;
* attacks run in the dtype of ``x``; an enclosing ``torch.autocast`` is switched off;
* ``record=True`` also returns the input gradient at every iterate x^0 … x^k (the last one
  at the returned point), which is what FOSC (Eq. 2) and SGCS (Eq. 3) consume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Objective = Callable[[Tensor], Tensor]


def project_linf(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Nearest point of the L∞ ball ``[x - eps, x + eps]`` ∩ ``[0, 1]`` to ``x_adv``.

    This is the Π_S of PGD: clip to the ε-box around ``x``, then to the valid image range,
    in the order official TRADES uses. Whenever the two sets intersect (always, for
    ``x`` in [0, 1]) the result is the elementwise ``clamp(x_adv, max(x - eps, 0),
    min(x + eps, 1))``. If ``x`` lies more than ``eps`` outside [0, 1] (e.g. a noised input
    of App. A, Alg. 1 line 8) the result is the point of [0, 1] nearest the box.

    Args:
        x_adv: candidate point, any shape.
        x: centre of the ball, same shape as ``x_adv``.
        eps: radius ε ≥ 0.

    Returns:
        Tensor shaped like ``x_adv``.

    Example:
        >>> project_linf(torch.tensor([0.5, -0.2]), torch.tensor([0.3, 0.02]), 0.1)
        tensor([0.4000, 0.0000])
    """
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    record: bool = False,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """L∞ PGD on cross-entropy (Madry et al., 2018): the white-box attack of Sec. 3.2.

    x^0 = Π(x + U[-ε, ε]) (or x^0 = x without ``random_start``), then
    x^{i+1} = Π(x^i + α · sign(∇ CE(f(x^i), y))) with Π = :func:`project_linf`.

    Args:
        model: classifier mapping ``[B, ...]`` inputs to ``[B, K]`` logits.
        x: clean inputs ``[B, ...]`` in [0, 1].
        y: labels ``[B]`` (int64).
        eps: L∞ radius ε ≥ 0 (App. B: 8/255).
        step_size: α ≥ 0 (App. B: 2/255).
        steps: number of steps k ≥ 0 (PGD-10 for model selection).
        random_start: draw x^0 uniformly in the box (with ``generator``) and project it.
        record: also return the gradient trace.
        generator: source of the random start; must live on ``x``'s device.
        noise: the random start's U[0, 1) draws, shaped like ``x`` (then ``generator`` is
            unused). Drawing them once for a whole data set and slicing per batch makes the
            result independent of the batch size.

    Returns:
        The detached adversarial batch x^k, shaped like ``x``; with ``record=True`` the pair
        ``(x^k, trace)`` where ``trace[i]`` (shape ``[k + 1, *x.shape]``) is the input
        gradient of the summed per-example CE at x^i, so ``trace[-1]`` is taken at x^k.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x, y = torch.rand(2, 4), torch.tensor([0, 2])
        >>> x_adv, trace = pgd(net, x, y, eps=8 / 255, step_size=2 / 255, steps=10,
        ...                    record=True)
        >>> trace.shape
        torch.Size([11, 2, 4])
    """
    _check_budget(eps=eps, step_size=step_size, steps=steps)
    x = x.detach()
    start = x
    if random_start:
        if noise is None:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        elif noise.shape != x.shape:
            raise ValueError(f"pgd: noise shape {tuple(noise.shape)} != x {tuple(x.shape)}")
        start = project_linf(x + eps * (2 * noise.to(x) - 1), x, eps)

    def objective(x_adv: Tensor) -> Tensor:
        return F.cross_entropy(model(x_adv), y, reduction="sum")

    with _attack_mode(model, x):
        return _sign_ascent(objective, x, start, eps, step_size, steps, record)


def tpgd(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    init_std: float = 0.001,
    project_start: bool = False,
    record: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """TRADES' inner maximisation (TPGD, paper Eq. 1): ascend KL(f(x) ‖ f(x')).

    x^0 = x + σ·N(0, I) with σ = ``init_std`` (projected onto the box ∩ [0, 1] only with
    ``project_start``), then
    x^{i+1} = Π(x^i + α · sign(∇_{x'} KL(softmax f(x) ‖ softmax f(x^i)))), Π =
    :func:`project_linf`. The objective is
    ``kl_div(log_softmax(f(x')), softmax(f(x)), reduction="sum")``: the clean distribution
    is the *first* argument of KL, as in Eq. 1 and official TRADES.

    The iterates are official TRADES' (``trades.py``, ``l_inf``), bit for bit where the
    kernels are deterministic, with fewer passes: the official loop recomputes
    ``softmax(f(x))`` at every step; in eval mode that is the same value, and as the KL
    target it adds nothing to the gradient w.r.t. x', so it is computed once here, under
    ``no_grad`` (11 forwards and 10 backwards instead of 20 and 10). Like the official
    loop, the first gradient is taken at the unprojected start, which can leave [0, 1] at
    saturated pixels; ``project_start=True`` projects it first, which changes the attack
    there (iterates can then differ by up to 2ε; many pixels of digits sit at 0).

    Args:
        model: classifier mapping ``[B, ...]`` inputs to ``[B, K]`` logits.
        x: clean inputs ``[B, ...]`` in [0, 1].
        eps: L∞ radius ε ≥ 0 (App. B: 8/255; official TRADES uses 0.031).
        step_size: α ≥ 0 (App. B: 2/255; official TRADES uses 0.007).
        steps: number of steps k ≥ 0 (App. B: 10).
        init_std: σ ≥ 0 of the Gaussian start; 0.001 as official TRADES, which needs it
            because the KL gradient vanishes at x' = x.
        project_start: project x^0 onto the box ∩ [0, 1] (official TRADES does not).
        record: also return the gradient trace.
        generator: source of the start noise; must live on ``x``'s device.

    Returns:
        The detached adversarial batch x^k, shaped like ``x``; with ``record=True`` the pair
        ``(x^k, trace)`` where ``trace[i]`` (shape ``[k + 1, *x.shape]``) is the gradient of
        the KL objective w.r.t. x' at x^i, so ``trace[-1]`` is taken at x^k.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x_adv = tpgd(net, torch.rand(2, 4), eps=8 / 255, step_size=2 / 255, steps=10)
        >>> x_adv.shape
        torch.Size([2, 4])
    """
    _check_budget(eps=eps, step_size=step_size, steps=steps)
    if init_std < 0:
        raise ValueError(f"tpgd: init_std must be >= 0, got {init_std}")
    x = x.detach()
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    start = x + init_std * noise
    if project_start:
        start = project_linf(start, x, eps)
    with _attack_mode(model, x):
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)

        def objective(x_adv: Tensor) -> Tensor:
            return F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")

        return _sign_ascent(objective, x, start, eps, step_size, steps, record)


def _check_budget(*, eps: float, step_size: float, steps: int) -> None:
    if not eps >= 0:
        raise ValueError(f"attack: eps must be >= 0, got {eps}")
    if not step_size >= 0:
        raise ValueError(f"attack: step_size must be >= 0, got {step_size}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"attack: steps must be an integer >= 0, got {steps!r}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for a block; each submodule's own mode restored after, even on error.

    ``model.train(was_training)`` would not do: it sets every submodule to one mode, so a
    submodule kept in eval mode inside a training model (a frozen BatchNorm) would come
    back in training mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """The parameters stop requiring gradients for the block, and start again after.

    An attack needs only its input's gradient, but autograd computes the gradient of every
    leaf that requires one whenever a caller uses ``backward()`` instead of
    ``torch.autograd.grad(..., [x])``: AutoAttack's FAB does, at each of its iterations
    (FAB-T on ResNet-18 1.29x as fast frozen on a CPU, x_adv bit-identical, and the model's
    ``.grad`` left untouched: benchmarks/bench_aa_cost.py). A torch.compile'd model's
    backward (AOTAutograd) likewise computes every input gradient it can (TPGD-10 on
    ResNet-18, batch 32, with the aot_eager backend: 6.0 s -> 4.3 s, x_adv bit-identical).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def _attack_mode(model: nn.Module, x: Tensor) -> Iterator[None]:
    """Eval mode, full precision and frozen weights for the attack; all restored after."""
    with eval_mode(model), torch.autocast(x.device.type, enabled=False), frozen_weights(model):
        yield


def _sign_ascent(
    objective: Objective,
    x: Tensor,
    start: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    record: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    x_adv, trace = start, []
    for _ in range(int(steps)):
        grad = _input_grad(objective, x_adv)
        if record:
            trace.append(grad)
        x_adv = project_linf(x_adv + step_size * grad.sign(), x, eps)
    if not record:
        return x_adv
    trace.append(_input_grad(objective, x_adv))
    return x_adv, torch.stack(trace)


def _input_grad(objective: Objective, x_adv: Tensor) -> Tensor:
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(objective(x_adv), x_adv)
    return grad.detach()
