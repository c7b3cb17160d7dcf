"""Fig. 1's data-loss landscape around test images, and one number for its roughness.

z(a, b) = CE(f(x + a·r1 + b·r2), y) with r1 = sign(∇ₓ CE(f(x), y)) and r2 a Rademacher (±1)
vector, on a square grid a, b ∈ [−radius, radius] (Fig. 1 follows Engstrom et al. 2018,
Chen et al. 2021, Wu et al. 2024). Perturbed points are not clipped to [0, 1]: the surface
describes the function around x, not the threat model. The surface is averaged over
`n_images` images. Where the input gradient is exactly zero (a masked model), r1 is zero
there and the surface is flat along a: that flatness is itself the symptom.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from trades_repro import store
from trades_repro.attacks import eval_mode
from trades_repro.spec import LandscapeSpec


class LandscapeResult(BaseModel):
    """What `eval.json` keeps of a landscape; the grid itself is in the .npy file."""

    model_config = ConfigDict(extra="forbid")

    radius: float
    steps: int
    n_images: int
    roughness: float  # see `roughness`: <= 1 smooth, >> 1 jagged
    loss_min: float
    loss_max: float
    files: list[str] = []  # .npy grid and .png beside eval.json (none when nothing is written)


@dataclass(frozen=True)
class Landscape:
    axis: np.ndarray  # [steps] perturbation magnitudes a (rows) and b (columns)
    surface: np.ndarray  # [steps, steps] mean loss; surface[i, j] at a = axis[i], b = axis[j]

    @property
    def roughness(self) -> float:
        return roughness(self.surface)


def landscape_result(model: nn.Module, x: Tensor, y: Tensor, spec: LandscapeSpec, *, seed: int,
                     device: str, checkpoint: str, folder: Path | None) -> LandscapeResult:
    """Fig. 1 for the first `spec.n_images` of `x`; files ``landscape_<stem>.*`` in `folder`."""
    n = min(spec.n_images, len(y))
    land = loss_surface(model, x[:n].to(device), y[:n].to(device), radius=spec.radius,
                        steps=spec.steps, generator=torch.Generator().manual_seed(seed))
    files: list[str] = []
    if folder is not None:
        stem = f"landscape_{Path(checkpoint).stem}"
        files = list(save_landscape(land, folder, stem, f"{checkpoint} ({n} images)"))
    return LandscapeResult(radius=spec.radius, steps=spec.steps, n_images=n,
                           roughness=land.roughness, loss_min=float(land.surface.min()),
                           loss_max=float(land.surface.max()), files=files)


def loss_surface(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    radius: float,
    steps: int,
    generator: torch.Generator,
) -> Landscape:
    """Mean CE over the images of ``x`` ``[N, C, H, W]`` (labels ``y`` ``[N]``) on the grid.

    Returns a `Landscape` whose ``surface[i, j]`` is the loss at a = axis[i] along
    r1 = sign(∇ₓ loss) and b = axis[j] along a Rademacher r2 drawn from ``generator`` (CPU).
    The model is evaluated in eval mode; its modes are restored afterwards.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> land = loss_surface(net, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), radius=0.1,
    ...                     steps=5, generator=torch.Generator().manual_seed(0))
    >>> land.surface.shape
    (5, 5)
    """
    with eval_mode(model):
        r1 = _input_grad(model, x, y).sign()
        r2 = torch.randint(0, 2, x.shape, generator=generator).to(x) * 2 - 1
        axis = torch.linspace(-radius, radius, steps, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            rows = [_row(model, x, y, a * r1, r2, axis) for a in axis]
    return Landscape(axis.cpu().double().numpy(), torch.stack(rows).cpu().double().numpy())


def _input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


def _row(model: nn.Module, x: Tensor, y: Tensor, shift: Tensor, r2: Tensor,
         axis: Tensor) -> Tensor:
    """Losses at one a (``shift`` = a·r1) for every b: one forward of steps × N images."""
    points = x + shift + axis.view(-1, *[1] * x.dim()) * r2  # [steps, N, C, H, W]
    logits = model(points.flatten(0, 1))
    labels = y.repeat(len(axis))
    return F.cross_entropy(logits, labels, reduction="none").view(len(axis), -1).mean(1)


def roughness(surface: np.ndarray) -> float:
    """Total variation of the grid over the variation of a plane with the same range.

    TV = Σ|z[i+1, j] − z[i, j]| + Σ|z[i, j+1] − z[i, j]| over all neighbouring grid points,
    divided by 2·n·(max z − min z) for an n × n grid. A surface monotone along every row and
    column scores ≤ 1 (a tilted plane spanning its range along one axis scores 1/2), a
    bowl 1, and a surface whose loss jumps up and down between neighbouring grid points
    scores up to n − 1 (a checkerboard); a constant surface scores 0. It is invariant to
    shifting and scaling the loss, so models with different loss levels compare.

    >>> roughness(np.add.outer(np.arange(3.0), np.zeros(3)))
    0.5
    """
    z = np.asarray(surface, dtype=np.float64)
    spread = float(z.max() - z.min())
    if spread == 0.0:
        return 0.0
    tv = np.abs(np.diff(z, axis=0)).sum() + np.abs(np.diff(z, axis=1)).sum()
    return float(tv / (2 * z.shape[0] * spread))


def save_landscape(land: Landscape, folder: Path, stem: str, title: str) -> tuple[str, str]:
    """Write ``<stem>.npy`` (the surface grid) and ``<stem>.png`` atomically; return names."""
    buffer = io.BytesIO()
    np.save(buffer, land.surface)
    store.atomic_write_bytes(folder / f"{stem}.npy", buffer.getvalue())
    store.atomic_write_bytes(folder / f"{stem}.png", _png(land, title))
    return f"{stem}.npy", f"{stem}.png"


def _png(land: Landscape, title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot, no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="3d")
    a, b = np.meshgrid(land.axis, land.axis, indexing="ij")
    ax.plot_surface(a, b, land.surface, cmap="viridis", linewidth=0)
    ax.set(xlabel="a (along sign ∇ₓ loss)", ylabel="b (Rademacher)", zlabel="loss")
    ax.set_title(f"{title}\nroughness {land.roughness:.2f}", fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
