"""Fig. 1's loss landscape (landscape.py), pinned where mutation testing found
tests/test_landscape.py silent (tests/mutation_gate.py, group `landscape`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trades_repro import landscape as ls
from trades_repro.landscape import landscape_result, loss_surface, roughness
from trades_repro.spec import LandscapeSpec


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_grid_of_colour_images_is_one_forward_per_image_and_point():
    """Images with 3 channels: the grid's points are `steps` × N images of [3, H, W], each
    the loss at its own point (a batch shaped any other way fails or mixes channels)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()
    x = torch.rand(2, 3, 2, 2, generator=_gen(1), dtype=torch.float64)
    y = torch.tensor([0, 3])
    land = loss_surface(net, x, y, radius=0.2, steps=3, generator=_gen(2))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(xg), y, reduction="sum"), xg)
    r2 = torch.randint(0, 2, x.shape, generator=_gen(2)).double() * 2 - 1
    point = x + 0.2 * grad.sign() - 0.2 * r2
    assert land.surface[2, 0] == pytest.approx(F.cross_entropy(net(point), y).item(), rel=1e-12)


def test_where_the_gradient_is_zero_the_surface_is_flat_along_a_and_finite():
    """A model blind to its input (zero gradient everywhere, the masked case of the module
    doc): r1 = sign(0) = 0, so every a gives the same row, and no point is inf or NaN."""
    x = torch.rand(3, 1, 2, 2, generator=_gen(1), dtype=torch.float64)
    y = torch.tensor([0, 1, 2])

    class Blind(nn.Module):
        def forward(self, x):
            return torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype) + 0 * x.flatten(1)[:, :3]

    land = loss_surface(Blind(), x, y, radius=0.1, steps=5, generator=_gen(0))
    assert np.isfinite(land.surface).all()
    assert (land.surface == land.surface[0]).all()


def test_the_axis_is_linspace_in_the_inputs_precision():
    """float64 images get a float64 grid (-r … r exactly as linspace gives it), not float32's
    rounding of 0.1."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.rand(2, 1, 2, 2, generator=_gen(1), dtype=torch.float64)
    land = loss_surface(net, x, torch.tensor([0, 1]), radius=0.1, steps=5, generator=_gen(0))
    assert land.axis.tolist() == torch.linspace(-0.1, 0.1, 5, dtype=torch.float64).tolist()


def test_roughness_is_computed_in_float64_whatever_the_surfaces_dtype():
    """A float32 surface scores what the same values score in float64."""
    z = np.random.default_rng(0).random((6, 6)).astype(np.float32)
    assert roughness(z) == roughness(z.astype(np.float64))


def test_the_png_plots_the_surface_over_a_and_b_titled_with_its_roughness(monkeypatch,
                                                                           tmp_path):
    """The saved PNG: the surface z[i, j] over (a = axis[i], b = axis[j]) in viridis without
    edges, the axes named, titled with the checkpoint, the image count and the roughness
    (fontsize 9), a 5 x 4 inch figure saved as PNG at 100 dpi."""
    from matplotlib.figure import Figure
    from mpl_toolkits.mplot3d.axes3d import Axes3D

    surfaces, saved = [], []
    plot_surface, savefig = Axes3D.plot_surface, Figure.savefig

    def record_surface(ax, a, b, z, **kw):
        surfaces.append((a, b, z, kw))
        return plot_surface(ax, a, b, z, **kw)

    def record_save(fig, fname, **kw):
        saved.append((fig, kw))
        return savefig(fig, fname, **kw)

    monkeypatch.setattr(Axes3D, "plot_surface", record_surface)
    monkeypatch.setattr(Figure, "savefig", record_save)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(3, 1, 2, 2, generator=_gen(1)), torch.tensor([0, 1, 2])
    spec = LandscapeSpec(radius=0.1, steps=3, n_images=2)
    result = landscape_result(net, x, y, spec, seed=0, device="cpu",
                              checkpoint="runs/best.safetensors", folder=tmp_path)
    assert result.files == ["landscape_best.npy", "landscape_best.png"]
    grid = np.load(tmp_path / "landscape_best.npy")
    (a, b, z, kw), = surfaces
    axis = np.linspace(-0.1, 0.1, 3)
    np.testing.assert_allclose(a, np.repeat(axis[:, None], 3, 1), rtol=1e-6)  # rows: a
    np.testing.assert_allclose(b, np.repeat(axis[None, :], 3, 0), rtol=1e-6)  # columns: b
    assert np.array_equal(z, grid) and kw == {"cmap": "viridis", "linewidth": 0}
    (fig, save_kw), = saved
    assert save_kw == {"format": "png", "dpi": 100}
    assert tuple(fig.get_size_inches()) == (5, 4)
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_zlabel()) == (
        "a (along sign ∇ₓ loss)", "b (Rademacher)", "loss")
    assert ax.get_title() == (f"runs/best.safetensors (2 images)\n"
                              f"roughness {result.roughness:.2f}")
    assert ax.title.get_fontsize() == 9
    assert ls.roughness(grid) == result.roughness
