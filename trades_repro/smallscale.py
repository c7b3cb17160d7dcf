"""Issue 19's small-scale study: TRADES overestimation on Fashion-MNIST and digits on a CPU.

Three steps, each resumable and each reading only what the one before left:

* `run_sweeps`: expand sweep files (`spec/sweeps/fashion_*.yaml`, `digits_*.yaml`) and train
  + evaluate their runs one at a time with `run-claim`'s executor (`runclaim.execute`:
  finished runs skipped, partial ones resumed), each next run chosen from what the runs so
  far show (`next_spec`): every cell's first seed, then more seeds where a run was flagged.
* `export`: copy each finished, evaluated run's evidence without weights (`spec.json`,
  `provenance.json`, `metrics.jsonl`, `eval.json`) to ``evidence/cpu/<digest>/``, where
  `verify --tier cpu --runs-dir evidence/cpu` and the report read it.
* `smallscale_stats.load_runs` and `smallscale_report.write_report`: per-run numbers,
  per-cell tables, the paper's directions, FOSC's separation and Algorithm 1, from the
  evidence alone.

A run is *flagged* by the paper's rule (`pgd10_minus_square_v1`, PGD-10 − Square ≥ 0.08) on
the checkpoint its policy selects: best PGD-10 (App. B); with Algorithm 1, the best PGD-10
checkpoint whose FOSC stayed under the threshold (Alg. 1, lines 17-18).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from trades_repro import store
from trades_repro.errors import BadInput
from trades_repro.smallscale_stats import PROBE_QUERIES, load_runs, policies_of
from trades_repro.spec import ExperimentSpec, SpecError
from trades_repro.sweep import load_sweep

Report = Callable[[str], None]
EVIDENCE_FILES = (store.SPEC_FILE, store.PROVENANCE_FILE, store.METRICS_FILE, store.EVAL_FILE)
OPTIONAL_EVIDENCE = (store.BATCHES_FILE,)  # App. G's steps, where the run monitored them


# ----------------------------------------------------------------------------- running


def ordered(specs: Iterable[ExperimentSpec]) -> list[ExperimentSpec]:
    """Seed-major, then the paper's risk order within a seed (smaller batch, smaller β,
    larger LR first: Table 2's directions), so a stopped sweep has seen every cell early."""
    return sorted(specs, key=lambda s: (s.seed, s.optim.batch_size, s.method.beta,
                                        -s.optim.lr))


def sweep_specs(files: Iterable[Path]) -> list[ExperimentSpec]:
    """Every run of the sweep files, file by file in the order given, each file ordered."""
    return [spec for path in files for spec in ordered(load_sweep(_existing(path))[1])]


def _existing(path: Path) -> Path:
    """The path, if a file is there: `load_sweep` calls a missing one "not a sweep file"."""
    if Path(path).is_dir():
        raise SpecError(f"{path}: a directory, not a sweep file")
    if not Path(path).exists():
        raise SpecError(f"{path}: sweep file not found")
    return path


def rekey(runs_dir: Path, report: Report = lambda line: None) -> int:
    """Rename finished run folders whose name is not their spec's current digest (a digest
    definition changed under a long sweep); returns how many were renamed."""
    from trades_repro.spec import parse_spec

    moved = 0
    for spec_file in sorted(runs_dir.glob(f"*/{store.SPEC_FILE}")):
        folder = spec_file.parent
        if not store.is_finished(folder):
            continue
        digest = parse_spec(store.read_json(spec_file)).digest()
        if digest != folder.name and not (runs_dir / digest).exists():
            try:
                folder.rename(runs_dir / digest)
            except OSError:  # another shard renamed it first
                continue
            report(f"renamed {folder.name} -> {digest}")
            moved += 1
    return moved


def run_sweeps(files: list[Path], runs_dir: Path, *, shard: tuple[int, int] = (0, 1),
               report: Report = lambda line: None, retry_failed: bool = False) -> list[str]:
    """Train and evaluate shard `k` of `n` of the sweeps' runs (runs that failed before only
    with `retry_failed`); returns the failures."""
    from trades_repro.runclaim import execute

    k, n = shard
    specs = [s for i, s in enumerate(sweep_specs(files)) if i % n == k]
    rekey(runs_dir, report)
    report(f"shard {k}/{n}: {len(specs)} runs, {len(specs) - len(queue(specs, runs_dir))} done")
    failures, tried = [], set()
    while (spec := next_spec(specs, runs_dir, tried)) is not None:
        tried.add(spec.digest())
        failures += execute([planned(spec, cell_label(spec), runs_dir)], runs_dir,
                            report=report, progress=False, retry_failed=retry_failed)
    return [f"{run.digest}: {error}" for run, error in failures]


# What `next_spec` runs first to last (`queue`'s tiers)
TIERS = ("first seeds of cells", "further seeds of flagged cells or Algorithm 1 on flagged runs",
         "further seeds of other cells", "Algorithm 1 on unflagged runs")


def next_spec(specs: list[ExperimentSpec], runs_dir: Path,
              skip: set[str] = frozenset()) -> ExperimentSpec | None:
    """The run to do next, read afresh from `runs_dir` each time (so a second launch on the
    same files sees what the first found): the first of `queue`. None when every run is
    done or in `skip`."""
    pending = queue(specs, runs_dir, skip)
    return pending[0][2] if pending else None


def queue(specs: list[ExperimentSpec], runs_dir: Path, skip: set[str] = frozenset()
          ) -> list[tuple[int, str, ExperimentSpec]]:
    """(tier, state, spec) of every run not done nor in `skip`, in the order to run them.
    Tiers (`TIERS`): every cell's first seed; the further seeds of cells with a flagged run
    (the issue asks for at least three there) and Algorithm 1 on the runs flagged without
    it; the other seeds; Algorithm 1 on unflagged runs. Within a tier, the sweep's order."""
    from trades_repro.runclaim import run_state

    done = load_runs(runs_dir) if runs_dir.is_dir() else []
    flagged_cells = {r.cell for r in done if r.flagged and not r.healed}
    flagged_runs = {(r.cell, r.seed) for r in done if r.flagged and not r.healed}
    first_seed: dict[tuple, int] = {}
    for spec in specs:
        first_seed[cell_of(spec)] = min(spec.seed, first_seed.get(cell_of(spec), spec.seed))

    def tier(spec: ExperimentSpec) -> int:
        if spec.healing.enabled:
            return 1 if (cell_of(spec, healed=False), spec.seed) in flagged_runs else 3
        if spec.seed == first_seed[cell_of(spec)]:
            return 0
        return 1 if cell_of(spec) in flagged_cells else 2

    states = [(i, s, run_state(s, runs_dir, policies_of(s))) for i, s in enumerate(specs)
              if s.digest() not in skip]
    ranked = sorted((tier(s), i, state, s) for i, s, state in states if state != "done")
    return [(t, state, s) for t, _, state, s in ranked]


def cell_of(spec: ExperimentSpec, healed: bool | None = None) -> tuple:
    """The spec's study cell, as `RunSummary.cell` names it (its twin's with `healed`)."""
    return (spec.data.dataset, spec.method.attack.eps,
            spec.healing.enabled if healed is None else healed,
            spec.optim.batch_size, spec.method.beta, spec.optim.lr)


def planned(spec: ExperimentSpec, label: str, runs_dir: Path):
    """The spec as a `runclaim.PlannedRun` under `label`, read at its study policies, with
    its state in `runs_dir`."""
    from trades_repro.runclaim import PlannedRun, assess

    policies = policies_of(spec)
    state, elsewhere = assess(spec, runs_dir, policies)  # who has it, when another launch does
    return PlannedRun(spec, (label,), state, policies, elsewhere)


def progress(files: list[Path], runs_dir: Path) -> list[tuple[Path, dict[str, int]]]:
    """Per sweep file, how many of its runs are in each state (done, evaluate, resume,
    train, failed), read from `runs_dir` without running anything."""
    rows = []
    for path in files:
        counts: dict[str, int] = {}
        for spec in sweep_specs([path]):
            state = planned(spec, "", runs_dir).state
            counts[state] = counts.get(state, 0) + 1
        rows.append((path, counts))
    return rows


def probe_square(files: list[Path], runs_dir: Path, *, queries: int = PROBE_QUERIES,
                 shard: tuple[int, int] = (0, 1),
                 report: Report = lambda line: None) -> tuple[int, int]:
    """Square alone at `queries` on every finished, evaluated run of the sweeps (shard `k`
    of `n`), as a record of its own beside the run's Square-5000 one; returns how many runs
    were probed now, and how many had been probed before (skipped)."""
    from trades_repro.diagnose import evaluate_run
    from trades_repro.evalfile import EvalFileBusy
    from trades_repro.runclaim import run_state

    k, n = shard
    probed = already = 0
    for i, spec in enumerate(sweep_specs(files)):
        if i % n != k or run_state(spec, runs_dir, policies_of(spec)) != "done":
            continue
        run_dir = store.run_dir_for(spec, runs_dir)
        if _probed(run_dir, spec, queries):
            already += 1
            continue
        report(f"Square-{queries}: {cell_label(spec)} seed {spec.seed}")
        try:
            evaluate_run(run_dir, attacks=("square",), square_queries=queries,
                         policies=policies_of(spec))
        except EvalFileBusy as busy:  # a second probe at once shares the work, as sweeps do
            report(f"  being evaluated by {busy.holder}; left to it")
            continue
        probed += 1
    return probed, already


def _probed(run_dir: Path, spec: ExperimentSpec, queries: int) -> bool:
    """Whether each study policy's checkpoint has a finished Square record at `queries`
    made as `evaluate_run` would make it now (`evalfile.made_with`: the spec's images, the
    pinned fp32)."""
    from trades_repro.evalfile import made_with, read_eval

    evals = read_eval(run_dir / store.EVAL_FILE)
    records = [] if evals is None else list(evals.checkpoints.values())
    probe = spec.evaluation.model_copy(update={"square_queries": queries})
    return all(any(p in r.policies and "square" in r.attacks and made_with(r, probe)
                   for r in records)
               for p in policies_of(spec))


def cell_label(spec: ExperimentSpec) -> str:
    heal = ", Alg. 1" if spec.healing.enabled else ""
    return (f"{spec.data.dataset} eps {spec.method.attack.eps:g} beta {spec.method.beta:g} "
            f"bs {spec.optim.batch_size} lr {spec.optim.lr:g}{heal}")


def export(runs_dir: Path, evidence_dir: Path) -> int:
    """Copy each finished run with a complete evaluation (no weights; App. G's step records
    where it has them) to evidence_dir/<digest>/, named by its spec's current digest;
    returns how many runs were copied or refreshed."""
    from trades_repro.evalfile import read_eval
    from trades_repro.verify import Evidence

    copied = 0
    for digest, folder in Evidence(runs_dir).index().items():
        evals = read_eval(folder / store.EVAL_FILE)
        if evals is None or not any(r.complete for r in evals.checkpoints.values()):
            continue  # not evaluated yet, or an evaluation still under way
        target = evidence_dir / digest
        if target.exists() and not target.is_dir():
            raise BadInput(f"{target} is a file, not a run's evidence folder: move it aside")
        target.mkdir(parents=True, exist_ok=True)
        for name in EVIDENCE_FILES + OPTIONAL_EVIDENCE:
            source = folder / name
            if source.exists() and _newer(source, target / name):
                store.atomic_write_bytes(target / name, source.read_bytes())  # never torn
                copied += name == store.EVAL_FILE
    return copied


def _newer(source: Path, target: Path) -> bool:
    return not target.exists() or source.read_bytes() != target.read_bytes()
