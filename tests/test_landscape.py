"""Fig. 1's loss landscape: the grid against direct evaluation, roughness on known surfaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trades_repro.landscape import landscape_result, loss_surface, roughness, save_landscape
from trades_repro.spec import LandscapeSpec


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()


def _data(n=3):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 4, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2])[:n]


def test_grid_points_equal_the_loss_computed_directly_in_float64():
    net, (x, y) = _net(), _data()
    land = loss_surface(net, x, y, radius=0.1, steps=5, generator=torch.Generator().manual_seed(3))
    net.eval()
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(xg), y, reduction="sum"), xg)
    r2 = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(3)).double() * 2 - 1
    for i, j in [(0, 0), (1, 3), (4, 2)]:
        point = x + land.axis[i] * grad.sign() + land.axis[j] * r2
        expected = F.cross_entropy(net(point), y).item()  # mean over the images
        assert land.surface[i, j] == pytest.approx(expected, rel=1e-12)
    assert land.surface[2, 2] == pytest.approx(F.cross_entropy(net(x), y).item(), rel=1e-12)
    np.testing.assert_allclose(land.axis, np.linspace(-0.1, 0.1, 5))


def test_surface_is_seeded_and_restores_the_model_mode():
    net, (x, y) = _net(), _data()
    net.train()
    surfaces = [loss_surface(net, x, y, radius=0.05, steps=3,
                             generator=torch.Generator().manual_seed(0)).surface for _ in "ab"]
    np.testing.assert_array_equal(*surfaces)
    assert all(m.training for m in net.modules())


@pytest.mark.parametrize(
    ("surface", "expected"),
    [
        (np.add.outer(np.arange(5.0), np.zeros(5)), 0.5),  # plane rising along one axis
        (np.add.outer(np.arange(5.0), np.arange(5.0)), 0.5),  # diagonal plane
        (np.add.outer(np.arange(-2.0, 3) ** 2, np.arange(-2.0, 3) ** 2), 1.0),  # bowl
        (np.indices((5, 5)).sum(0) % 2 * 1.0, 4.0),  # checkerboard: n - 1
        (np.full((5, 5), 3.0), 0.0),  # constant
    ],
)
def test_roughness_of_known_surfaces(surface, expected):
    assert roughness(surface) == pytest.approx(expected)


@given(arrays(np.int64, (6, 6), elements=st.integers(-1000, 1000)),
       st.floats(1e-3, 1e3), st.floats(-1e3, 1e3))
def test_roughness_ignores_the_loss_scale_and_level(levels, scale, shift):
    surface = levels.astype(np.float64)  # integer levels: scaling and shifting stay exact enough
    assert roughness(surface * scale + shift) == pytest.approx(roughness(surface), abs=1e-6)
    assert 0 <= roughness(surface) <= surface.shape[0] - 1 + 1e-9


def test_saved_files_are_a_loadable_grid_and_a_png(tmp_path):
    net, (x, y) = _net(), _data()
    spec = LandscapeSpec(radius=0.1, steps=5, n_images=2)
    result = landscape_result(net.float(), x.float(), y, spec, seed=0, device="cpu",
                              checkpoint="best.safetensors", folder=tmp_path)
    assert result.files == ["landscape_best.npy", "landscape_best.png"]
    assert result.n_images == 2 and result.loss_min <= result.loss_max
    assert np.load(tmp_path / "landscape_best.npy").shape == (5, 5)
    assert (tmp_path / "landscape_best.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    land = loss_surface(net, x.float(), y, radius=0.1, steps=3,
                        generator=torch.Generator().manual_seed(0))
    assert save_landscape(land, tmp_path, "again", "title") == ("again.npy", "again.png")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_landscape_result_uses_the_first_n_images_the_radius_and_the_seed():
    """What it reports is the surface of its own inputs: the first `n_images`, the spec's
    radius, its seed (not 0, which a hard-coded seed would also give)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 3
    spec = LandscapeSpec(radius=0.3, steps=5, n_images=2)
    got = landscape_result(net, x, y, spec, seed=7, device="cpu", checkpoint="b", folder=None)
    want = loss_surface(net, x[:2], y[:2], radius=0.3, steps=5,
                        generator=torch.Generator().manual_seed(7))
    assert got.roughness == want.roughness
    assert (got.loss_min, got.loss_max) == (float(want.surface.min()), float(want.surface.max()))
