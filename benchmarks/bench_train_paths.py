"""Throughput of one TRADES training step: the exact path, its fast knobs, official TRADES.

    python benchmarks/bench_train_paths.py [--quick] [--threads N] [--steps N]
        [--resnet-steps N] [--resnet-batch N] [--rounds N] [--knobs bf16,channels_last,compile]

Paths train copies of one seeded model (same initial weights, SGD settings, pre-drawn
batches and TPGD-10) in this one process:

* ``official``, the baseline: `official_step` below, a rewrite of official TRADES'
  `trades_loss` (yaodongyu/TRADES, `trades.py`, the `l_inf` branch) and its training loop's
  `loss.backward(); optimizer.step()`;
* ``exact``: `train_step` with the spec's default `performance` (official TRADES' results
  with fewer passes, see `trades_repro.steps`) and the engine's optimiser;
* each knob (``bf16``, ``channels_last``, ``compile``): the exact path with that
  `performance` field switched on.

After warm-up, each of `--rounds` rounds runs every path over the same batches, the paths
taking turns step by step (order rotated), each step timed with `time.perf_counter` (the
loss is read every step, so no lazy work is left). Tables show medians over rounds of
images/s over official's images/s (and, for knobs, over exact's). Before timing, one step
from identical weights, batch and RNG stream checks that exact's x_adv is official's bit
for bit and the losses agree; that first step is timed per path on its own (a compiled
path's compilation is in it, `first_step_s`). A JSON record goes to `benchmarks/results/`,
rewritten after every stage (`partial: true` until the end), so a call stopped by its time
box keeps the stages it finished.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, exit_code, header, provenance, summary, write_record
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from trades_repro.data import batches, load_splits
from trades_repro.engine import backend_flags, build_optimizer, compiled
from trades_repro.models import build_model
from trades_repro.spec import ExperimentSpec, load_spec, parse_spec
from trades_repro.steps import inner_max, train_step

BASELINE, EXACT = "official", "exact"
KNOBS = {"bf16": {"precision": "bf16"}, "channels_last": {"channels_last": True},
         "compile": {"compile": True}, "tf32": {"tf32": True},
         "cudnn_benchmark": {"cudnn_benchmark": True},
         # every knob at once: what a user who wants speed would switch on (GPU)
         "all": {"precision": "bf16", "channels_last": True, "compile": True, "tf32": True,
                 "cudnn_benchmark": True},
         # the same without torch.compile (whose first steps take minutes to compile)
         "all_eager": {"precision": "bf16", "channels_last": True, "tf32": True,
                       "cudnn_benchmark": True}}
KNOB_DEFAULT = "bf16,channels_last"  # --quick: channels_last only (bf16 is slow on CPUs)
Batch = tuple[Tensor, Tensor]
StepFn = Callable[[nn.Module, torch.optim.Optimizer, Tensor, Tensor, torch.Generator], float]


# ------------------------------------------------------------- official TRADES, rewritten


def official_perturb(model: nn.Module, x_natural: Tensor, *, step_size: float, epsilon: float,
                     perturb_steps: int, generator: torch.Generator | None) -> Tensor:
    """The `l_inf` inner loop of official `trades_loss`: eval mode, clean forward every step.

    One change: the 0.001·N(0, I) start is drawn from `generator` (official: the global CUDA
    RNG), so that this loop and `train_step` can be fed the same random stream.
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
        with backend_flags(spec.performance):  # fp32 throughout: TF32 off, no autotuning
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
    channels_last = spec.performance.channels_last

    def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
             generator: torch.Generator) -> float:
        if channels_last:  # as `Session.prepare` does
            x = x.contiguous(memory_format=torch.channels_last)
        with backend_flags(spec.performance):
            return float(train_step(model, optimizer, x, y, spec, generator).loss)

    return step


def with_performance(spec: ExperimentSpec, fields: dict) -> ExperimentSpec:
    raw = spec.model_dump(mode="json")
    raw["performance"].update(fields)
    return parse_spec(raw, source=f"{spec.name} + {fields}")


@dataclass(frozen=True)
class Variant:
    step: StepFn
    spec: ExperimentSpec
    official: bool = False


def paths(spec: ExperimentSpec, knobs: list[str]) -> dict[str, Variant]:
    out = {BASELINE: Variant(official_step(spec), spec, official=True),
           EXACT: Variant(ours_step(spec), spec)}
    for knob in knobs:
        knob_spec = with_performance(spec, KNOBS[knob])
        out[knob] = Variant(ours_step(knob_spec), knob_spec)
    return out


# ------------------------------------------------------------------------------ workloads


@dataclass(frozen=True)
class Workload:
    name: str
    spec: ExperimentSpec
    batches: list[Batch]  # drawn once; every path and round trains on these
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    device: torch.device = torch.device("cpu")

    def to(self, device: torch.device) -> Workload:
        moved = [(x.to(device), y.to(device)) for x, y in self.batches]
        return Workload(self.name, self.spec, moved, self.shape, self.num_classes, device)


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


def resnet_workload(steps: int, batch_size: int = 32, *, classes: int = 100) -> Workload:
    """spec/cifar100_default.yaml's ResNet-18 and TPGD-10 on CIFAR-shaped U[0, 1] pixels.

    CIFAR-100 itself is not read (no download); a step's cost does not depend on pixel values.
    """
    spec = load_spec(ROOT / "spec" / "cifar100_default.yaml")
    generator = torch.Generator().manual_seed(spec.seed)
    drawn = [(torch.rand(batch_size, 3, 32, 32, generator=generator),
              torch.randint(0, classes, (batch_size,), generator=generator))
             for _ in range(steps)]
    return Workload("cifar-shaped resnet18", spec, drawn, (3, 32, 32), classes)


def initial_model(w: Workload) -> nn.Module:
    torch.manual_seed(w.spec.seed)
    c, size, _ = w.shape
    return build_model(w.spec.model, in_channels=c, num_classes=w.num_classes,
                       image_size=size).to(w.device)


def optimizer_for(model: nn.Module, spec: ExperimentSpec) -> torch.optim.Optimizer:
    o = spec.optim  # App. B: SGD, Nesterov momentum 0.9, weight decay 5e-4 (all three paths)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                           nesterov=o.nesterov, weight_decay=o.weight_decay)


# ------------------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class Result:
    workload: Workload
    first_loss: dict[str, float]  # one step from identical weights, batch and RNG seed
    x_adv_equal: bool  # exact's TPGD == official's, bit for bit, from one RNG stream
    ips: dict[str, list[float]]  # images/s per round
    ratio: dict[str, list[float]]  # images/s over official's, per round
    vs_exact: dict[str, list[float]]  # images/s over exact's, per round
    first_step_s: dict[str, float]  # that first step's seconds: a compiled path's compile
    warmup_s: dict[str, float]  # the untimed warm-up steps' seconds, per path


def prepared(w: Workload, model: nn.Module, path: Variant) -> tuple:
    """A path's own model copy, optimiser (the engine's for ours) and generator."""
    net = copy.deepcopy(model)
    if path.spec.performance.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = (optimizer_for(net, w.spec) if path.official
                 else build_optimizer(net, w.spec.optim, w.device))
    return compiled(net, path.spec), optimizer, _seeded(w)


def first_step_losses(w: Workload, model: nn.Module, steps: dict[str, Variant],
                      note: Callable[[str, float, float], None] = lambda *a: None) -> dict:
    """Each path's loss on its first step; `note(name, loss, seconds)` after each (that
    step holds a compiled path's compilation, so its seconds are the compile's cost)."""
    x, y = w.batches[0]
    losses = {}
    for name, path in steps.items():
        run = prepared(w, model, path)
        started = time.perf_counter()
        losses[name] = path.step(*_args(run, x, y))  # float(loss): nothing left pending
        note(name, losses[name], round(time.perf_counter() - started, 3))
    return losses


def _args(run: tuple, x: Tensor, y: Tensor) -> tuple:
    module, optimizer, generator = run
    return module, optimizer, x, y, generator


def x_adv_equal(w: Workload, model: nn.Module) -> bool:
    """The exact path's inner max and official's TPGD from one model, batch and seed."""
    a, (x, y) = w.spec.method.attack, w.batches[0]
    ours = inner_max(copy.deepcopy(model), x, y, w.spec, _seeded(w))
    official = official_perturb(copy.deepcopy(model), x, step_size=a.step_size, epsilon=a.eps,
                                perturb_steps=a.steps, generator=_seeded(w))
    return torch.equal(ours, official)


def _seeded(w: Workload) -> torch.Generator:
    return torch.Generator(device=w.device).manual_seed(w.spec.seed)


def benchmark(w: Workload, *, rounds: int, warmup: int, knobs: list[str],
              save: Callable[[dict], None] = lambda partial: None) -> Result:
    """Correctness check, `warmup` steps per path, then `rounds` timed passes over w.batches.

    Within a round the paths take turns batch by batch; each keeps its own model, optimiser and
    generator throughout, so each trains exactly as it would alone. `save` gets the figures
    so far after every stage (each path's first step, the x_adv check, each path's warm-up,
    each round): a call stopped by its time box keeps them.
    """
    model = initial_model(w)
    steps = paths(w.spec, knobs)
    partial: dict = {"name": w.name, "partial": True, "stage": "first step",
                     "first_step_loss": {}, "first_step_s": {}, "warmup_s": {}}

    def note(name: str, loss: float, seconds: float) -> None:
        partial["first_step_loss"][name], partial["first_step_s"][name] = loss, seconds
        save(partial)
        print(f"{w.name}: {name}'s first step took {seconds:.1f} s", flush=True)

    first = first_step_losses(w, model, steps, note)
    equal = x_adv_equal(w, model)
    partial.update(stage="warm-up", x_adv_equal=equal)
    save(partial)
    runs = {name: prepared(w, model, path) for name, path in steps.items()}
    for name, path in steps.items():
        partial["warmup_s"][name] = round(_timed(path.step, *runs[name],
                                                 w.batches[:warmup]), 3)
        save(partial)
        print(f"{w.name}: {name}'s {warmup} warm-up steps took "
              f"{partial['warmup_s'][name]:.1f} s", flush=True)

    def each_round(ips: dict[str, list[float]]) -> None:
        partial.update(stage=f"round {len(ips[BASELINE])} of {rounds} done",
                       images_per_s_so_far=ips)
        save(partial)

    ips = _rounds({n: p.step for n, p in steps.items()}, runs, w.batches, rounds, each_round)
    return Result(w, first, equal, ips, _over(ips, BASELINE), _over(ips, EXACT),
                  partial["first_step_s"], partial["warmup_s"])


def _over(ips: dict[str, list[float]], base: str) -> dict[str, list[float]]:
    return {n: [a / b for a, b in zip(v, ips[base], strict=True)] for n, v in ips.items()}


def _rounds(steps: dict[str, StepFn], runs: dict[str, tuple], drawn: list[Batch],
            rounds: int, done: Callable[[dict], None] = lambda ips: None
            ) -> dict[str, list[float]]:
    """Images/s of each path in each round; paths take turns batch by batch, order rotated,
    so that a change of load on the cores hits all of them alike. `done(ips)` after each."""
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
        done(ips)
    return ips


def _timed(step: StepFn, model: nn.Module, optimizer: torch.optim.Optimizer,
           generator: torch.Generator, drawn: list[Batch]) -> float:
    start = time.perf_counter()
    for x, y in drawn:
        step(model, optimizer, x, y, generator)  # float(loss) each step: no lazy work left
    return time.perf_counter() - start


# ------------------------------------------------------------------------------- reporting


def report(console: Console, res: Result) -> dict:
    """Print the workload's table; return its figures for the JSON record."""
    w, a = res.workload, res.workload.spec.method.attack
    x, _ = w.batches[0]
    console.print(f"\n[bold]{w.name}[/bold]: {w.spec.model.arch}, batch {len(x)} x "
                  f"{'x'.join(map(str, w.shape))}, TPGD-{a.steps}, {len(w.batches)} steps "
                  f"x {len(res.ips[BASELINE])} rounds per path")
    table = Table("path", "first-step loss", "|Δ| vs official", "first step s", "images/s",
                  "ratio vs official", "range", "ratio vs exact")
    for name, ips in res.ips.items():
        loss, r = res.first_loss[name], summary(res.ratio[name])
        table.add_row(name, f"{loss:.7f}", f"{abs(loss - res.first_loss[BASELINE]):.1e}",
                      f"{res.first_step_s[name]:.1f}",
                      f"{statistics.median(ips):.1f}", f"{r['median']:.2f}",
                      f"{r['min']:.2f}–{r['max']:.2f}",
                      f"{statistics.median(res.vs_exact[name]):.2f}")
    console.print(table)
    console.print(f"first step, same RNG stream: exact x_adv == official x_adv (bit for "
                  f"bit): {res.x_adv_equal}")
    return {"name": w.name, "arch": w.spec.model.arch, "batch": len(x), "shape": w.shape,
            "tpgd_steps": a.steps, "steps_per_round": len(w.batches),
            "rounds": len(res.ips[BASELINE]), "x_adv_equal": res.x_adv_equal,
            "first_step_loss": res.first_loss, "first_step_s": res.first_step_s,
            "warmup_s": res.warmup_s,
            "images_per_s": {n: summary(v) for n, v in res.ips.items()},
            "ratio_vs_official": {n: summary(v) for n, v in res.ratio.items()},
            "ratio_vs_exact": {n: summary(v) for n, v in res.vs_exact.items()}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke sizes (~1 minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round, digits")
    parser.add_argument("--resnet-steps", type=int, default=1,
                        help="timed steps per round, ResNet-18")
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    # The first-step check has already run every path once on the same shapes; ResNet-18
    # steps take seconds, so only the digits workload adds warm-up steps.
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per path, digits")
    parser.add_argument("--knobs", default=KNOB_DEFAULT,
                        help=f"comma-separated, of {sorted(KNOBS)} ('' for none)")
    parser.add_argument("--out-dir", type=Path, default=None, help="JSON record folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workloads", default="digits,resnet",
                        help="comma-separated: digits (real 8x8 digits), resnet (CIFAR-shaped)")
    parser.add_argument("--resnet-classes", type=int, default=100, help="CIFAR-100: 100")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.resnet_batch, args.warmup = 6, 2, 4, 1
        args.knobs = "channels_last" if args.knobs == KNOB_DEFAULT else args.knobs
    args.knobs = [k for k in args.knobs.split(",") if k]
    unknown = set(args.knobs) - set(KNOBS)
    if unknown:
        parser.error(f"unknown knobs: {sorted(unknown)}")
    args.workloads = [w for w in args.workloads.split(",") if w]
    if set(args.workloads) - {"digits", "resnet"}:
        parser.error(f"unknown workloads: {args.workloads}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    console = Console(width=110)
    record = provenance(device, {"threads": args.threads, "quick": args.quick,
                                 "knobs": args.knobs, "workloads": args.workloads,
                                 "resnet_batch": args.resnet_batch,
                                 "resnet_classes": args.resnet_classes})
    header(console, record)
    start = time.perf_counter()
    runs = []
    if "digits" in args.workloads:
        runs.append((digits_workload(max(args.steps, args.warmup)).to(device), args.warmup))
    if "resnet" in args.workloads:
        # On a GPU the first-step check (which compiles) is not enough warm-up: cuDNN and
        # the caching allocator settle over the first steps, so warm up as for digits.
        runs.append((resnet_workload(args.resnet_steps, args.resnet_batch,
                                     classes=args.resnet_classes).to(device),
                     args.warmup if device.type == "cuda" else 0))
    record["workloads"] = []
    path = write_record("train_paths", {**record, "partial": True},
                        **({"out_dir": args.out_dir} if args.out_dir else {}))

    def save(partial: dict) -> None:  # after every stage: a time-out keeps what finished
        write_record("train_paths", {**record, "partial": True,
                                     "workloads": [*record["workloads"], partial]}, path=path)

    for w, warmup in runs:
        res = benchmark(w, rounds=args.rounds, warmup=warmup, knobs=args.knobs, save=save)
        record["workloads"].append(report(console, res))
    record["wall_time_s"] = round(time.perf_counter() - start, 1)
    write_record("train_paths", {**record, "partial": False}, path=path)
    console.print(f"\nwall time: {record['wall_time_s']:.0f} s; record: {path}")
    return record


if __name__ == "__main__":
    sys.exit(exit_code(main))
