"""AutoAttack throughput (images/s) against batch size: standard cascade and Square alone.

    python benchmarks/bench_autoattack.py [--quick] [--n 64] [--batch-sizes 8,16,32,64]
        [--threads 1] [--device cpu|cuda]

The workload must stay robust, or the cascade stops after APGD-CE and measures nothing: a
small TRADES model is trained on digits first (~20 s on a CPU), then pyautoattack's
``standard`` cascade (APGD-CE, APGD-T, FAB-T, Square at 5,000 queries) and Square alone (the
masking verdict's second attack) run on the same test images at each batch size, called the
way `trades_repro.evaluate` calls them (`device=` and `eps=` explicit). Ratios are against
AutoAttack's own default batch (250 in `run_standard_evaluation`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import header, provenance, write_record
from rich.console import Console
from rich.table import Table

from trades_repro.checkpoints import build_arch, load_state_dict, load_weights
from trades_repro.data import load_splits, to_float
from trades_repro.spec import DataSpec, parse_spec
from trades_repro.train import train

EPS = 0.1
AA_DEFAULT_BATCH = 250  # pyautoattack's run_standard_evaluation default
SPEC = {  # the controls' base model (tests/_evalutil.py): robust enough to keep AA busy
    "name": "bench_autoattack", "seed": 0, "device": "cpu",
    "data": {"dataset": "digits", "validation": "test", "crop_padding": 1},
    "model": {"arch": "small_cnn", "width": 16},
    "method": {"beta": 3, "attack": {"eps": EPS, "step_size": EPS / 4, "steps": 5}},
    "optim": {"lr": 0.1, "batch_size": 64, "epochs": 10},
    "validation": {"eps": EPS, "step_size": EPS / 4, "steps": 10},
}


def workload(n: int, epochs: int):
    raw = {**SPEC, "optim": {**SPEC["optim"], "epochs": epochs}}
    with tempfile.TemporaryDirectory() as runs:
        run = train(parse_spec(raw), Path(runs), progress=False).run_dir
        tensors = load_state_dict(run / "best.safetensors")
    net = build_arch(parse_spec(raw).model, "digits", (1, 8, 8), 10)
    net = load_weights(net, tensors, run / "best.safetensors", "small_cnn").eval()
    test = load_splits(DataSpec(dataset="digits", validation="test"), 0).test
    return net, to_float(test.images[:n]), test.labels[:n]


def throughput(net, x, y, batch_size: int, attack: str, device: str) -> dict[str, float]:
    from pyautoattack import AutoAttack

    adversary = AutoAttack(net, device=device, eps=EPS, seed=0, version="standard")
    adversary.verbose = False
    if attack == "square":
        adversary.attacks_to_run = ["square"]
    started = time.perf_counter()
    _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    seconds = time.perf_counter() - started
    robust = (y_adv.cpu() == y.cpu()).float().mean().item()
    return {"images_per_s": len(y) / seconds, "seconds": seconds, "robust_acc": robust}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 digits, 3 batch sizes")
    parser.add_argument("--n", type=int, default=64, help="test digits to attack")
    parser.add_argument("--batch-sizes", default="8,16,32,64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    n, epochs, sizes = args.n, 10, {int(b) for b in args.batch_sizes.split(",")}
    if args.quick:
        n, epochs, sizes = 16, 5, {4, 16}
    sizes = sorted(sizes | {AA_DEFAULT_BATCH})
    torch.set_num_threads(args.threads)
    console = Console(width=110)
    record = provenance(torch.device(args.device), {"threads": args.threads, "n": n,
                                                    "eps": EPS, "train_epochs": epochs})
    header(console, record)
    net, x, y = workload(n, epochs)
    figures: dict[str, dict[int, dict]] = {}
    for attack in ("standard", "square"):
        figures[attack] = {b: throughput(net, x, y, b, attack, args.device) for b in sizes}
        _table(console, attack, figures[attack], n)
    record["figures"] = {a: {str(b): f for b, f in v.items()} for a, v in figures.items()}
    best = max(figures["standard"], key=lambda b: figures["standard"][b]["images_per_s"])
    record["fastest_standard_batch"] = best
    path = write_record("autoattack", record, **({"out_dir": args.out_dir} if args.out_dir
                                                  else {}))
    console.print(f"fastest standard batch here: {best}; record: {path}")
    return record


def _table(console: Console, attack: str, rows: dict[int, dict], n: int) -> None:
    base = rows[AA_DEFAULT_BATCH]["images_per_s"]
    table = Table("batch", "images/s", f"ratio vs {AA_DEFAULT_BATCH}", "robust acc", "seconds")
    for size, f in rows.items():
        table.add_row(str(size), f"{f['images_per_s']:.2f}", f"{f['images_per_s'] / base:.2f}",
                      f"{f['robust_acc']:.3f}", f"{f['seconds']:.1f}")
    console.print(f"\n[bold]{attack}[/bold] AutoAttack, L-inf eps {EPS}, {n} digits")
    console.print(table)


if __name__ == "__main__":
    main()
