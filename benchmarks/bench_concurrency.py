"""Concurrent runs per device: aggregate training throughput of 1 vs 2 (vs 4) runs at once.

    python benchmarks/bench_concurrency.py [--quick] [--per-gpu 1,2] [--epochs N]
        [--device cpu|cuda] [--model digits|resnet18] [--repeats N]

`run-claim --executor local --jobs N` (CPU) or `--jobs-per-gpu K` (GPU) runs several runs at
once; this says whether that pays. For each level c, c worker processes (separate, as the
local executor starts them) each build a real run of the instant-tier digits spec (or, with
`--model resnet18`, ResNet-18 on CIFAR-shaped synthetic data: 32×32×3, 10 classes), wait at a
barrier until all are built (imports and data loading are not what is measured), then train
`--epochs` epochs through `train.run_epoch` (the engine's epoch: steps, validation, `last.pt`)
under the run's training numerics (`numerics.training`, as `train` sets them).

    aggregate images/s = (c × epochs × training images) / (last worker end − first start)
    speed-up(c) = aggregate(c) / aggregate(1)

Levels alternate within each repeat; tables show medians over repeats. On CPU every worker
uses one torch thread, as `run-claim` does. The load average is recorded: other processes on
the cores lower every level's figure, and the higher levels' most.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import ROOT, cifar_shaped, exit_code, header, provenance, summary, write_record
from rich.console import Console
from rich.table import Table

from trades_repro import numerics
from trades_repro.spec import ExperimentSpec

DIGITS = {"data": {"train_subset": 1024}, "monitor": {"sgcs": False}}  # 16 steps/epoch


def spec_for(model: str, device: str, seed: int) -> ExperimentSpec:
    """The run one worker trains: instant-tier digits, or CIFAR-shaped ResNet-18
    (`common.cifar_shaped`: 5,120 training and 512 validation images, batch 128)."""
    if model == "resnet18":
        return cifar_shaped(device=device, seed=seed, name="concurrency_resnet18")
    base = yaml.safe_load((ROOT / "spec" / "digits.yaml").read_text())
    for key, value in DIGITS.items():
        base[key] = {**base.get(key, {}), **value}
    return ExperimentSpec.model_validate({**base, "seed": seed, "device": device})


def worker(args: argparse.Namespace) -> None:
    """Build the run, signal ready, wait for `go`, train, print timings as JSON."""
    from trades_repro.engine import build_session
    from trades_repro.train import run_epoch

    if args.device == "cpu":
        torch.set_num_threads(1)
    spec = spec_for(args.model, args.device, args.seed)
    with tempfile.TemporaryDirectory() as runs:
        session = build_session(spec, Path(runs) / "run")
        Path(args.barrier, f"ready-{args.seed}").touch()
        while not Path(args.barrier, "go").exists():
            time.sleep(0.01)
        start = time.time()
        with numerics.training(spec.performance):  # as `train` does: fp32 unless the spec
            for epoch in range(1, args.epochs + 1):  # says (torch's default is TF32 cuDNN)
                run_epoch(session, epoch)
            if args.device == "cuda":
                torch.cuda.synchronize()
        end = time.time()
    images = args.epochs * len(session.splits.train.labels)
    print(json.dumps({"start": start, "end": end, "images": images}))


def level(c: int, args: argparse.Namespace) -> dict:
    """c workers at once; their aggregate and per-run images/s."""
    with tempfile.TemporaryDirectory() as barrier:
        cmd = [sys.executable, __file__, "--worker", "--barrier", barrier, "--model",
               args.model, "--device", args.device, "--epochs", str(args.epochs)]
        procs = [subprocess.Popen([*cmd, "--seed", str(seed)], stdout=subprocess.PIPE,
                                  text=True) for seed in range(c)]
        while len(list(Path(barrier).glob("ready-*"))) < c:
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError("a worker failed before the barrier")
            time.sleep(0.05)
        Path(barrier, "go").touch()
        outputs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            codes = [p.returncode for p in procs]
            raise RuntimeError(f"a worker failed while training (exit codes {codes})")
        results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    images = sum(r["images"] for r in results)
    per_run = [r["images"] / (r["end"] - r["start"]) for r in results]
    return {"aggregate": images / span, "per_run": sum(per_run) / len(per_run)}


def measure(levels: list[int], args: argparse.Namespace,
            save=lambda rounds: None) -> dict[int, dict[str, list]]:
    """Every level, `args.repeats` times (order reversed every other repeat); `save` gets the
    figures so far after each level."""
    rounds: dict[int, dict[str, list]] = {c: {"aggregate": [], "per_run": []} for c in levels}
    for repeat in range(args.repeats):
        for c in levels if repeat % 2 == 0 else levels[::-1]:
            figures = level(c, args)
            for key, value in figures.items():
                rounds[c][key].append(value)
            save(rounds)
    return rounds


def figures_of(rounds: dict[int, dict[str, list]]) -> dict[str, dict]:
    """Per level measured so far: medians and ranges, and the speed-up over one run."""
    base = summary(rounds[1]["aggregate"])["median"] if rounds[1]["aggregate"] else None
    out = {}
    for c, values in rounds.items():
        if not values["aggregate"]:
            continue
        agg, run = summary(values["aggregate"]), summary(values["per_run"])
        out[str(c)] = {"aggregate_images_s": agg, "per_run_images_s": run,
                       "speedup_over_1": agg["median"] / base if base else None}
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        worker(args)
        return
    levels = args.levels
    device = torch.device(args.device)
    console = Console()
    record = {**provenance(device, {"model": args.model, "epochs": args.epochs,
                                    "levels": levels, "repeats": args.repeats,
                                    "worker_threads": 1 if args.device == "cpu" else None})}
    with numerics.training(spec_for(args.model, args.device, 0).performance) as flags:
        record["training_flags"] = flags  # what each worker trains under
    header(console, record)
    path = write_record("concurrency", record,
                        **({"out_dir": args.out_dir} if args.out_dir else {}))

    def save(rounds: dict[int, dict[str, list]]) -> None:  # a time-out keeps what finished
        write_record("concurrency", {**record, "rounds": {str(c): v for c, v in
                                                          rounds.items()},
                                     "figures": figures_of(rounds)}, path=path)

    rounds = measure(levels, args, save)
    figures = figures_of(rounds)
    table = Table(title=f"{args.model} on {record['device_description']}: concurrent runs")
    for column in ("runs at once", "aggregate images/s", "per-run images/s", "speed-up"):
        table.add_column(column)
    for c, f in figures.items():
        table.add_row(c, f"{f['aggregate_images_s']['median']:.0f}",
                      f"{f['per_run_images_s']['median']:.0f}", f"{f['speedup_over_1']:.2f}x")
    console.print(table)
    console.print(f"record: {path}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke: 1 repeat, 1 epoch")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--per-gpu", default="1,2", help="levels: runs at once, e.g. 1,2,4")
    parser.add_argument("--model", default=None, choices=("digits", "resnet18"),
                        help="digits (instant tier; CPU default) or resnet18 on CIFAR-shaped "
                        "synthetic data (CUDA default)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out-dir", type=Path, default=None, help="JSON record folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None,
                        help="ignored: workers use 1 thread on CPU (as run-claim does)")
    args = parser.parse_args(argv)
    try:
        args.levels = sorted({1, *(int(x) for x in args.per_gpu.split(","))})
    except ValueError:
        parser.error(f"--per-gpu: comma-separated whole numbers, got {args.per_gpu!r}")
    if args.levels[0] < 1:
        parser.error(f"--per-gpu: levels must be at least 1, got {args.per_gpu!r}")
    if args.device == "cuda" and not args.worker and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    args.model = args.model or ("resnet18" if args.device == "cuda" else "digits")
    args.epochs = args.epochs or (1 if args.quick else (2 if args.model == "resnet18" else 3))
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(exit_code(main))
