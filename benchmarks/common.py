"""What every benchmark shares: its header, its JSON record, and the median of ratios.

A record (`benchmarks/results/<name>-<device>-<UTC time>.json`) holds the command, the
device, versions, git state, backend flags, the load on the cores, and the figures: a figure
without the machine it ran on is not a figure.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import shlex
import statistics
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from trades_repro import numerics, store
from trades_repro.awp import awp_active
from trades_repro.engine import build_session
from trades_repro.spec import ExperimentSpec, parse_spec
from trades_repro.steps import train_step
from trades_repro.store import cpu_features, cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({os.cpu_count()} cores)"


def load_average() -> list[float]:
    """Other processes on the cores distort absolute numbers; ratios in one process less so."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def provenance(device: torch.device, flags: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": f"python {shlex.join(sys.argv)}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_description": device_name(device),
        "load_average_start": load_average(),
        **(cpu_features() if device.type == "cpu" else {}),
        "flags": flags,
        **store.environment(device),
        **store.git_state(),
    }


def header(console: Console, record: dict[str, Any]) -> None:
    console.print(f"command: {record['command']}")
    units = (f", {record['cpu_capability']}, {' '.join(record['cpu_flags']) or 'no avx'}"
             if "cpu_capability" in record else "")
    console.print(f"device: {record['device_description']}{units}; torch {record['torch']} "
                  f"({record['torch_threads']} threads); load average "
                  f"{record['load_average_start']}; git {str(record['git_sha'])[:8]}"
                  f"{' (dirty)' if record['git_dirty'] else ''}")


def write_record(name: str, record: dict[str, Any], out_dir: Path = RESULTS, *,
                 path: Path | None = None) -> Path:
    """Write `record` (with its end load average) as JSON, atomically; returns the path.

    `path` rewrites an earlier record in place (a benchmark that saves after every step).
    """
    record = {**record, "load_average_end": load_average()}
    if path is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}-{record['device'].split(':')[0]}-{stamp}.json"
    store.atomic_write_json(path, record)
    return path


def cifar_shaped(*, device: str, seed: int = 0, n_train: int = 5632, val_size: int = 512,
                 batch_size: int = 128, epochs: int = 2, **sections: Any) -> ExperimentSpec:
    """spec/cifar100_default.yaml's ResNet-18 and TPGD-10 on CIFAR-shaped synthetic data.

    32x32x3 images of 10 classes (a class is a fixed random-pixel prototype), `val_size` of
    the `n_train` held out for validation. lr 0.01 and no crop/flip: at the default 0.1 this
    set's loss diverges within an epoch (NaN on an H200, 2026-11-27), and shifted crops blur
    the prototypes. `sections` replace whole fields of the spec (`name=`, `model=`).
    """
    raw = yaml.safe_load((ROOT / "spec" / "cifar100_default.yaml").read_text())
    raw.update(name="cifar_shaped_resnet18", seed=seed, device=device)
    raw["data"] = {"dataset": "synthetic", "validation": "holdout", "val_size": val_size,
                   "augment": False,
                   "synthetic": {"n_train": n_train, "n_test": val_size, "num_classes": 10,
                                 "channels": 3, "image_size": 32}}
    raw["optim"] = {**raw["optim"], "lr": 0.01, "batch_size": batch_size, "epochs": epochs}
    raw.update(sections)
    return parse_spec(raw, source="benchmarks/common.py: cifar_shaped")


EVERY_KNOB = {"precision": "bf16", "channels_last": True, "compile": True, "tf32": True,
              "cudnn_benchmark": True}
SMOKE = {  # tests/test_gpu.py's run: CIFAR-shaped synthetic ResNet-18 with every knob
    "name": "gpu_smoke", "seed": 0, "device": "cuda",
    # no crop/flip: a class here is a fixed random-pixel prototype, which shifted crops blur
    "data": {"dataset": "synthetic", "validation": "test", "augment": False,
             "synthetic": {"n_train": 4000, "n_test": 500, "num_classes": 10, "channels": 3,
                           "image_size": 32}},
    "model": {"arch": "resnet18"},
    "method": {"beta": 6, "attack": {"eps": "8/255", "step_size": "2/255", "steps": 10}},
    # lr 0.01: at the paper's 0.1 (batch 128-256) this synthetic set's loss diverges within
    # an epoch (measured: 2.4, 3.6, 6.7, 9.5 over the first four steps; NaN on an H200).
    # Batch 64: enough steps in 2 epochs to leave chance accuracy (small CNN on a CPU, 1,000
    # images: clean 0.10 at batch 256, 0.92 at batch 64), and a short last batch (4000 % 64)
    "optim": {"lr": 0.01, "batch_size": 64, "epochs": 2},
    "validation": {"eps": "8/255", "step_size": "2/255", "steps": 10},
    "performance": EVERY_KNOB,
    # Square at 100 queries, not 5,000: the smoke checks that the path runs on the GPU, not
    # the number (5,000 on 500 images took minutes of its time box)
    "evaluation": {"n_examples": 500, "attacks": ["pgd10", "square"], "square_queries": 100},
}


def smoke_spec(*, device: str = "cuda") -> ExperimentSpec:
    """`SMOKE` as a spec on `device`."""
    return parse_spec({**SMOKE, "device": device}, source="benchmarks/common.py: SMOKE")


def fashion_resnet(*, device: str, epochs: int = 3, quick: bool = False,
                   root: Path | None = None) -> ExperimentSpec:
    """spec/fashion_mnist.yaml (real images, ε 0.1) with ResNet-18 on 4,096 training images;
    with `quick`, the spec's own small CNN on 1,024. `root`: the IDX files' folder (a lent
    GPU gets the head of the set from `gpu_pack.py`). The gate and the AutoAttack benchmark
    share it, so in one runs folder the second finds the first's fp32 run trained."""
    raw = yaml.safe_load((ROOT / "spec" / "fashion_mnist.yaml").read_text())
    raw.update(name="fashion_resnet18", device=device)
    raw["data"] = {**raw["data"], "train_subset": 1024 if quick else 4096,
                   **({"root": str(root)} if root else {})}
    raw["optim"] = {**raw["optim"], "epochs": epochs}
    if not quick:
        raw["model"] = {"arch": "resnet18"}
        # lr 0.01: at the spec's 0.1 ResNet-18's loss here went 2.51, 3.82, 10.7, 15.1, NaN
        # over the first five steps (CPU, fp32; official TRADES' loop alike: the recipe
        # diverges); at 0.01 2.51, 2.27, 2.25, 2.12, 2.04 (2026-11-28)
        raw["optim"]["lr"] = 0.01
    return parse_spec(raw, source="benchmarks/common.py: fashion_resnet")


class Diverged(RuntimeError):
    """A workload's training loss is not finite, or explodes, within its first steps: its
    recipe is unstable, so no figure can come of it (exit `DIVERGED`)."""


DIVERGED = 3  # a script's status for a workload that diverged: undecided, as the gate's 3
EXPLODING = 2.0  # a first-steps loss above 2x the first one: the fashion ResNet-18 at lr 0.1
# reached 1.5x, 4.3x, 6.0x, NaN; stable recipes stay below 1.1x (see `fashion_resnet`)


def first_losses(spec: ExperimentSpec, steps: int = 5, *,
                 batch_size: int | None = None) -> list[float]:
    """The training loss of `spec`'s first `steps` steps, taken as `train` takes them (same
    seed, batches, engine and numerics) in a scratch folder, on the spec's device.

    `batch_size` overrides the spec's (a CPU stand-in for a GPU's batch: a smaller batch at
    the same lr is noisier, so a recipe that holds at it is no less stable at the spec's).
    """
    raw = spec.model_dump(mode="json")
    if batch_size is not None:
        raw["optim"]["batch_size"] = batch_size
    spec = parse_spec(raw, source=f"{spec.name}: first {steps} steps")
    with tempfile.TemporaryDirectory() as scratch:
        session = build_session(spec, Path(scratch) / "probe")
        awp = session.awp if spec.method.name == "trades_awp" and awp_active(
            1, spec.method.awp.warmup) else None
        with numerics.training(spec.performance):
            return [float(train_step(session.model, session.optimizer, session.prepare(x), y,
                                     spec, session.attack_gen, awp).loss)
                    for x, y in itertools.islice(session.batches(), steps)]


PROBE_STEPS = 5  # the fashion ResNet-18 at lr 0.1 was NaN by its 5th step, 4.3x by its 3rd


def probe(name: str, spec: ExperimentSpec, steps: int = PROBE_STEPS) -> list[float]:
    """`spec`'s first `steps` losses on its own device, `Diverged` if they are unstable: a
    benchmark runs it before training, so a diverging recipe costs seconds and one line, not
    an epoch (which is when `train` notices a non-finite loss) or the step's time box."""
    losses = first_losses(spec, steps)
    check_stable(name, losses)
    return losses


def check_stable(name: str, losses: list[float], factor: float = EXPLODING) -> None:
    """`Diverged` (one line, naming `name` and the losses) unless every loss is finite and at
    most `factor` times the first."""
    if all(math.isfinite(v) for v in losses) and max(losses) <= factor * losses[0]:
        return
    shown = ", ".join(f"{v:.3g}" for v in losses)
    raise Diverged(f"{name}: the training loss diverged in its first {len(losses)} steps "
                   f"({shown}; finite and at most {factor:g}x the first wanted): its recipe "
                   "is unstable, so it gives no figure")


OWN_FAILURE = 4  # the project's code for our own failure (0 ok, 1 failed, 2 bad, 3 undecided)


def exit_code(main, argv: list[str] | None = None) -> int:
    """`main(argv)`'s status; an unexpected error is our own failure (4), never 0 or 1,
    which a script gives its own meaning to (the gate: a knob failed). Argparse's 2 stays.
    A `main` that returns its record rather than a status ran to the end: 0."""
    try:
        status = main(argv)
        return status if isinstance(status, int) else 0
    except Exception:
        traceback.print_exc()
        print(f"{Path(sys.argv[0]).name}: our own failure (traceback above), exit 4",
              file=sys.stderr)
        return OWN_FAILURE


def summary(values: list[float]) -> dict[str, float]:
    """Median and range of per-round figures (the median is what tables show)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
