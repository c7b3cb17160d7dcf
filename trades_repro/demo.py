"""`trades-repro demo`: the paper's story in three real Fashion-MNIST runs on a CPU (issue 19).

The three runs are seed 0 of each arm of the `cpu` tier (claims/arms.yaml): Table 2's risky
corner (β 1, batch 32, LR 0.05), the same with Algorithm 1, and the safe corner (β 6, batch
128, LR 0.01), at ε = 0.2. They are the same specs, hence the same digests, as the cpu tier and
the sweep, so a runs folder that holds either makes the demo instant, and nothing is picked
after the fact: seed 0 is each arm's first seed. What one seed shows is not a rate; the rates
over seeds are in docs/small_scale.md.

`plan` builds the runs, `execute` trains and evaluates what is not done (through
`runclaim.execute`, so resume, locking and failures behave as in `run-claim`), `summaries`
reads them back, `table` and `plot` show them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trades_repro import smallscale as ss
from trades_repro import smallscale_stats as sst
from trades_repro.claims import Catalogue
from trades_repro.spec import ExperimentSpec

TIER = "cpu"
# (name, arm): the two batch-32 runs first, so with two jobs the shorter batch-128 run goes last.
ARMS = (("risky", "fashion_e0p2_bs32_b1_lr0p05"),
        ("risky + Alg. 1", "fashion_e0p2_bs32_b1_lr0p05_healed"),
        ("safe", "fashion_e0p2_bs128_b6_lr0p01"))


@dataclass(frozen=True)
class DemoRun:
    name: str
    arm: str
    spec: ExperimentSpec


def plan(catalogue: Catalogue, *, download: bool = False) -> list[DemoRun]:
    """Seed 0 of each demo arm; `download` lets torchvision fetch Fashion-MNIST when no copy
    is found (outside the digest: the runs stay the cpu tier's)."""
    runs = []
    for name, arm in ARMS:
        spec = min(catalogue.specs(arm, TIER), key=lambda s: s.seed)
        if download:
            spec = spec.model_copy(update={"data": spec.data.model_copy(
                update={"download": True})})
        runs.append(DemoRun(name, arm, spec))
    return runs


def execute(runs: list[DemoRun], runs_dir: Path, *, executor, report,
            progress: bool) -> list[str]:
    """Train and evaluate what is not done, once Fashion-MNIST is found (or fetched); the
    failures as one line each."""
    from trades_repro import runclaim
    from trades_repro.data import find_fashion_mnist

    planned = [ss.planned(r.spec, r.arm, runs_dir) for r in runs]
    if any(p.state != "done" for p in planned):  # one line now, not three failed runs later
        find_fashion_mnist(runs[0].spec.data)
    failures = runclaim.execute(planned, runs_dir, report=report, progress=progress,
                                executor=executor)
    return [f"{run.digest} failed: {error}" for run, error in failures]


def summaries(runs: list[DemoRun], runs_dir: Path) -> dict[str, sst.RunSummary]:
    """Each finished demo run, read as the study reads its evidence."""
    from trades_repro.verify import Evidence

    evidence = Evidence(runs_dir)
    found = {r.name: sst.summarize(evidence, r.spec) for r in runs}
    return {name: summary for name, summary in found.items() if summary is not None}


def configuration(run: DemoRun) -> str:
    s = run.spec
    extra = (f", Algorithm 1 at FOSC {s.healing.fosc_threshold:g}" if s.healing.enabled
             else "")
    return f"{run.name}: β {s.method.beta:g}, batch {s.optim.batch_size}, LR {s.optim.lr:g}{extra}"


def table(found: dict[str, sst.RunSummary]) -> list[list[str]]:
    """Header and one row per run: accuracies in %, the margin with the paired rule's 95 %
    interval, the paper's rule's verdict, peak FOSC (after epoch 1)."""
    rows = [["run", "clean", "PGD-10", "Square", "margin (95 % CI)", "verdict", "peak FOSC"]]
    for name, r in found.items():
        interval = f" ({100 * r.ci[0]:.1f}–{100 * r.ci[1]:.1f})" if r.ci else ""
        rows.append([name, f"{100 * r.clean:.1f}", f"{100 * r.pgd10:.1f}",
                     f"{100 * r.square:.1f}", f"{100 * r.margin:.1f}{interval}",
                     "flagged" if r.flagged else "not flagged", f"{r.peak_fosc:.2f}"])
    return rows


def text_table(rows: list[list[str]]) -> list[str]:
    """Columns two spaces apart, the first left-aligned and the rest right-aligned: fits 80
    columns, and reads the same in a terminal, a log or CI's output."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


def plot(path: Path, found: dict[str, sst.RunSummary]) -> Path:
    """FOSC and PGD-10 per epoch of the three runs (Figs. 2 and 6 analogue)."""
    from trades_repro.smallscale_report import plot_curves

    path.parent.mkdir(parents=True, exist_ok=True)
    return plot_curves(path, found)
