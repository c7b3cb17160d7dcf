"""Networks: the paper's CIFAR-style ResNet-18, official TRADES' WideResNet-34-10 (to
diagnose its released checkpoints) and a small BatchNorm CNN for CPU tiers.

Models take raw pixels in [0, 1] (as official TRADES, so ε = 8/255 is measured in pixel
units). With `ModelSpec.normalize` a `Normalize` layer comes first, its mean/std stored as
buffers so they travel with the state_dict; without it there is no normalisation at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from trades_repro.spec import SMALL_CNN_MIN_SIZE, ModelSpec

# Per-channel training-set statistics, used only when `ModelSpec.normalize` is true.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "digits": ((0.3053,), (0.3760,)),  # all 1,797 sklearn digits, pixels / 16
    "synthetic": ((0.5,), (0.2,)),  # prototypes U(0.2, 0.8): std √(0.6²/12 + 0.1²) ≈ 0.2
}


def dataset_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of `dataset` in [0, 1] pixel units; 1-tuples broadcast."""
    if dataset not in _STATS:
        raise ValueError(f"dataset_stats: unknown dataset {dataset!r}; known: {sorted(_STATS)}")
    return _STATS[dataset]


def build_model(
    spec: ModelSpec,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """The network `spec.arch`, with a `Normalize` first layer iff `spec.normalize`.

    >>> net = build_model(ModelSpec(arch="small_cnn"), in_channels=1, num_classes=10, image_size=8)
    >>> net(torch.rand(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    if spec.arch == "resnet18":
        net: nn.Module = ResNet18(in_channels, num_classes)
    elif spec.arch == "wrn-34-10":
        net = WideResNet(34, 10, in_channels, num_classes)
    else:
        net = SmallCNN(in_channels, num_classes, image_size, spec.width)
    if not spec.normalize:
        return net
    if mean is None or std is None:
        raise ValueError("build_model: normalize=true needs mean and std (see dataset_stats)")
    return nn.Sequential(Normalize(mean, std, in_channels), net)


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean/std are buffers (saved, moved, never trained)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int) -> None:
        super().__init__()
        if len(mean) not in (1, channels) or len(std) not in (1, channels):
            raise ValueError(f"Normalize: need 1 or {channels} mean/std values")
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    """3x3 conv (no bias: BN follows) + BatchNorm."""
    return [nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut, He et al. 2016."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(c_in, c_out, stride), nn.ReLU(), *_conv_bn(c_out, c_out)
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (App. B): 3x3 stride-1 stem, no max-pool, [2, 2, 2, 2] blocks of
    64-128-256-512 channels, global average pool, so 32x32 and 64x64 inputs both work.

    ~11.17M parameters for 10 classes (the usual CIFAR ResNet-18 of TRADES/AWP code).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, 64), nn.ReLU())
        widths, blocks, c_in = (64, 128, 256, 512), [], 64
        for stage, c_out in enumerate(widths):
            stride = 1 if stage == 0 else 2  # each later stage halves the resolution
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (width; 2·width, stride 2; 2·width, stride 2) + linear.

    For the CPU tiers (8x8 digits, 28x28 Fashion-MNIST, small synthetic images). BatchNorm is
    deliberate: train/eval BN mode during attacks is one of the paper's traps. The classifier
    sees the flattened final map (ceil(size/4)² positions), keeping spatial layout that a global
    pool would throw away on 8x8 inputs.
    """

    min_size = SMALL_CNN_MIN_SIZE  # two stride-2 convs leave a 2x2 map; specs check it

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int) -> None:
        super().__init__()
        if image_size < self.min_size:
            raise ValueError(f"SmallCNN: image_size {image_size} < {self.min_size}")
        self.features = nn.Sequential(
            *_conv_bn(in_channels, width), nn.ReLU(),
            *_conv_bn(width, 2 * width, stride=2), nn.ReLU(),
            *_conv_bn(2 * width, 2 * width, stride=2), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(2)  # identity on the 2x2 map of 8x8 inputs
        self.fc = nn.Linear(2 * width * 2 * 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class WideBlock(nn.Module):
    """Pre-activation block of Zagoruyko & Komodakis 2016: (BN-ReLU-conv3x3) twice, added to
    the input, or to a 1x1 conv of the activated input when the width changes.

    Attribute names are official TRADES' (`bn1`, `conv1`, `bn2`, `conv2`, `convShortcut`), so
    its released WideResNet-34-10 checkpoint loads without renaming (docs/checkpoints.md).
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        # official TRADES: a projection only where the width changes (never for stride alone)
        self.convShortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                             if c_in != c_out else None)

    def forward(self, x: Tensor) -> Tensor:
        act = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideStage(nn.Module):
    """`n` WideBlocks; the first changes width and stride (official name: NetworkBlock)."""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*(WideBlock(c_in if i == 0 else c_out, c_out,
                                               stride if i == 0 else 1) for i in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen (official TRADES' CIFAR-10 model is WRN-34-10: 46.2M parameters):
    3x3 stem of 16 channels, three stages of (depth − 4)/6 blocks at 16k, 32k, 64k channels
    (strides 1, 2, 2), BN-ReLU, global average pool, linear, initialised as official TRADES'
    class. Raw [0, 1] input, as official TRADES (its transforms are ToTensor only). The
    official pool is a fixed 8x8 window: the same as our global pool on 32x32 images, and
    ours also takes other sizes.
    """

    def __init__(self, depth: int = 34, widen: int = 10, in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth {depth} must be 6n + 4 with n >= 1")
        n, widths = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1)
        self.block2 = WideStage(n, widths[1], widths[2], 2)
        self.block3 = WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self._official_init()

    def _official_init(self) -> None:
        """Official TRADES' start: He-normal convs with fan-out (std √(2 / (k·k·out))), BN
        scale 1 and shift 0, zero classifier bias (its weight keeps PyTorch's default)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.pool(torch.relu(self.bn1(out))).flatten(1))
