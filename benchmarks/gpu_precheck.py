"""CPU pre-checks of the real workloads a lent GPU will run (`DRY=1 gpu_session.sh` runs them).

    python benchmarks/gpu_precheck.py [--data-root DIR] [--checks stable,graphs]
        [--steps 5] [--batch 32] [--out-dir DIR]

The DRY rehearsal swaps in small models and switches compile off, so it cannot see a recipe
that diverges or a compile that recompiles. These checks run the session's own specs:

* ``stable``: each spec in `WORKLOADS` (every run the session trains for a figure) takes its
  first `--steps` training steps through the engine, as on the GPU but at batch `--batch`
  (a smaller batch at the same lr is noisier: a recipe stable at it is no less stable at its
  own), with compile off; the losses must be finite and at most 2x the first
  (`common.check_stable`). The fashion ResNet-18 at lr 0.1 failed this by its second step.
* ``graphs``: the smoke test's spec (ResNet-18, every knob, 3-channel 32x32 inputs, batch 64
  and a short last batch of 32, as 4,000 % 64) trains one epoch of 96 images with
  torch.compile on dynamo's ``eager`` backend (the same tracing, guards and recompiles,
  without inductor's code generation); it must compile at most `GRAPHS` graphs.

`bench_train_paths.py` is not here: it trains 8 steps on random labels for throughput, and
its loss is no figure. Exit 0 when every check passes, 1 when one fails; one line each, and
a record (`precheck-cpu-<time>.json`) with the losses and graph counts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_concurrency import spec_for
from common import (
    Diverged,
    check_stable,
    exit_code,
    fashion_resnet,
    first_losses,
    provenance,
    smoke_spec,
    write_record,
)

from trades_repro.spec import ExperimentSpec, parse_spec
from trades_repro.train import train

GRAPHS = 3  # one per mode (train, attack with gradients, no-grad forward), batch symbolic
DATA = Path(".gpu/fashion-mnist")  # gpu_pack.py's head of the set, else the machine's copy


def _fashion(root: Path | None) -> ExperimentSpec:
    return fashion_resnet(device="cpu", root=root)


WORKLOADS: dict[str, Callable[[Path | None], ExperimentSpec]] = {
    # the gate's fp32 run (and its seed-1 twin), which the AutoAttack step also attacks
    "gate_fashion_fp32": _fashion,
    "smoke": lambda root: smoke_spec(device="cpu"),
    "concurrency_resnet18": lambda root: spec_for("resnet18", "cpu", 0),
}


def uncompiled(spec: ExperimentSpec) -> ExperimentSpec:
    """`spec` with compile off: inductor takes minutes on a CPU, and compiling changes
    rounding, not the recipe."""
    raw = spec.model_dump(mode="json")
    raw["performance"]["compile"] = False
    return parse_spec(raw, source=f"{spec.name}, uncompiled")


def stable(name: str, spec: ExperimentSpec, steps: int, batch: int) -> dict:
    """The first `steps` losses of `spec` at `batch` on the CPU; `Diverged` if unstable."""
    losses = first_losses(uncompiled(spec), steps, batch_size=batch)
    check_stable(name, losses)
    return {"losses": losses, "batch": batch}


def smoke_graphs() -> ExperimentSpec:
    """The smoke's spec on the CPU at 96 training images (one batch of 64, one of 32: its
    short last batch) and 32 validation images, one epoch, compile on."""
    raw = smoke_spec(device="cpu").model_dump(mode="json")
    raw["data"]["synthetic"].update(n_train=96, n_test=32)
    raw["optim"]["epochs"] = 1
    return parse_spec(raw, source="gpu_precheck: the smoke's graphs")


def compiled_graphs(spec: ExperimentSpec) -> int:
    """Graphs dynamo compiles while `train` runs `spec`, on its eager backend."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    real = torch.compile
    torch._dynamo.reset()
    counters.clear()
    torch.compile = lambda model, **kw: real(model, backend="eager", **kw)
    try:
        with tempfile.TemporaryDirectory() as runs:
            train(spec, Path(runs), progress=False)
    finally:
        torch.compile = real
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return graphs


def run_checks(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[dict, bool]:
    """Every check asked for; its figures and whether all passed."""
    figures: dict = {}
    ok = True
    if "stable" in args.checks:
        for name, build in WORKLOADS.items():
            started = time.perf_counter()
            try:
                figures[name] = stable(name, build(args.data_root), args.steps, args.batch)
                say(f"stable {name}: ok, losses {_shown(figures[name]['losses'])} "
                    f"({time.perf_counter() - started:.0f} s)")
            except Diverged as err:
                figures[name], ok = {"diverged": str(err)}, False
                say(f"stable {name}: FAILED: {err}")
    if "graphs" in args.checks:
        graphs = compiled_graphs(smoke_graphs())
        figures["smoke_graphs"] = {"graphs": graphs, "allowed": GRAPHS}
        passed = 0 < graphs <= GRAPHS
        ok &= passed
        say(f"graphs smoke: {'ok' if passed else 'FAILED'}, {graphs} compiled "
            f"(at most {GRAPHS}: one per mode, the batch symbolic)")
    return figures, ok


def _shown(losses: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in losses)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None,
                        help="Fashion-MNIST's IDX folder (default: .gpu/fashion-mnist if "
                        "there, else the spec's)")
    parser.add_argument("--checks", default="stable,graphs")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    args.checks = [c for c in args.checks.split(",") if c]
    if set(args.checks) - {"stable", "graphs"}:
        parser.error(f"--checks: of stable, graphs; got {args.checks}")
    if args.data_root is None and DATA.is_dir():
        args.data_root = DATA
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    record = provenance(torch.device("cpu"), {"checks": args.checks, "steps": args.steps,
                                              "batch": args.batch})
    figures, ok = run_checks(args, lambda line: print(line, flush=True))
    path = write_record("precheck", {**record, "figures": figures, "passed": ok},
                        **({"out_dir": args.out_dir} if args.out_dir else {}))
    print(f"pre-checks {'passed' if ok else 'FAILED'}; record: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(exit_code(main))
