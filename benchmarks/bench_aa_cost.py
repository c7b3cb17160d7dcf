"""AutoAttack's cost in model passes, stage by stage, and the GPU time those passes imply.

    python benchmarks/bench_aa_cost.py [--quick] [--workload digits|fashion] [--n 64]
        [--batch-size 500] [--rounds 2] [--threads 1] [--robust 0.2027]
        [--peak-tflops 67] [--runs-dir DIR] [--data-root DIR] [--out-dir DIR]

A pass is counted per image: a forward 1, a backward that computes only the input's gradient
1, one that also computes every weight's gradient 2 (the convention of the training step's
27 forward-equivalents against official TRADES' 39, README "Performance"). The model is
wrapped in a counter (`PassCounter`) and attacked with pyautoattack's ``standard`` cascade
(APGD-CE, APGD-T, FAB-T, Square at 5,000 queries) as `trades_repro.evaluate` runs it: fp32
under `numerics.evaluation()`, weights frozen (`attacks.frozen_weights`).

1. **Stages**: the cascade on `--n` test images of a TRADES workload (`bench_autoattack`'s),
   its passes split at pyautoattack's per-attack log lines: images entering each attack,
   forward-equivalents per entering image, share of all passes and of the seconds.
2. **Robust images**: the cascade again on only the images the first run left standing.
   Every attack runs its full course on such an image (APGD's iterations run for the whole
   batch; Square spends every query), so their passes per image are what each image still
   robust at the end costs at least.
3. **Frozen vs plain**: the cascade with frozen weights (as `evaluate` runs it) and with the
   weights requiring gradients (pyautoattack called on a model as it comes), taking turns
   for `--rounds` rounds: seconds, their ratio, and whether x_adv is identical. Only FAB
   calls ``backward()``, so FAB-T alone is timed both ways too, on the paper's ResNet-18
   (untrained, CIFAR-shaped, 16 images, 10 iterations, 3 targets: each image runs FAB's
   full course), where weight gradients cost more than on the digits' small CNN.
4. **GPU estimate**: 10,000 images at robust accuracy `--robust` (default: the paper's
   Table 1 "Regular" AutoAttack accuracy on CIFAR-100) cost at least
   ``10,000 × robust × passes per robust image`` forward-equivalents; divided by the rate
   the training step reached on a GPU (the newest ``train_paths-cuda-*.json`` in
   `benchmarks/results/`: images/s × 27 for the exact path, fp32 and with ``tf32``), that is
   the time of 10,000 images if AutoAttack used the GPU as fully as training does. It
   leaves out what images broken along the way cost, so it is a floor on the passes; the
   rate is training's at batch 256, not an evaluation kernel's, so it is an estimate, not a
   bound, of the time. A bound follows from FLOPs: a forward-equivalent of the paper's
   CIFAR-100 ResNet-18 costs the FLOPs `torch.utils.flop_counter` counts for one forward
   (an input-only backward costs as many), and no fp32 kernel runs faster than the GPU's
   peak fp32 rate (`--peak-tflops`, default 67: NVIDIA's datasheet FP32 figure for the H100
   SXM and the H200, without tensor cores, which fp32 does not use).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from bench_autoattack import DEFAULT_EPOCHS, WORKLOADS, _StageHandler, attacked, progress
from common import DIVERGED, RESULTS, exit_code, header, provenance, write_record
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from trades_repro import numerics
from trades_repro.attacks import frozen_weights
from trades_repro.preflight import AUTOATTACK_LOGGER

PAPER_CIFAR100_AA = 0.2027  # PAPER.md Table 1, "Regular": AutoAttack accuracy, CIFAR-100
H100_FP32_TFLOPS = 67.0  # NVIDIA datasheet: H100 SXM and H200, FP32 without tensor cores
EXACT_PASSES = 27  # forward-equivalents per image of the exact training step (TPGD-10)
TEN_THOUSAND = 10_000
NOT_ROBUST = 3  # nothing left standing: no passes per robust image to measure
_INITIAL = re.compile(r"initial accuracy: ([\d.]+)%")


class PassCounter(nn.Module):
    """`net` with its passes counted in images: forwards, backwards reaching the logits, and
    backwards that reached the first weight too (those computed every weight's gradient)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.counts: collections.Counter[str] = collections.Counter()
        self._last = 0
        first = next(net.parameters())
        first.requires_grad_(True)
        # fires only in a backward that computes this weight's gradient
        first.register_hook(self._weights_reached)

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        n = int(x.shape[0])
        self.counts["forward"] += n
        if out.requires_grad:
            out.register_hook(lambda grad, n=n: self._backward(n))
        return out

    def _backward(self, n: int) -> None:
        self.counts["backward"] += n
        self._last = n

    def _weights_reached(self, grad: Tensor) -> None:
        self.counts["weight_backward"] += self._last

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def forward_equivalents(counts: dict[str, int]) -> int:
    """A weight-gradient backward costs one more than an input-only one."""
    return counts.get("forward", 0) + counts.get("backward", 0) + \
        counts.get("weight_backward", 0)


class _CountingStages(_StageHandler):
    """`_StageHandler` that also snapshots the pass counts at each of pyautoattack's lines,
    the initial-accuracy one (which closes the checks and the clean forward) included."""

    def __init__(self, stages: list[dict], snapshot: Callable[[], dict[str, int]]) -> None:
        super().__init__(stages)
        self.snapshot = snapshot

    def emit(self, record) -> None:
        line = record.getMessage()
        initial = _INITIAL.search(line)
        if initial:
            self.stages.append({"attack": "clean", "robust_acc": float(initial[1]) / 100,
                                "cumulative_s": 0.0, "counts": self.snapshot()})
            return
        before = len(self.stages)
        super().emit(record)
        if len(self.stages) > before:
            self.stages[-1]["counts"] = self.snapshot()


def counted_cascade(net: nn.Module, x: Tensor, y: Tensor, eps: float, batch_size: int,
                    device: str) -> tuple[list[dict], Tensor, int]:
    """The cascade on a counting wrapper of `net`: per-stage passes (differences of the
    snapshots), the robust mask, and the total forward-equivalents."""
    counter = PassCounter(net)
    stages: list[dict] = []
    logger = logging.getLogger(AUTOATTACK_LOGGER)
    handler = _CountingStages(stages, counter.snapshot)
    level = logger.level
    logger.setLevel(logging.DEBUG)  # setLevel clears the logger's cache
    logger.addHandler(handler)
    try:
        y_adv, seconds = _cascade(counter, x, y, eps, batch_size, device, frozen=True)[1:]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return _per_stage(stages, len(y), seconds), (y_adv.cpu() == y.cpu()), \
        forward_equivalents(counter.snapshot())


def _per_stage(stages: list[dict], n: int, seconds: float) -> list[dict]:
    rows, before, entering, clock = [], {}, n, 0.0
    total = forward_equivalents(stages[-1]["counts"]) if stages else 0
    for stage in stages:
        counts = {k: v - before.get(k, 0) for k, v in stage["counts"].items()}
        fe = forward_equivalents(counts)
        rows.append({"attack": stage["attack"], "entering": entering,
                     "robust_after": round(stage["robust_acc"] * n),
                     **counts, "forward_equivalents": fe,
                     "per_entering_image": fe / entering if entering else 0.0,
                     "share": fe / total if total else 0.0,
                     "seconds": stage["cumulative_s"] - clock})
        before, entering, clock = stage["counts"], round(stage["robust_acc"] * n), \
            stage["cumulative_s"]
    if rows:  # the checks and clean forward have no time of their own in pyautoattack's log
        rows[0]["seconds"] = max(0.0, seconds - sum(r["seconds"] for r in rows[1:]))
    return rows


def _cascade(net: nn.Module, x: Tensor, y: Tensor, eps: float, batch_size: int, device: str,
             *, frozen: bool) -> tuple[Tensor, Tensor, float]:
    from pyautoattack import AutoAttack

    adversary = AutoAttack(net, device=device, eps=eps, seed=0, version="standard")
    with (numerics.evaluation(), torch.autocast(torch.device(device).type, enabled=False),
          frozen_weights(net) if frozen else nullcontext()):
        started = time.perf_counter()
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
        seconds = time.perf_counter() - started
    return x_adv, y_adv, seconds


def frozen_vs_plain(net: nn.Module, x: Tensor, y: Tensor, eps: float, batch_size: int,
                    device: str, rounds: int) -> dict:
    """The cascade both ways, taking turns (order rotated each round)."""
    seconds: dict[str, list[float]] = {"frozen": [], "plain": []}
    x_adv: dict[str, Tensor] = {}
    for r in range(rounds):
        for way in (["frozen", "plain"] if r % 2 == 0 else ["plain", "frozen"]):
            progress(f"round {r + 1}/{rounds}: the cascade, weights {way} ...")
            adv, _, s = _cascade(net, x, y, eps, batch_size, device, frozen=way == "frozen")
            seconds[way].append(s)
            x_adv.setdefault(way, adv)
    return _versus(seconds, x_adv)


def fab_resnet(rounds: int, device: str) -> dict:
    """FAB-T alone on an untrained CIFAR-shaped ResNet-18, weights frozen vs plain."""
    from pyautoattack import AutoAttack

    from trades_repro.models import build_model
    from trades_repro.spec import ModelSpec

    torch.manual_seed(0)
    net = build_model(ModelSpec(arch="resnet18"), in_channels=3, num_classes=10,
                      image_size=32).eval().to(device)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        y = net(x.to(device)).argmax(1).cpu()
    seconds: dict[str, list[float]] = {"frozen": [], "plain": []}
    x_adv: dict[str, Tensor] = {}
    for r in range(rounds):
        for way in (["frozen", "plain"] if r % 2 == 0 else ["plain", "frozen"]):
            progress(f"round {r + 1}/{rounds}: FAB-T on ResNet-18, weights {way} ...")
            adversary = AutoAttack(net, device=device, eps=1e-4, seed=0, version="standard")
            adversary.verbose = False
            adversary.attacks_to_run = ["fab-t"]
            adversary.fab.n_iter, adversary.fab.n_target_classes = 10, 3
            with (numerics.evaluation(),
                  frozen_weights(net) if way == "frozen" else nullcontext()):
                started = time.perf_counter()
                adv, _ = adversary.run_standard_evaluation(x, y, batch_size=16)
                seconds[way].append(time.perf_counter() - started)
            x_adv.setdefault(way, adv)
    return _versus(seconds, x_adv)


def _versus(seconds: dict[str, list[float]], x_adv: dict[str, Tensor]) -> dict:
    frozen, plain = statistics.median(seconds["frozen"]), statistics.median(seconds["plain"])
    return {"seconds": seconds, "median_s": {"frozen": frozen, "plain": plain},
            "speedup": plain / frozen,
            "x_adv_equal": torch.equal(x_adv["frozen"], x_adv["plain"])}


def gpu_rates(results: Path = RESULTS) -> dict[str, dict]:
    """Forward-equivalents per second of the exact training step on a GPU, fp32 and tf32:
    each from the newest train_paths-cuda record that measured it."""
    rates: dict[str, dict] = {}
    for path in sorted(results.glob("train_paths-cuda-*.json"), reverse=True):
        record = json.loads(path.read_text())
        for work in record.get("workloads", []):
            for precision, knob in (("fp32", "exact"), ("tf32", "tf32")):
                speed = work.get("images_per_s", {}).get(knob)
                if speed and precision not in rates and work.get("batch") == 256:
                    rates[precision] = {"forward_equivalents_per_s":
                                        speed["median"] * EXACT_PASSES,
                                        "images_per_s": speed["median"],
                                        "device": record.get("device_name"),
                                        "record": path.name}
    return rates


def cifar100_forward_flops() -> float:
    """FLOPs of one forward of the paper's ResNet-18 on one CIFAR-100 image, counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from trades_repro.models import build_model
    from trades_repro.spec import ModelSpec

    net = build_model(ModelSpec(arch="resnet18"), in_channels=3, num_classes=100,
                      image_size=32).eval()
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        net(torch.rand(1, 3, 32, 32))
    return float(flops.get_total_flops())


def estimate(per_robust_image: float, robust: float, rates: dict[str, dict],
             flops_per_pass: float, peak_tflops: float) -> dict:
    passes = TEN_THOUSAND * robust * per_robust_image
    return {"robust": robust, "forward_equivalents_floor": passes,
            "seconds": {p: passes / r["forward_equivalents_per_s"] for p, r in rates.items()},
            "flops_per_forward_equivalent": flops_per_pass, "peak_fp32_tflops": peak_tflops,
            "fp32_seconds_at_peak": passes * flops_per_pass / (peak_tflops * 1e12),
            "training_fp32_share_of_peak": {
                p: r["forward_equivalents_per_s"] * flops_per_pass / (peak_tflops * 1e12)
                for p, r in rates.items() if p == "fp32"}}


def main(argv: list[str] | None = None) -> dict | int:
    args = parse_args(argv)
    console = Console(width=110)
    if (found := attacked(args, "bench_aa_cost.py")) is None:
        return DIVERGED
    net, x, y, eps = found
    record = provenance(torch.device(args.device), {
        "threads": args.threads, "n": args.n, "eps": eps, "batch_size": args.batch_size,
        "rounds": args.rounds, "train_epochs": args.epochs, "workload": args.workload,
        "robust": args.robust, "peak_tflops": args.peak_tflops})
    header(console, record)
    out = {"out_dir": args.out_dir} if args.out_dir else {}
    path = write_record("aa_cost", record, **out)

    progress(f"counting the cascade's passes on {args.n} images ...")
    stages, robust, total = counted_cascade(net, x, y, eps, args.batch_size, args.device)
    record["stages"] = stages
    record["forward_equivalents_per_image"] = total / args.n
    write_record("aa_cost", record, path=path)
    _stage_table(console, stages, args.n)
    if not robust.any():
        print("bench_aa_cost.py: no image is left standing by AutoAttack, so there are no "
              "passes per robust image to measure; train the workload longer", file=sys.stderr)
        return NOT_ROBUST

    kept = int(robust.sum())
    progress(f"counting the cascade's passes on the {kept} images it left standing ...")
    again, still, total_robust = counted_cascade(net, x[robust], y[robust], eps,
                                                 args.batch_size, args.device)
    record["robust_images"] = {"n": kept, "still_robust": int(still.sum()),
                               "forward_equivalents_per_image": total_robust / kept,
                               "stages": again}
    write_record("aa_cost", record, path=path)

    record["frozen_vs_plain"] = frozen_vs_plain(net, x, y, eps, args.batch_size,
                                                args.device, args.rounds)
    write_record("aa_cost", record, path=path)
    record["fab_t_resnet18_frozen_vs_plain"] = fab_resnet(args.rounds, args.device)
    write_record("aa_cost", record, path=path)

    rates = gpu_rates()
    record["gpu_rates"] = rates
    record["gpu_estimate_10000"] = estimate(total_robust / kept, args.robust, rates,
                                            cifar100_forward_flops(), args.peak_tflops)
    write_record("aa_cost", record, path=path)
    _summary(console, record)
    console.print(f"record: {path}")
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 digits, 1 round")
    parser.add_argument("--n", type=int, default=64, help="test images to attack")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2,
                        help="frozen/plain timing rounds, taking turns")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workload", choices=WORKLOADS, default="digits")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="train the model here, or find it trained (default: a temporary "
                        "folder)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="Fashion-MNIST's IDX folder (fashion workload)")
    parser.add_argument("--robust", type=float, default=PAPER_CIFAR100_AA,
                        help="robust accuracy of the 10,000 images the GPU estimate is for")
    parser.add_argument("--peak-tflops", type=float, default=H100_FP32_TFLOPS,
                        help="the GPU's peak fp32 rate, for the bound")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("n", "batch_size", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.robust <= 1:
        parser.error("--robust must be in (0, 1]")
    if not args.peak_tflops > 0:
        parser.error("--peak-tflops must be positive")
    args.epochs = DEFAULT_EPOCHS[args.workload]
    if args.quick:
        args.n, args.epochs, args.rounds = 16, 5, 1
    return args


def _stage_table(console: Console, stages: list[dict], n: int) -> None:
    table = Table("stage", "entering", "left", "forwards", "input bwd", "weight bwd",
                  "fwd-eq / entering", "share of passes", "seconds")
    for s in stages:
        table.add_row(s["attack"], str(s["entering"]), str(s["robust_after"]),
                      str(s.get("forward", 0)), str(s.get("backward", 0)),
                      str(s.get("weight_backward", 0)), f"{s['per_entering_image']:.0f}",
                      f"{s['share']:.2f}", f"{s['seconds']:.1f}")
    console.print(f"\n[bold]standard AutoAttack[/bold] on {n} images, weights frozen")
    console.print(table)


def _summary(console: Console, record: dict) -> None:
    robust, fp = record["robust_images"], record["frozen_vs_plain"]
    console.print(f"passes per image: {record['forward_equivalents_per_image']:.0f} overall, "
                  f"{robust['forward_equivalents_per_image']:.0f} per image left standing "
                  f"({robust['still_robust']}/{robust['n']} still robust on the second run)")
    console.print(f"frozen weights vs plain: {fp['speedup']:.2f}x "
                  f"({fp['median_s']['plain']:.1f} s -> {fp['median_s']['frozen']:.1f} s), "
                  f"x_adv identical: {fp['x_adv_equal']}")
    fab = record["fab_t_resnet18_frozen_vs_plain"]
    console.print(f"FAB-T alone on ResNet-18, frozen vs plain: {fab['speedup']:.2f}x "
                  f"({fab['median_s']['plain']:.1f} s -> {fab['median_s']['frozen']:.1f} s), "
                  f"x_adv identical: {fab['x_adv_equal']}")
    est = record["gpu_estimate_10000"]
    console.print(f"10,000 images at robust accuracy {est['robust']:.4f}: at least "
                  f"{est['forward_equivalents_floor'] / 1e6:.1f} M forward-equivalents of "
                  f"{est['flops_per_forward_equivalent'] / 1e9:.2f} GFLOP (CIFAR-100 "
                  f"ResNet-18): {est['fp32_seconds_at_peak'] / 60:.1f} min or more in fp32 "
                  f"even at {est['peak_fp32_tflops']:.0f} TFLOP/s, the GPU's peak")
    if not est["seconds"]:
        console.print("no train_paths-cuda record: no estimate at a measured GPU rate")
        return
    table = Table("precision", "training rate (fwd-eq/s)", "device", "10,000 images at least")
    for precision, seconds in est["seconds"].items():
        rate = record["gpu_rates"][precision]
        table.add_row(precision, f"{rate['forward_equivalents_per_s']:,.0f}",
                      str(rate["device"]), f"{seconds / 60:.1f} min")
    share = est["training_fp32_share_of_peak"].get("fp32")
    console.print("\nat the rate the training step reached on a GPU"
                  + (f" (fp32: {share:.0%} of that peak)" if share else ""))
    console.print(table)


if __name__ == "__main__":
    sys.exit(exit_code(main))
