"""Standard-AutoAttack throughput (images/s) against batch size on the CPU, in one process.

The workload must stay robust, or the cascade stops after APGD-CE and measures nothing: a
small TRADES model is trained on digits first (~20 s), then pyautoattack's ``standard``
cascade (APGD-CE, APGD-T, FAB-T, Square at 5,000 queries) runs on the same test images at
each batch size, through the evaluation suite's own runner. Ratios are against the
evaluation default (`EvalSpec.batch_size`, 500), which covers all images in one batch here.

    python benchmarks/bench_autoattack.py [--n 64] [--batch-sizes 8,16,32,500] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from trades_repro.checkpoints import build_arch, load_state_dict, load_weights
from trades_repro.data import load_splits, to_float
from trades_repro.evaluate import RUNNERS, EvalSettings
from trades_repro.spec import DataSpec, EvalSpec, LandscapeSpec, parse_spec
from trades_repro.train import train

EPS = 0.1
SPEC = {  # the controls' base model (tests/_evalutil.py): robust enough to keep AA busy
    "name": "bench_autoattack", "seed": 0, "device": "cpu",
    "data": {"dataset": "digits", "validation": "test", "crop_padding": 1},
    "model": {"arch": "small_cnn", "width": 16},
    "method": {"beta": 3, "attack": {"eps": EPS, "step_size": EPS / 4, "steps": 5}},
    "optim": {"lr": 0.1, "batch_size": 64, "epochs": 10},
    "validation": {"eps": EPS, "step_size": EPS / 4, "steps": 10},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="test digits to attack")
    parser.add_argument("--batch-sizes", default="8,16,32,500")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = EvalSpec().batch_size
    sizes = sorted({int(b) for b in args.batch_sizes.split(",")} | {default})
    net, x, y = _workload(args.n)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"# standard AutoAttack, L-inf eps {EPS}, {args.n} digits, default batch {default}")
    rates = {size: _throughput(net, x, y, size) for size in sizes}
    print(f"{'batch':>6} {'images/s':>9} {'ratio':>6} {'AA acc':>7} {'seconds':>8}")
    for size, (rate, acc, seconds) in rates.items():
        print(f"{size:>6} {rate:>9.3f} {rate / rates[default][0]:>6.2f} {acc:>7.3f} "
              f"{seconds:>8.1f}")


def _workload(n: int):
    with tempfile.TemporaryDirectory() as runs:
        run = train(parse_spec(SPEC), Path(runs), progress=False).run_dir
        tensors = load_state_dict(run / "best.safetensors")
    net = build_arch(parse_spec(SPEC).model, "digits", (1, 8, 8), 10)
    net = load_weights(net, tensors, run / "best.safetensors", "small_cnn")
    test = load_splits(DataSpec(dataset="digits", validation="test"), 0).test
    return net, to_float(test.images[:n]), test.labels[:n]


def _throughput(net, x, y, batch_size: int) -> tuple[float, float, float]:
    settings = EvalSettings(dataset="digits", n_examples=len(y), eps=EPS, step_size=EPS / 4,
                            steps=10, random_start=True, batch_size=batch_size, seed=0,
                            square_queries=5000, device="cpu", landscape=LandscapeSpec())
    started = time.perf_counter()
    result = RUNNERS["autoattack"](net, x, y, settings)
    seconds = time.perf_counter() - started
    return len(y) / seconds, result.accuracy, seconds


if __name__ == "__main__":
    main()
