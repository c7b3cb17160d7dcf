"""AutoAttack throughput (images/s) against batch size: standard cascade and Square alone.

    python benchmarks/bench_autoattack.py [--quick] [--n 64] [--batch-sizes 8,16,32,64]
        [--threads 1] [--device cpu|cuda] [--workload digits|fashion|cifar]
        [--runs-dir DIR] [--data-root DIR] [--attacks standard,square] [--tf32]

The workload must stay robust, or the cascade stops after APGD-CE and measures nothing: a
TRADES model is trained first (digits: a small CNN, ~20 s on a CPU; fashion: ResNet-18 on
real Fashion-MNIST, the gate's fp32 run, found trained when `--runs-dir` is the gate's), then
pyautoattack's ``standard`` cascade (APGD-CE, APGD-T, FAB-T, Square at 5,000 queries) and
Square alone (the masking verdict's second attack) run on the same test images at each batch
size, called the way `trades_repro.evaluate` calls them (`device=` and `eps=` explicit) and
under the same numerics (`numerics.evaluation()`: fp32, TF32 off, deterministic cuDNN;
recorded as `attack_flags`; `--tf32` measures TF32 instead, as `evaluate --tf32` runs).
Ratios are against AutoAttack's own default batch (250 in `run_standard_evaluation`), which
is always measured too. Batch sizes run largest first: on a GPU that is the figure that
matters, and a time-boxed call keeps it when the box closes on the baseline. Progress goes to
stderr as it happens: training, each attack and batch size started, and pyautoattack's own
line after each attack of the cascade, whose cumulative seconds the record keeps (`stages`).
A model still to train has its first five steps taken first (`common.probe`): a diverging
recipe stops the script with one line (exit 3). ``cifar`` (ResNet-18 on CIFAR-shaped
synthetic images) has CIFAR's cost per forward, but its model is barely robust, so the
cascade ends early."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from common import (
    DIVERGED,
    Diverged,
    exit_code,
    fashion_resnet,
    header,
    probe,
    provenance,
    write_record,
)
from rich.console import Console
from rich.table import Table

from trades_repro import numerics, store
from trades_repro.checkpoints import build_arch, load_state_dict, load_weights
from trades_repro.data import load_splits, to_float
from trades_repro.preflight import AUTOATTACK_LOGGER
from trades_repro.spec import ExperimentSpec, parse_spec
from trades_repro.train import train

AA_DEFAULT_BATCH = 250  # pyautoattack's run_standard_evaluation default
SPECS = {
    # the controls' base model (tests/_evalutil.py): robust enough to keep AA busy
    "digits": {
        "name": "bench_autoattack", "seed": 0, "device": "cpu",
        "data": {"dataset": "digits", "validation": "test", "crop_padding": 1},
        "model": {"arch": "small_cnn", "width": 16},
        "method": {"beta": 3, "attack": {"eps": 0.1, "step_size": 0.025, "steps": 5}},
        "optim": {"lr": 0.1, "batch_size": 64, "epochs": 10},
        "validation": {"eps": 0.1, "step_size": 0.025, "steps": 10},
    },
    # CIFAR-shaped (3x32x32, 10 classes) synthetic images and the paper's ResNet-18 at
    # 8/255: a GPU workload whose cost per image is CIFAR's (no CIFAR download needed)
    "cifar": {
        "name": "bench_autoattack_cifar", "seed": 0, "device": "cuda",
        "data": {"dataset": "synthetic", "validation": "test", "augment": False,
                 "synthetic": {"n_train": 4096, "n_test": 2048, "num_classes": 10,
                               "channels": 3, "image_size": 32}},
        "model": {"arch": "resnet18"},
        "method": {"beta": 6, "attack": {"eps": "8/255", "step_size": "2/255", "steps": 10}},
        # lr 0.01, batch 64: at 0.1 (batch 256) this set's loss diverges in epoch 1 (NaN on
        # an H200); at batch 256 two epochs are too few steps to leave chance accuracy
        "optim": {"lr": 0.01, "batch_size": 64, "epochs": 5},
        "validation": {"eps": "8/255", "step_size": "2/255", "steps": 10},
    },
}


DEFAULT_EPOCHS = {"digits": 10, "cifar": 5, "fashion": 3}
WORKLOADS = sorted(DEFAULT_EPOCHS)


def workload_spec(name: str, device: str, epochs: int, *, quick: bool = False,
                  root: Path | None = None) -> ExperimentSpec:
    """The model to attack: `SPECS[name]`, or `common.fashion_resnet` for ``fashion`` (the
    gate's fp32 run: ResNet-18 on real Fashion-MNIST, robust enough to keep every attack of
    the cascade busy, as the CIFAR-shaped synthetic set is not)."""
    if name == "fashion":
        return fashion_resnet(device=device, epochs=epochs, quick=quick, root=root)
    return parse_spec({**SPECS[name], "device": device,
                       "optim": {**SPECS[name]["optim"], "epochs": epochs}})


def workload(spec: ExperimentSpec, n: int, device: str, runs_dir: Path | None = None):
    """Train `spec` (or find it trained in `runs_dir`), and its first `n` test images;
    `Diverged` if its first steps are unstable (`common.probe`)."""
    with tempfile.TemporaryDirectory() as scratch:
        runs = runs_dir or Path(scratch)
        if not store.is_finished(store.run_dir_for(spec, runs)):
            probe(f"the {spec.name} workload", spec)
            progress(f"training the {spec.name} workload ({spec.optim.epochs} epochs) ...")
        else:
            progress(f"the {spec.name} workload is trained in {runs}")
        run = train(spec, runs, progress=False).run_dir
        tensors = load_state_dict(run / "best.safetensors")
    splits = load_splits(spec.data, spec.seed)
    net = build_arch(spec.model, spec.data.dataset, splits.shape, splits.num_classes)
    net = load_weights(net, tensors, run / "best.safetensors", spec.model.arch).eval()
    return net.to(device), to_float(splits.test.images[:n]), splits.test.labels[:n], \
        spec.validation.eps


def throughput(net, x, y, batch_size: int, attack: str, device: str,
               eps: float, tf32: bool = False) -> dict:
    from pyautoattack import AutoAttack

    adversary = AutoAttack(net, device=device, eps=eps, seed=0, version="standard")
    if attack == "square":
        adversary.attacks_to_run = ["square"]
    with (numerics.evaluation(tf32=tf32), torch.autocast(torch.device(device).type, enabled=False),
          _stages() as stages):
        started = time.perf_counter()  # as `evaluate` runs it: fp32, deterministic cuDNN
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
        seconds = time.perf_counter() - started
    robust = (y_adv.cpu() == y.cpu()).float().mean().item()
    return {"images_per_s": len(y) / seconds, "seconds": seconds, "robust_acc": robust,
            "stages": stages}


# pyautoattack (verbose) logs this after each attack of its cascade
_STAGE = re.compile(r"robust accuracy after (\S+): ([\d.]+)% \(total time ([\d.]+) s\)")


class _StageHandler(logging.Handler):
    """Echo pyautoattack's per-attack lines to stderr and keep (attack, robust accuracy,
    cumulative seconds) from them."""

    def __init__(self, stages: list[dict]) -> None:
        super().__init__(logging.DEBUG)
        self.stages = stages

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        found = _STAGE.search(line)
        if found:
            self.stages.append({"attack": found[1].lower(), "robust_acc": float(found[2]) / 100,
                                "cumulative_s": float(found[3])})
            print(f"  {line}", file=sys.stderr, flush=True)


@contextmanager
def _stages() -> Iterator[list[dict]]:
    logger = logging.getLogger(AUTOATTACK_LOGGER)
    stages: list[dict] = []
    handler = _StageHandler(stages)
    level = logger.level
    logger.setLevel(logging.DEBUG)  # not `.level =`: that keeps a cached 'debug is off'
    logger.addHandler(handler)
    try:
        yield stages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def attacked(args: argparse.Namespace, script: str) -> tuple | None:
    """`--threads` set, then the workload's model and test images (`workload`); None after
    one line on stderr when its first steps diverge."""
    torch.set_num_threads(args.threads)
    spec = workload_spec(args.workload, args.device, args.epochs, quick=args.quick,
                         root=args.data_root)
    try:
        return workload(spec, args.n, args.device, args.runs_dir)
    except Diverged as err:
        print(f"{script}: {err}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> dict | int:
    args = parse_args(argv)
    console = Console(width=110)
    if (found := attacked(args, "bench_autoattack.py")) is None:
        return DIVERGED
    net, x, y, eps = found
    record = provenance(torch.device(args.device), {
        "threads": args.threads, "n": args.n, "eps": eps, "train_epochs": args.epochs,
        "workload": args.workload, "tf32": args.tf32})
    with numerics.evaluation(tf32=args.tf32) as flags:
        record["attack_flags"] = flags
    header(console, record)
    path = write_record("autoattack", record, **({"out_dir": args.out_dir} if args.out_dir
                                                 else {}))
    figures = sweep(console, record, path, args, (net, x, y, eps))
    first = next(iter(figures))
    best = max(figures[first], key=lambda b: figures[first][b]["images_per_s"])
    record[f"fastest_{first}_batch"] = best
    # linear in the number of images at a fixed robust fraction: what 10,000 would take
    record["seconds_per_10000"] = {a: 10_000 / v[best]["images_per_s"]
                                   for a, v in figures.items()}
    write_record("autoattack", record, path=path)
    console.print(f"fastest {first} batch here: {best}; 10,000 images at it: "
                  f"{record['seconds_per_10000']}; record: {path}")
    return record


def sweep(console: Console, record: dict, path: Path, args: argparse.Namespace,
          attacked: tuple) -> dict[str, dict[int, dict]]:
    """Each attack at each batch size; the record is saved after each, so a time-boxed call
    keeps what finished."""
    net, x, y, eps = attacked
    figures: dict[str, dict[int, dict]] = {}
    for attack in args.attacks:
        figures[attack] = {}
        for b in args.sizes:
            progress(f"{attack} AutoAttack on {args.n} images at batch {b} ...")
            figures[attack][b] = throughput(net, x, y, b, attack, args.device, eps,
                                            tf32=args.tf32)
            progress(f"{attack} at batch {b}: {figures[attack][b]['seconds']:.1f} s")
            record["figures"] = {a: {str(k): f for k, f in v.items()}
                                 for a, v in figures.items()}
            write_record("autoattack", record, path=path)
        _table(console, attack, figures[attack], args.n, eps)
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 digits, 3 batch sizes")
    parser.add_argument("--n", type=int, default=64, help="test digits to attack")
    parser.add_argument("--batch-sizes", default="8,16,32,64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workload", choices=WORKLOADS, default="digits",
                        help="digits (CPU), fashion (ResNet-18 on real Fashion-MNIST) or "
                        "cifar (ResNet-18 on CIFAR-shaped synthetic images)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="train the model here, or find it trained (default: a temporary "
                        "folder); the gate's runs folder holds the fashion model")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="Fashion-MNIST's IDX folder (fashion workload)")
    parser.add_argument("--attacks", default="standard,square",
                        help="standard (the cascade) and/or square (alone)")
    parser.add_argument("--tf32", action="store_true",
                        help="attack with TF32 matmul and convolutions (evaluate --tf32)")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = {int(b) for b in args.batch_sizes.split(",")}
    args.epochs = DEFAULT_EPOCHS[args.workload]
    if args.quick:
        args.n, args.epochs, sizes = 16, 5, {4, 16}
    args.sizes = sorted(sizes | {AA_DEFAULT_BATCH}, reverse=True)  # largest first
    args.attacks = args.attacks.split(",")
    return args


def _table(console: Console, attack: str, rows: dict[int, dict], n: int, eps: float) -> None:
    base = rows[AA_DEFAULT_BATCH]["images_per_s"]
    table = Table("batch", "images/s", f"ratio vs {AA_DEFAULT_BATCH}", "robust acc", "seconds")
    for size, f in sorted(rows.items()):
        table.add_row(str(size), f"{f['images_per_s']:.2f}", f"{f['images_per_s'] / base:.2f}",
                      f"{f['robust_acc']:.3f}", f"{f['seconds']:.1f}")
    console.print(f"\n[bold]{attack}[/bold] AutoAttack, L-inf eps {eps:.4f}, {n} images")
    console.print(table)


if __name__ == "__main__":
    sys.exit(exit_code(main))
