"""Fidelity gate for the fast knobs: does a knob change results, or only rounding?

    python benchmarks/bench_gate.py [--device cuda] [--workload fashion|cifar]
        [--data-root DIR] [--knobs bf16,all] [--epochs N] [--tolerance T]
        [--runs-dir DIR] [--out-dir DIR] [--quick]

The GPU half of the gate (the CPU half is tests/test_fast_knobs.py, on digits). One run is
trained through the engine in fp32 and once with each knob from the same seed, plus fp32
from a second seed for scale, and the figures compared are validation clean and PGD-10
accuracy averaged over the last two epochs. A knob passes when both differ from fp32's by
at most the tolerance. Workloads:

* ``fashion`` (default): spec/fashion_mnist.yaml with ResNet-18 on 4,096 real training
  images, 3 epochs; the figures land mid-range, so agreement means something;
* ``cifar``: ResNet-18 on CIFAR-shaped synthetic data (`common.cifar_shaped`). Its classes
  are random-pixel prototypes, so clean accuracy reaches 1.0 and PGD-10 stays near 0: the
  knobs run on CIFAR's shapes, but the gate is usually inconclusive there.

``--quick`` trains each workload's small-CNN version for 2 epochs: a CPU rehearsal.

Tolerance 0.06, the CPU gate's: 500 validation images give one accuracy a binomial standard
error of at most 0.023, so two runs' two-epoch means differ by up to about 0.03 from
sampling alone, and 0.06 is twice that. The second seed's difference is printed beside each
knob's: a knob that moves the figures further than another seed does changes more than
rounding.

Before any run, fp32's first five steps are taken on the device (`common.probe`): a recipe
whose loss is not finite or explodes there stops the gate with one line (exit 3), in
seconds rather than after an epoch.

Exit status: 0 every knob passed; 1 a knob failed (or its run failed); 2 bad arguments;
3 inconclusive: fp32 itself ends at chance or at the ceiling on both figures, where
agreement proves nothing, or diverged in its first steps; 4 our own failure (an unexpected
error, traceback printed).
The record (`results/gate-<device>-<time>.json`) is rewritten after every run, so a call
stopped by its time box still leaves the runs it finished.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from bench_train_paths import KNOBS, with_performance
from common import (
    DIVERGED,
    Diverged,
    cifar_shaped,
    exit_code,
    fashion_resnet,
    header,
    probe,
    provenance,
    write_record,
)
from rich.console import Console
from rich.table import Table

from trades_repro.spec import ExperimentSpec, parse_spec
from trades_repro.train import train

TOLERANCE = 0.06  # see the module docstring
FP32, SEED1 = "fp32", "fp32 seed 1"
CEILING = 0.99
NUM_CLASSES = 10  # both workloads'


def fashion(device: str, epochs: int, quick: bool, root: Path | None) -> ExperimentSpec:
    """`common.fashion_resnet`: ResNet-18 on 4,096 real Fashion-MNIST images (quick: the
    spec's small CNN on 1,024)."""
    return fashion_resnet(device=device, epochs=epochs, quick=quick, root=root)


def cifar(device: str, epochs: int, quick: bool, root: Path | None) -> ExperimentSpec:
    """CIFAR-shaped synthetic ResNet-18 (`common.cifar_shaped`); with `quick`, a small CNN.
    Its classes are random-pixel prototypes: clean accuracy reaches 1.0 within two epochs
    and PGD-10 stays near 0, so this workload checks that the knobs run, and the gate
    usually calls it inconclusive."""
    small = {"n_train": 1024 + 128, "val_size": 128, "batch_size": 32,
             "model": {"arch": "small_cnn", "width": 8}}
    return cifar_shaped(device=device, epochs=epochs, **(small if quick else {}))


WORKLOADS = {"fashion": fashion, "cifar": cifar}


def gate_specs(workload: str, device: str, knobs: list[str], epochs: int, quick: bool,
               root: Path | None = None) -> dict[str, ExperimentSpec]:
    """fp32 (seed 0), fp32 from seed 1, and each knob from seed 0: the same run otherwise."""
    base = WORKLOADS[workload](device, epochs, quick, root)
    other = base.model_dump(mode="json") | {"seed": 1}
    specs = {FP32: base, SEED1: parse_spec(other, source="bench_gate: seed 1")}
    specs.update({knob: with_performance(base, KNOBS[knob]) for knob in knobs})
    return specs


def figures_of(spec: ExperimentSpec, runs: Path) -> dict:
    """Train `spec`; its last-two-epoch mean clean and PGD-10 accuracy and its epochs."""
    started = time.perf_counter()
    records = train(spec, runs, progress=False).records
    last = records[-2:]
    return {"clean": sum(r.val_clean_acc for r in last) / len(last),
            "pgd10": sum(r.val_pgd10_acc for r in last) / len(last),
            "seconds": round(time.perf_counter() - started, 1),
            "epochs": [r.model_dump() for r in records]}


def informative(fp32: dict, num_classes: int = NUM_CLASSES) -> bool:
    """Whether fp32's figures leave room to disagree: one of them off chance and the ceiling."""
    chance = 1.0 / num_classes + 0.05
    return any(chance < fp32[key] < CEILING for key in ("clean", "pgd10"))


def judge(figures: dict[str, dict], knobs: list[str], tolerance: float) -> dict[str, dict]:
    """Each knob's and the second seed's differences from fp32, and whether the knob passed."""
    fp32 = figures[FP32]
    out = {}
    for name in [SEED1, *knobs]:
        run = figures.get(name)
        if run is None or "error" in run:
            out[name] = {"passed": False, "error": (run or {}).get("error", "not run")}
            continue
        delta = {key: abs(run[key] - fp32[key]) for key in ("clean", "pgd10")}
        out[name] = {"delta_clean": delta["clean"], "delta_pgd10": delta["pgd10"],
                     "passed": max(delta.values()) <= tolerance}
    return out


def exit_status(figures: dict[str, dict], verdicts: dict[str, dict], knobs: list[str]) -> int:
    """0 all knobs passed, 1 one failed, 3 fp32 missing or at chance/ceiling (no evidence)."""
    fp32 = figures.get(FP32)
    if fp32 is None or "error" in fp32 or not informative(fp32):
        return 3
    return 0 if all(verdicts[k]["passed"] for k in knobs) else 1


def run_all(specs: dict[str, ExperimentSpec], runs: Path, save) -> dict[str, dict]:
    """Train every spec in order, saving after each; a failed run is recorded, not fatal."""
    figures: dict[str, dict] = {}
    for name, spec in specs.items():
        try:
            figures[name] = figures_of(spec, runs)
        except Exception as err:  # a knob that crashes fails the gate; the rest still run
            figures[name] = {"error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()[-4000:]}
            if name == FP32:
                save(figures)
                break
        save(figures)
    return figures


def table(figures: dict[str, dict], verdicts: dict[str, dict], tolerance: float) -> Table:
    out = Table("run", "clean", "PGD-10", "|Δ clean|", "|Δ PGD-10|", "seconds",
                f"within {tolerance}", title="last two epochs' mean validation accuracy")
    for name, run in figures.items():
        if "error" in run:
            out.add_row(name, "-", "-", "-", "-", "-", f"run failed: {run['error'][:60]}")
            continue
        verdict = verdicts.get(name, {})
        delta = [f"{verdict[k]:.3f}" if k in verdict else "" for k in
                 ("delta_clean", "delta_pgd10")]
        passed = {True: "yes", False: "no"}.get(verdict.get("passed"), "")
        out.add_row(name, f"{run['clean']:.3f}", f"{run['pgd10']:.3f}", *delta,
                    f"{run['seconds']:.0f}", passed if name != SEED1 else f"({passed})")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--workload", default="fashion", choices=sorted(WORKLOADS),
                        help="fashion: real Fashion-MNIST (informative); cifar: CIFAR-shaped "
                        "synthetic (runs the knobs; usually inconclusive)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder of the Fashion-MNIST IDX files (default: the spec's)")
    parser.add_argument("--knobs", default=None,
                        help=f"comma-separated, of {sorted(KNOBS)} (default: bf16,all, where "
                        "all includes compile; with --quick: channels_last)")
    parser.add_argument("--epochs", type=int, default=None, help="default 3; --quick: 2")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--out-dir", type=Path, default=None, help="JSON record folder")
    parser.add_argument("--quick", action="store_true",
                        help="small CNN on 384 images: a CPU rehearsal, seconds per run")
    args = parser.parse_args(argv)
    default = "channels_last" if args.quick else "bf16,all"
    args.knobs = [k for k in (args.knobs if args.knobs is not None else default).split(",")
                  if k]
    unknown = set(args.knobs) - set(KNOBS)
    if unknown:
        parser.error(f"unknown knobs: {sorted(unknown)}")
    if args.epochs is None:
        args.epochs = 2 if args.quick else 3
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the figure is a two-epoch mean)")
    if not 0 < args.tolerance < 1:
        parser.error("--tolerance must lie between 0 and 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu --quick "
                     "to rehearse)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    console = Console(width=110)
    record = provenance(torch.device(args.device), {
        "workload": args.workload, "knobs": args.knobs, "epochs": args.epochs,
        "tolerance": args.tolerance, "quick": args.quick})
    header(console, record)
    specs = gate_specs(args.workload, args.device, args.knobs, args.epochs, args.quick,
                       args.data_root)
    record["specs"] = {name: spec.model_dump(mode="json") for name, spec in specs.items()}
    kwargs = {"out_dir": args.out_dir} if args.out_dir else {}
    path = write_record("gate", record, **kwargs)

    def save(figures: dict) -> None:
        write_record("gate", {**record, "figures": figures}, path=path)

    try:
        record["fp32_first_losses"] = probe(f"the gate's {args.workload} fp32 run",
                                            specs[FP32])
    except Diverged as err:
        write_record("gate", {**record, "diverged": str(err), "exit_status": DIVERGED},
                     path=path)
        print(f"bench_gate.py: {err}", file=sys.stderr)
        return DIVERGED
    with tempfile.TemporaryDirectory() as scratch:
        figures = run_all(specs, args.runs_dir or Path(scratch), save)
    verdicts = judge(figures, args.knobs, args.tolerance) if FP32 in figures and \
        "error" not in figures[FP32] else {}
    status = exit_status(figures, verdicts, args.knobs)
    write_record("gate", {**record, "figures": figures, "verdicts": verdicts,
                          "exit_status": status}, path=path)
    console.print(table(figures, verdicts, args.tolerance))
    console.print({0: "gate passed: every knob within tolerance of fp32",
                   1: "gate FAILED: a knob moved the results beyond the tolerance",
                   3: "inconclusive: fp32 ends at chance or at the ceiling (or did not run)"
                   }[status])
    console.print(f"record: {path}")
    return status


if __name__ == "__main__":
    sys.exit(exit_code(main))
