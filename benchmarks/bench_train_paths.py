"""Throughput of one TRADES training step: our default path, our fidelity path, official TRADES.

    python benchmarks/bench_train_paths.py [--threads N] [--steps N] [--resnet-steps N]
        [--rounds N] [--warmup N] [--resnet-warmup N] [--out FILE]

Three paths train copies of one seeded model (same initial weights, same SGD settings, same
pre-drawn batches, same TPGD-10) in this one process:

* ``default``: `train_step` with the spec's default `performance` (see `trades_repro.steps`);
* ``fidelity``: `train_step` with `performance.fidelity: true` (official TRADES pass for pass);
* ``official``: `official_step` below, a rewrite of official TRADES' `trades_loss`
  (yaodongyu/TRADES, `trades.py`, the `l_inf` branch) followed by the official training loop's
  `loss.backward(); optimizer.step()`. It is the baseline: every ratio is a path's images/s
  over official's images/s in the same round.

After warm-up steps, each of `--rounds` rounds runs every path over the same batches, the paths
taking turns step by step (order rotated), each step timed with `time.perf_counter`; the table
shows medians over rounds. Before timing, one step from identical weights, batch and RNG stream
checks that the three paths compute the same loss, and that fidelity's and official's TPGD
return the same x_adv.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from trades_repro.attacks import tpgd
from trades_repro.data import batches, load_splits
from trades_repro.models import build_model
from trades_repro.spec import ExperimentSpec, load_spec, parse_spec
from trades_repro.steps import official_tpgd, train_step

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "official"
Batch = tuple[Tensor, Tensor]
StepFn = Callable[[nn.Module, torch.optim.Optimizer, Tensor, Tensor, torch.Generator], float]


# ------------------------------------------------------------- official TRADES, rewritten


def official_perturb(model: nn.Module, x_natural: Tensor, *, step_size: float, epsilon: float,
                     perturb_steps: int, generator: torch.Generator | None) -> Tensor:
    """The `l_inf` inner loop of official `trades_loss`: eval mode, clean forward every step.

    One change: the 0.001·N(0, I) start is drawn from `generator` (official: the global CUDA
    RNG), so that this loop and `official_tpgd` can be fed the same random stream.
    """
    model.eval()  # official: BN uses running statistics during the attack
    sum_kl = nn.KLDivLoss(reduction="sum")  # official: size_average=False, i.e. a sum
    noise = torch.randn(x_natural.shape, generator=generator, dtype=x_natural.dtype,
                        device=x_natural.device)
    x_adv = x_natural.detach() + 0.001 * noise  # official hard-codes σ = 0.001, no projection
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            divergence = sum_kl(F.log_softmax(model(x_adv), dim=1),
                                F.softmax(model(x_natural), dim=1))
        (grad,) = torch.autograd.grad(divergence, [x_adv])
        moved = x_adv.detach() + step_size * grad.detach().sign()
        boxed = torch.min(torch.max(moved, x_natural - epsilon), x_natural + epsilon)
        x_adv = boxed.clamp(0.0, 1.0)
    return x_adv


def official_trades_loss(model: nn.Module, x_natural: Tensor, y: Tensor,
                         optimizer: torch.optim.Optimizer, *, step_size: float, epsilon: float,
                         perturb_steps: int, beta: float,
                         generator: torch.Generator | None) -> Tensor:
    """Official `trades_loss` (`l_inf`): TPGD, then CE + β·KL with three train-mode forwards."""
    x_adv = official_perturb(model, x_natural, step_size=step_size, epsilon=epsilon,
                             perturb_steps=perturb_steps, generator=generator)
    model.train()
    x_adv = x_adv.clamp(0.0, 1.0).detach()  # official clamps once more (a no-op for l_inf)
    optimizer.zero_grad()
    logits = model(x_natural)
    natural = F.cross_entropy(logits, y)
    sum_kl = nn.KLDivLoss(reduction="sum")
    robust = sum_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1))
    return natural + beta * (1.0 / len(x_natural)) * robust


def official_step(spec: ExperimentSpec) -> StepFn:
    """One batch of official `train()`: zero_grad, `trades_loss`, backward, SGD step."""
    a = spec.method.attack

    def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
             generator: torch.Generator) -> float:
        model.train()  # official sets it once per epoch; trades_loss leaves it in train mode
        optimizer.zero_grad()
        loss = official_trades_loss(model, x, y, optimizer, step_size=a.step_size,
                                    epsilon=a.eps, perturb_steps=a.steps,
                                    beta=spec.method.beta, generator=generator)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


# ------------------------------------------------------------------------------- our paths


def ours_step(spec: ExperimentSpec) -> StepFn:
    def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
             generator: torch.Generator) -> float:
        return train_step(model, optimizer, x, y, spec, generator).loss

    return step


def with_fidelity(spec: ExperimentSpec) -> ExperimentSpec:
    raw = spec.model_dump(mode="json")
    raw["performance"]["fidelity"] = True
    return parse_spec(raw, source=f"{spec.name} + fidelity")


def paths(spec: ExperimentSpec) -> dict[str, StepFn]:
    if spec.performance.fidelity:
        raise ValueError("paths: the base spec must use the default performance")
    return {"default": ours_step(spec), "fidelity": ours_step(with_fidelity(spec)),
            BASELINE: official_step(spec)}


# ------------------------------------------------------------------------------ workloads


@dataclass(frozen=True)
class Workload:
    name: str
    spec: ExperimentSpec
    batches: list[Batch]  # drawn once; every path and round trains on these
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int


def digits_workload(steps: int, batch_size: int = 64) -> Workload:
    """spec/digits.yaml: small CNN (width 32) on real 8x8 digits, batch 64, augmented."""
    spec = load_spec(ROOT / "spec" / "digits.yaml")
    train = load_splits(spec.data, spec.seed).train
    generator = torch.Generator().manual_seed(spec.seed)
    drawn: list[Batch] = []
    while len(drawn) < steps:  # full batches only, epoch after epoch
        epoch = batches(train, batch_size, generator=generator, shuffle=True, augment=True,
                        padding=spec.data.crop_padding)
        drawn += [b for b in epoch if len(b[1]) == batch_size]
    return Workload("digits small_cnn", spec, drawn[:steps], (1, 8, 8), 10)


def resnet_workload(steps: int, batch_size: int = 32) -> Workload:
    """spec/cifar100_default.yaml's ResNet-18 and TPGD-10 on CIFAR-shaped U[0, 1] pixels.

    CIFAR-100 itself is not read (no download); a step's cost does not depend on pixel values.
    """
    spec = load_spec(ROOT / "spec" / "cifar100_default.yaml")
    generator = torch.Generator().manual_seed(spec.seed)
    drawn = [(torch.rand(batch_size, 3, 32, 32, generator=generator),
              torch.randint(0, 100, (batch_size,), generator=generator)) for _ in range(steps)]
    return Workload("cifar-shaped resnet18", spec, drawn, (3, 32, 32), 100)


def initial_model(w: Workload) -> nn.Module:
    torch.manual_seed(w.spec.seed)
    c, size, _ = w.shape
    return build_model(w.spec.model, in_channels=c, num_classes=w.num_classes, image_size=size)


def optimizer_for(model: nn.Module, spec: ExperimentSpec) -> torch.optim.Optimizer:
    o = spec.optim  # App. B: SGD, Nesterov momentum 0.9, weight decay 5e-4 (all three paths)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                           nesterov=o.nesterov, weight_decay=o.weight_decay)


# ------------------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class XAdvCheck:
    fidelity_equal: bool  # fidelity's TPGD == official's, bit for bit
    default_max_diff: float  # max |default TPGD - official TPGD|
    start_outside: int  # pixels where x + 0.001·N(0, I) leaves [0, 1] (default projects them)
    pixels: int


@dataclass(frozen=True)
class Result:
    workload: Workload
    first_loss: dict[str, float]  # one step from identical weights, batch and RNG seed
    x_adv: XAdvCheck
    ips: dict[str, list[float]]  # images/s per round
    ratio: dict[str, list[float]]  # images/s over official's, per round


def first_step_losses(w: Workload, model: nn.Module) -> dict[str, float]:
    x, y = w.batches[0]
    losses = {}
    for name, step in paths(w.spec).items():
        net = copy.deepcopy(model)
        losses[name] = step(net, optimizer_for(net, w.spec), x, y, _seeded(w))
    return losses


def x_adv_check(w: Workload, model: nn.Module) -> XAdvCheck:
    """TPGD of the three paths from one model, batch and RNG seed, compared with official's."""
    a, x = w.spec.method.attack, w.batches[0][0]
    budget = {"eps": a.eps, "step_size": a.step_size, "steps": a.steps, "init_std": a.init_std}
    runs = {}
    for name, attack in (("default", tpgd), ("fidelity", official_tpgd)):
        runs[name] = attack(copy.deepcopy(model), x, generator=_seeded(w), **budget)
    official = official_perturb(copy.deepcopy(model), x, step_size=a.step_size, epsilon=a.eps,
                                perturb_steps=a.steps, generator=_seeded(w))
    start = x + a.init_std * torch.randn(x.shape, generator=_seeded(w))
    return XAdvCheck(torch.equal(runs["fidelity"], official),
                     (runs["default"] - official).abs().max().item(),
                     int(((start < 0) | (start > 1)).sum()), x.numel())


def _seeded(w: Workload) -> torch.Generator:
    return torch.Generator().manual_seed(w.spec.seed)


def benchmark(w: Workload, *, rounds: int, warmup: int) -> Result:
    """Correctness check, `warmup` steps per path, then `rounds` timed passes over w.batches.

    Within a round the paths take turns batch by batch; each keeps its own model, optimiser and
    generator throughout, so each trains exactly as it would alone.
    """
    model = initial_model(w)
    first = first_step_losses(w, model)
    check = x_adv_check(w, model)
    steps, runs = paths(w.spec), {}
    for name in steps:
        net = copy.deepcopy(model)
        runs[name] = (net, optimizer_for(net, w.spec), _seeded(w))
        _timed(steps[name], *runs[name], w.batches[:warmup])
    ips = _rounds(steps, runs, w.batches, rounds)
    ratio = {n: [a / b for a, b in zip(v, ips[BASELINE], strict=True)] for n, v in ips.items()}
    return Result(w, first, check, ips, ratio)


def _rounds(steps: dict[str, StepFn], runs: dict[str, tuple], drawn: list[Batch],
            rounds: int) -> dict[str, list[float]]:
    """Images/s of each path in each round; paths take turns batch by batch, order rotated,
    so that a change of load on the cores hits all of them alike."""
    ips: dict[str, list[float]] = {name: [] for name in steps}
    images, names = sum(len(y) for _, y in drawn), list(steps)
    for r in range(rounds):
        seconds = dict.fromkeys(names, 0.0)
        for i, batch in enumerate(drawn):
            k = (r + i) % len(names)
            for name in names[k:] + names[:k]:
                seconds[name] += _timed(steps[name], *runs[name], [batch])
        for name in names:
            ips[name].append(images / seconds[name])
    return ips


def _timed(step: StepFn, model: nn.Module, optimizer: torch.optim.Optimizer,
           generator: torch.Generator, drawn: list[Batch]) -> float:
    start = time.perf_counter()
    for x, y in drawn:
        step(model, optimizer, x, y, generator)  # float(loss) each step: no lazy work left
    return time.perf_counter() - start


# ------------------------------------------------------------------------------- reporting


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{sha}{' (dirty)' if git('status', '--porcelain') else ''}"


def load_average() -> str:
    path = Path("/proc/loadavg")  # other processes on the cores distort every number here
    return " ".join(path.read_text().split()[:3]) if path.exists() else "n/a"


def header(console: Console, args: argparse.Namespace) -> None:
    console.print(f"command: python {shlex.join(sys.argv)}")
    console.print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    console.print(f"device: CPU {cpu_name()} ({torch.get_num_threads()} torch threads; "
                  f"--threads {args.threads}); load average at start: {load_average()}")
    console.print(f"torch {torch.__version__}, python {platform.python_version()}, "
                  f"git {git_state()}")


def report(console: Console, res: Result) -> None:
    w, a = res.workload, res.workload.spec.method.attack
    x, _ = w.batches[0]
    console.print(f"\n[bold]{w.name}[/bold]: {w.spec.model.arch}, batch {len(x)} x "
                  f"{'x'.join(map(str, w.shape))}, TPGD-{a.steps}, {len(w.batches)} steps "
                  f"x {len(res.ips[BASELINE])} rounds per path")
    table = Table("path", "first-step loss", "|Δ| vs official", "images/s", "ms/step",
                  "ratio vs official", "ratio range")
    for name, ips in res.ips.items():
        loss, median = res.first_loss[name], statistics.median(ips)
        table.add_row(name, f"{loss:.7f}", f"{abs(loss - res.first_loss[BASELINE]):.1e}",
                      f"{median:.1f}", f"{1000 * len(x) / median:.0f}",
                      f"{statistics.median(res.ratio[name]):.2f}",
                      f"{min(res.ratio[name]):.2f}–{max(res.ratio[name]):.2f}")
    console.print(table)
    c = res.x_adv
    console.print(f"first step, same RNG stream: fidelity x_adv == official x_adv: "
                  f"{c.fidelity_equal}; default x_adv max |Δ| vs official: "
                  f"{c.default_max_diff:.1e} ({c.start_outside} of {c.pixels} start pixels "
                  "outside [0, 1], which default projects and official does not)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round, digits")
    parser.add_argument("--resnet-steps", type=int, default=1,
                        help="timed steps per round, ResNet-18")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    # The first-step check has already run every path once on the same shapes; ResNet-18
    # steps take seconds, so by default only the digits workload adds warm-up steps.
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per path, digits")
    parser.add_argument("--resnet-warmup", type=int, default=0,
                        help="untimed steps per path, ResNet-18")
    parser.add_argument("--out", type=Path, help="also write the printed text to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(record=True, width=110)
    header(console, args)
    start = time.perf_counter()
    runs = [(digits_workload(max(args.steps, args.warmup)), args.warmup),
            (resnet_workload(max(args.resnet_steps, args.resnet_warmup)), args.resnet_warmup)]
    for w, warmup in runs:
        report(console, benchmark(w, rounds=args.rounds, warmup=warmup))
    console.print(f"\nwall time: {time.perf_counter() - start:.0f} s; "
                  f"load average at end: {load_average()}")
    if args.out is not None:
        args.out.write_text(console.export_text())


if __name__ == "__main__":
    main()
