"""Shared by the evaluation tests: one small TRADES digits run per session, and masked models.

`trained_run` trains into a folder under pytest's session base temp; training skips a run
that is already finished, so the modules that ask for it share one training per session.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from trades_repro.checkpoints import build_arch, load_state_dict, load_weights
from trades_repro.data import load_splits, to_float
from trades_repro.spec import DataSpec, ModelSpec, parse_spec
from trades_repro.train import train

EPS = 0.1  # spec/digits.yaml's threat model: 1.6 of the digits' 17 grey levels
BASE_SPEC = {
    "name": "eval_controls_base",
    "seed": 0,
    "device": "cpu",
    "data": {"dataset": "digits", "validation": "test", "crop_padding": 1},
    "model": {"arch": "small_cnn", "width": 16},
    # TPGD-5 and 10 epochs: ~20 s on one core; test PGD-10 accuracy ~0.6 at clean ~0.95
    "method": {"beta": 3, "attack": {"eps": EPS, "step_size": EPS / 4, "steps": 5}},
    "optim": {"lr": 0.1, "batch_size": 64, "epochs": 10},
    "validation": {"eps": EPS, "step_size": EPS / 4, "steps": 10},
}
MODEL = ModelSpec(arch="small_cnn", width=16)


def trained_run(base: Path) -> Path:
    return train(parse_spec(BASE_SPEC), base / "evalruns", progress=False).run_dir


def trained_net(run_dir: Path) -> nn.Module:
    path = run_dir / "best.safetensors"
    net = build_arch(MODEL, "digits", (1, 8, 8), 10)
    net = load_weights(net, load_state_dict(path), path, "small_cnn")
    return net.requires_grad_(False)


def digits_test(n: int) -> tuple[Tensor, Tensor]:
    test = load_splits(DataSpec(dataset="digits", validation="test"), 0).test
    return to_float(test.images[:n]), test.labels[:n]


class Quantized(nn.Module):
    """Control (a), shattered gradients: round inputs to `levels` grey levels.

    torch.round's gradient is zero, so every input gradient is exactly zero. With 17 levels
    clean digits (multiples of 1/16) pass unchanged.
    """

    def __init__(self, net: nn.Module, levels: int = 17) -> None:
        super().__init__()
        self.net, self.steps = net, levels - 1

    def forward(self, x: Tensor) -> Tensor:
        return self.net(torch.round(x * self.steps) / self.steps)


class Saturated(nn.Module):
    """Control (b), vanishing gradients: logits × 1e8 saturate the softmax in fp32.

    For any correctly classified input the CE gradient softmax − onehot is exactly zero once
    the scaled margin exceeds ~104 (exp underflows), i.e. for margins above ~1e-6; predictions
    and every margin-based (scale-free) loss are unchanged.
    """

    def __init__(self, net: nn.Module, temperature: float = 1e8) -> None:
        super().__init__()
        self.net, self.temperature = net, temperature

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * self.temperature


class RandomDither(nn.Module):
    """Control (c), stochastic gradients: a random input transformation.

    x ↦ x + a·sin(ω·x + φ) with a fresh φ ~ U[0, 2π) per pixel and call. The input moves by at
    most a = 1/255 (below one 8-bit grey level), so predictions barely change, but the
    derivative 1 + a·ω·cos(·) with a·ω = 50 flips each pixel's gradient sign at random
    (Athalye et al. 2018's stochastic gradients). Its own generator keeps tests repeatable.
    """

    def __init__(self, net: nn.Module, amplitude: float = 1 / 255, gain: float = 50.0) -> None:
        super().__init__()
        self.net, self.amplitude, self.omega = net, amplitude, gain / amplitude
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: Tensor) -> Tensor:
        phase = 2 * math.pi * torch.rand(x.shape, generator=self.generator).to(x)
        return self.net(x + self.amplitude * torch.sin(self.omega * x + phase))


def prototype_linear() -> nn.Sequential:
    """Nearest class mean on the digits as a linear layer: ~90 % clean accuracy, no training.

    logit_k = s·(x·μ_k − ‖μ_k‖²/2), the nearest-mean rule; s = 10 keeps its gradients finite.
    """
    train = load_splits(DataSpec(dataset="digits", validation="test"), 0).train
    x, y = to_float(train.images).flatten(1), train.labels
    means = torch.stack([x[y == k].mean(0) for k in range(10)])
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        net[1].weight.copy_(10 * means)
        net[1].bias.copy_(-5 * (means**2).sum(1))
    return net


class ClassMasked(nn.Module):
    """Control (d), graded: control (b)'s saturation only where the prediction is in `classes`.

    Masking a known share of the classes masks a known share of the inputs; the true margin
    grows with it, so the paired verdict must move from clear to inconclusive to flagged.
    All ten classes is exactly `Saturated`.
    """

    def __init__(self, net: nn.Module, classes: list[int], temperature: float = 1e8) -> None:
        super().__init__()
        self.net, self.temperature = net, temperature
        self.register_buffer("classes", torch.tensor(classes, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        masked = torch.isin(logits.argmax(1), self.classes)[:, None]
        return torch.where(masked, logits * self.temperature, logits)
