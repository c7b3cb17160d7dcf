"""Validation monitor overhead: per-epoch PGD-10 + FOSC + SGCS as a share of an epoch.

    python benchmarks/bench_monitor.py [--quick] [--spec spec/fashion_mnist.yaml]
        [--epochs N] [--threads N]

Trains the spec's run (in a temporary folder) for `--epochs` epochs and times, per epoch,
the training pass (`train.train_epoch`) and validation (`train.validate`) twice on the same
weights: as the spec monitors (PGD-10 with the gradient trace, FOSC and SGCS) and with
FOSC/SGCS off (PGD-10 alone, which model selection needs anyway). The two validation
orders alternate between epochs. Shares are medians over epochs of

* monitor share = validation / (training + validation): what the whole per-epoch check costs;
* FOSC + SGCS share = (validation − PGD-10 alone) / (training + validation).

It also trains a twin run with App. G's per-step metrics on (`monitor.batch_metrics`), the
two taking turns each epoch, and reports App. G's price as the ratio of its training epoch
to the plain one's (what `runclaim.APP_G_COST` prices), and whether the twin's weights stayed
bit-identical to the plain run's (monitoring must not change training).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, exit_code, header, provenance, summary, write_record
from rich.console import Console
from rich.table import Table

from trades_repro.engine import build_session
from trades_repro.spec import load_spec
from trades_repro.train import train_epoch, validate


def measure(spec_path: Path, epochs: int) -> tuple[dict[str, list[float]], bool]:
    """Seconds per epoch of each part, and whether the App. G twin stayed bit-identical."""
    spec = load_spec(spec_path)
    plain = spec.model_copy(update={"monitor": spec.monitor.model_copy(
        update={"fosc": False, "sgcs": False})})
    app_g = spec.model_copy(update={"monitor": spec.monitor.model_copy(
        update={"batch_metrics": True})})
    times: dict[str, list[float]] = {"train": [], "train_app_g": [], "monitored": [],
                                     "pgd10_only": []}
    with tempfile.TemporaryDirectory() as runs:
        session = build_session(spec, Path(runs) / "run")
        twin = build_session(app_g, Path(runs) / "app_g")
        for epoch in range(1, epochs + 1):
            trains = [("train", session), ("train_app_g", twin)]
            for name, s in trains if epoch % 2 else trains[::-1]:
                times[name].append(_timed(lambda s=s, e=epoch: train_epoch(s, e)))
            order = [("monitored", spec), ("pgd10_only", plain)]
            for name, s in order if epoch % 2 else order[::-1]:
                times[name].append(_timed(lambda s=s, e=epoch: validate(
                    session.model, session.splits.val, s, session.device, e)))
        identical = all(torch.equal(a, b) for a, b in zip(
            session.model.state_dict().values(), twin.model.state_dict().values(), strict=True))
    return times, identical


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def shares(times: dict[str, list[float]]) -> dict[str, list[float]]:
    epoch = [t + v for t, v in zip(times["train"], times["monitored"], strict=True)]
    return {
        "monitor_share": [v / e for v, e in zip(times["monitored"], epoch, strict=True)],
        "fosc_sgcs_share": [(v - p) / e for v, p, e in
                            zip(times["monitored"], times["pgd10_only"], epoch, strict=True)],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one epoch")
    parser.add_argument("--spec", type=Path, default=ROOT / "spec" / "fashion_mnist.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    torch.set_num_threads(args.threads)
    console = Console(width=110)
    record = provenance(torch.device("cpu"), {"threads": args.threads, "epochs": epochs,
                                              "spec": str(args.spec)})
    header(console, record)
    times, identical = measure(args.spec, epochs)
    share = shares(times)
    app_g = [m / t for m, t in zip(times["train_app_g"], times["train"], strict=True)]
    spec = load_spec(args.spec)
    table = Table("per epoch (median)", "seconds", "share of epoch")
    epoch_s = statistics.median(t + v for t, v in zip(times["train"], times["monitored"],
                                                     strict=True))
    for name in ("train", "train_app_g", "monitored", "pgd10_only"):
        seconds = statistics.median(times[name])
        table.add_row(name, f"{seconds:.2f}", f"{seconds / epoch_s:.3f}")
    console.print(f"\n{args.spec.name}: {spec.data.train_subset} training images, "
                  f"{spec.data.val_size} validation images, {epochs} epoch(s)")
    console.print(table)
    console.print(f"monitor (PGD-10 + FOSC + SGCS) share: "
                  f"{statistics.median(share['monitor_share']):.3f}; FOSC + SGCS beyond "
                  f"PGD-10: {statistics.median(share['fosc_sgcs_share']):.3f}")
    console.print(f"App. G per-step metrics: training epoch {statistics.median(app_g):.2f}x "
                  f"the plain one; weights bit-identical to the plain run: {identical}")
    record["figures"] = {"seconds": {k: summary(v) for k, v in times.items()},
                         **{k: summary(v) for k, v in share.items()},
                         "app_g_train_ratio": summary(app_g), "app_g_identical": identical}
    path = write_record("monitor", record, **({"out_dir": args.out_dir} if args.out_dir
                                               else {}))
    console.print(f"record: {path}")
    return record


if __name__ == "__main__":
    sys.exit(exit_code(main))
