"""Model shapes, the Normalize layer's buffers, BatchNorm presence and ResNet-18's size."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
from torch import nn

from trades_repro.models import Normalize, SmallCNN, WideResNet, build_model, dataset_stats
from trades_repro.spec import SMALL_CNN_MIN_SIZE, DatasetName, ModelSpec

RESNET18_CIFAR10_PARAMS = 11_173_962  # the CIFAR ResNet-18 of the TRADES/AWP code bases


def _forward(spec: ModelSpec, channels: int, size: int, classes: int) -> torch.Tensor:
    model = build_model(spec, in_channels=channels, num_classes=classes, image_size=size)
    return model.eval()(torch.rand(2, channels, size, size))


@pytest.mark.parametrize(("size", "classes"), [(32, 100), (64, 200)])  # CIFAR-100, TinyImageNet
def test_resnet18_output_shape(size, classes):
    assert _forward(ModelSpec(arch="resnet18"), 3, size, classes).shape == (2, classes)


def test_resnet18_any_channel_count():
    assert _forward(ModelSpec(arch="resnet18"), 1, 28, 10).shape == (2, 10)


def test_resnet18_parameter_count():
    model = build_model(ModelSpec(), in_channels=3, num_classes=10, image_size=32)
    assert sum(p.numel() for p in model.parameters()) == RESNET18_CIFAR10_PARAMS  # ≈ 11.2M
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())  # CIFAR stem


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32)])
def test_small_cnn_shapes_and_batchnorm(channels, size):
    spec = ModelSpec(arch="small_cnn", width=8)
    assert _forward(spec, channels, size, 10).shape == (2, 10)
    model = build_model(spec, in_channels=channels, num_classes=10, image_size=size)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3


def test_small_cnn_rejects_tiny_images():
    with pytest.raises(ValueError, match="image_size 4 < 8"):
        build_model(ModelSpec(arch="small_cnn"), in_channels=1, num_classes=10, image_size=4)


def test_normalize_is_first_layer_with_saved_buffers():
    mean, std = dataset_stats("cifar10")
    spec = ModelSpec(arch="small_cnn", width=8, normalize=True)
    model = build_model(spec, in_channels=3, num_classes=10, image_size=32, mean=mean, std=std)
    first = next(iter(model.children()))
    assert isinstance(first, Normalize)
    state = model.state_dict()
    assert torch.allclose(state["0.mean"].flatten(), torch.tensor(mean))
    assert torch.allclose(state["0.std"].flatten(), torch.tensor(std))
    assert not any(name.endswith(("mean", "std")) for name, _ in model.named_parameters())
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(first(x), expected)


def test_no_normalize_means_no_normalisation_layer():
    model = build_model(ModelSpec(arch="small_cnn"), in_channels=3, num_classes=10, image_size=32)
    assert not any(isinstance(m, Normalize) for m in model.modules())
    with pytest.raises(ValueError, match="needs mean and std"):
        build_model(ModelSpec(normalize=True), in_channels=3, num_classes=10, image_size=32)


def test_one_value_stats_broadcast_over_channels():
    mean, std = dataset_stats("synthetic")
    layer = Normalize(mean, std, channels=3)
    assert torch.allclose(layer(torch.full((1, 3, 2, 2), 0.5)), torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize("dataset", get_args(DatasetName))
def test_dataset_stats_cover_every_dataset(dataset):
    mean, std = dataset_stats(dataset)
    channels = 3 if dataset in ("cifar10", "cifar100", "tinyimagenet") else 1
    assert len(mean) == len(std) == channels
    assert all(0 < m < 1 for m in mean) and all(0 < s < 1 for s in std)


def test_digits_stats_match_the_data():
    from sklearn.datasets import load_digits

    pixels = torch.from_numpy(load_digits().images).float() / 16  # sklearn stores 0..16
    mean, std = dataset_stats("digits")
    assert pixels.mean().item() == pytest.approx(mean[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(std[0], abs=1e-3)


def test_small_cnn_head_does_not_grow_with_image_size():
    """Regression: a flattened 7x7 map (28x28 input) made TRADES diverge at LR 0.1."""
    spec = ModelSpec(arch="small_cnn", width=8)
    heads = {size: build_model(spec, in_channels=1, num_classes=10, image_size=size).fc
             for size in (8, 28, 64)}
    assert {head.in_features for head in heads.values()} == {2 * 8 * 4}


def test_the_spec_checks_small_cnn_against_its_own_minimum():
    assert SmallCNN.min_size == SMALL_CNN_MIN_SIZE


def test_wide_resnet_starts_as_official_trades():
    """yaodongyu/TRADES models/wideresnet.py: conv weights N(0, 2 / (k·k·out_channels)), BN
    weight 1 and bias 0, linear bias 0 (PyTorch's defaults: conv std 1/√(3·fan_in), a
    nonzero linear bias)."""
    torch.manual_seed(0)
    net = WideResNet(10, 2)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 2 + 3  # stem, two in each stage's one block, 3 shortcuts
    for conv in convs:
        k, n = conv.kernel_size, conv.weight.numel()
        expected = math.sqrt(2 / (k[0] * k[1] * conv.out_channels))
        # a sample std's relative standard error is 1/√(2n): 6 of them is never seen by chance
        assert conv.weight.std().item() == pytest.approx(expected, rel=6 / math.sqrt(2 * n))
    assert torch.equal(net.fc.bias, torch.zeros_like(net.fc.bias))
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
