"""The TRADES outer objective (paper Eq. 1; App. A, Alg. 1 line 13)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def trades_terms(logits_nat: Tensor, logits_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The two terms of the TRADES loss, kept apart so their gradients can be compared.

    ``ce = mean_b CE(f(x_b), y_b)`` and
    ``kl = (1/B) Σ_b KL(softmax f(x_b) ‖ softmax f(x'_b))``, i.e. official TRADES'
    ``KLDivLoss(size_average=False)(log_softmax(adv), softmax(nat)) / batch_size``. The
    clean distribution is the first KL argument (Eq. 1) and, as in the official code, is
    not detached: the KL gradient reaches ``logits_nat`` too.

    Args:
        logits_nat: logits on clean inputs, ``[B, K]``.
        logits_adv: logits on TPGD inputs, ``[B, K]``.
        y: labels ``[B]`` (int64).

    Returns:
        ``(ce, kl)``, two scalar tensors.

    Example:
        >>> nat, adv = torch.zeros(1, 2), torch.tensor([[0.0, 1.0]])
        >>> trades_terms(nat, adv, torch.tensor([0]))
        (tensor(0.6931), tensor(0.1201))
    """
    if logits_nat.dim() != 2 or logits_nat.shape != logits_adv.shape:
        raise ValueError(f"trades_terms: logits must both be [B, K], got "
                         f"{tuple(logits_nat.shape)} and {tuple(logits_adv.shape)}")
    if y.shape != logits_nat.shape[:1]:
        raise ValueError(f"trades_terms: y must be [B] = [{logits_nat.shape[0]}], "
                         f"got {tuple(y.shape)}")
    ce = F.cross_entropy(logits_nat, y)
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1),
                  reduction="sum")
    return ce, kl / logits_nat.shape[0]


def trades_objective(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES loss ``CE + β · KL`` (Eq. 1 with β = 1/λ; Sec. 3.1 default β = 3).

    See :func:`trades_terms` for the exact reductions.

    Args:
        logits_nat: logits on clean inputs, ``[B, K]``.
        logits_adv: logits on TPGD inputs, ``[B, K]``.
        y: labels ``[B]`` (int64).
        beta: weight β ≥ 0 of the KL term.

    Returns:
        Scalar tensor.

    Example:
        >>> nat, adv = torch.zeros(1, 2), torch.tensor([[0.0, 1.0]])
        >>> trades_objective(nat, adv, torch.tensor([0]), beta=3.0)
        tensor(1.0535)
    """
    if not beta >= 0:
        raise ValueError(f"trades_objective: beta must be >= 0, got {beta}")
    ce, kl = trades_terms(logits_nat, logits_adv, y)
    return ce + beta * kl
