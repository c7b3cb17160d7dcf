"""Gradient-masking metrics of Sec. 3.2 (FOSC, Eq. 2; SGCS, Eq. 3) and accuracy helpers."""

from __future__ import annotations

import torch
from torch import Tensor


def fosc(x_adv: Tensor, x: Tensor, grad: Tensor, eps: float) -> Tensor:
    """First-Order Stationary Condition of an adversarial example (Eq. 2; App. E).

    FOSC(x^k) = max_{δ ∈ S} ⟨x + δ − x^k, ∇ℓ(x^k)⟩ with S = {‖δ‖_∞ ≤ ε}, whose closed form
    (Wang et al., 2019) is ``eps * ‖grad‖_1 − ⟨x^k − x, grad⟩``. It is ≥ 0 for any x^k in
    the box and 0 when x^k is a first-order stationary point of the attack. As in Wang et
    al., S is the plain ε-box: the [0, 1] image range that the attack also enforces is
    ignored here, so a point clipped at 0 or 1 can have FOSC > 0.

    Args:
        x_adv: adversarial examples x^k, ``[B, ...]``.
        x: clean examples, same shape.
        grad: ∇ℓ at x^k (e.g. ``pgd(..., record=True)[1][-1]``), same shape.
        eps: L∞ radius ε ≥ 0.

    Returns:
        Per-example FOSC, shape ``[B]``; all non-batch dimensions are flattened.

    Example:
        >>> fosc(torch.tensor([[0.1]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), 0.25)
        tensor([0.3000])
    """
    if not x_adv.shape == x.shape == grad.shape:
        raise ValueError(f"fosc: shapes differ: x_adv {x_adv.shape}, x {x.shape}, "
                         f"grad {grad.shape}")
    if not eps >= 0:
        raise ValueError(f"fosc: eps must be >= 0, got {eps}")
    g = grad.flatten(1)
    return eps * g.abs().sum(1) - ((x_adv - x).flatten(1) * g).sum(1)


def sgcs(grads: Tensor) -> Tensor:
    """Step-wise Gradient Cosine Similarity (Eq. 3; Lee et al., 2021), per example.

    With g_i = sign(∇ℓ(x^i)) for the n recorded iterates, SGCS is the mean of
    CosSim(g_i, g_j) over the n(n − 1) ordered pairs i ≠ j. A zero sign vector (zero
    gradient) is defined to have cosine similarity 0 with everything. Eq. 3 also averages
    over the data; take ``.mean()`` of the result for that.

    Args:
        grads: gradient trace ``[n, B, ...]`` with n ≥ 2 (``pgd(..., record=True)[1]``).

    Returns:
        Per-example SGCS in [−1, 1], shape ``[B]``.

    Example:
        >>> sgcs(torch.tensor([[[1.0, 2.0]], [[3.0, 0.5]], [[-0.5, -0.5]]]))
        tensor([-0.3333])
    """
    if grads.dim() < 2 or grads.shape[0] < 2:
        raise ValueError(f"sgcs: need a trace [n, B, ...] with n >= 2 steps, got "
                         f"shape {tuple(grads.shape)}")
    n = grads.shape[0]
    # At least fp32, so that the integer-valued dot products below stay exact.
    dtype = torch.promote_types(grads.dtype, torch.float32)
    # [B, n, d]; reshape, not flatten(2): a trace [n, B] of scalar inputs has d = 1
    signs = grads.sign().to(dtype).reshape(n, grads.shape[1], -1).transpose(0, 1)
    dots = signs @ signs.transpose(1, 2)
    nnz = dots.diagonal(dim1=1, dim2=2)
    # Non-zero sign vectors have squared norm >= 1, so the floor only touches zero vectors.
    norms = (nnz.unsqueeze(2) * nnz.unsqueeze(1)).sqrt().clamp_min(1.0)
    cos = dots / norms
    off_diagonal = cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)
    return off_diagonal / (n * (n - 1))


def attack_sgcs(trace: Tensor) -> Tensor:
    """SGCS of a k-step attack from its recorded trace, over the k *step* gradients (Eq. 3).

    ``pgd(..., record=True)`` returns k + 1 gradients, at x^0 … x^k; the k steps were taken
    along the signs of the first k (x^{i+1} = Π(x^i + α·sign ∇ℓ(x^i))), and Eq. 3 averages
    over those k(k − 1) ordered pairs. The last gradient, at x^k, moved nothing: it is FOSC's
    (Eq. 2), not SGCS's.

    Args:
        trace: ``[k + 1, B, ...]`` with k ≥ 2.

    Returns:
        Per-example SGCS ``[B]``.

    Example:
        >>> trace = torch.tensor([[[1.0]], [[1.0]], [[-1.0]]])  # two aligned steps, then x^k
        >>> attack_sgcs(trace)
        tensor([1.])
    """
    return sgcs(trace[:-1])


def correct(logits: Tensor, y: Tensor) -> Tensor:
    """Boolean ``[B]``: whether the arg-max of ``logits`` ``[B, K]`` equals ``y`` ``[B]``.

    Example:
        >>> correct(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        tensor([ True, False])
    """
    return logits.argmax(dim=1) == y


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of the batch classified correctly (see :func:`correct`).

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        0.5
    """
    if y.numel() == 0:
        raise ValueError("accuracy: empty batch")
    return correct(logits, y).float().mean().item()
