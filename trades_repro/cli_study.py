"""`trades-repro study sweep`, `probe` and `report`: the CPU study of when TRADES
overestimates robustness (docs/small_scale.md). Registered on `cli.app`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, get_args

import typer

from trades_repro.cli import (
    RunsDir,
    _exit_if_failed,
    _file_option,
    _folder_option,
    _progress,
    _set_threads,
    _user_errors,
    app,
)
from trades_repro.errors import BadInput, Inconclusive
from trades_repro.spec import MAX_SQUARE_QUERIES

study_app = typer.Typer(help="The CPU study of when TRADES overestimates robustness "
                        "(docs/small_scale.md).", no_args_is_help=True)
app.add_typer(study_app, name="study")


ShardOption = Annotated[str, typer.Option(
    help="K/N: every N-th run from the K-th (0-based), for N processes side by side.")]


@study_app.command("sweep")
@_user_errors
def study_sweep(
    sweeps: Annotated[list[Path], typer.Argument(help="Sweep files, run in this order.")],
    runs_dir: RunsDir = Path("runs"),
    shard: ShardOption = "0/1",
    dry_run: Annotated[bool, typer.Option(
        help="Print each file's runs by state (done, to evaluate, resume or train, failed); "
        "run nothing.")] = False,
    retry_failed: Annotated[bool, typer.Option(
        help="Train again the runs that failed before (failed.json).")] = False,
) -> None:
    """Train and evaluate the sweeps' runs (finished skipped, partial resumed).

    Exit 1 when a run failed. Each next run is every cell's first seed, then the further
    seeds of cells with a flagged run, then the rest; a second launch on the same files
    shares the work."""
    from trades_repro import smallscale as ss
    from trades_repro.runclaim import State  # its run states, in order; imports torch

    _folder_option("--runs-dir", runs_dir, writes=not dry_run)
    k_of_n = _shard(shard)  # refused in a dry run too, as the real run would
    if dry_run and k_of_n != (0, 1):  # it would show every shard's runs as this one's
        raise BadInput(f"--shard {shard} with --dry-run: the dry run shows every run of the "
                       "sweeps; leave --shard to the launches")
    if dry_run:
        for path, counts in ss.progress(sweeps, runs_dir):
            states = ", ".join(f"{counts[k]} {k}" for k in get_args(State) if counts.get(k))
            typer.echo(f"{path}: {sum(counts.values())} runs: {states}")
        pending = [(t, spec) for t, state, spec in ss.queue(ss.sweep_specs(sweeps), runs_dir)
                   if state != "failed"]
        tiers = [f"{n} {name}" for k, name in enumerate(ss.TIERS)
                 if (n := sum(t == k for t, _ in pending))]
        if pending:
            first = pending[0][1]
            typer.echo(f"to run, in this order: {'; '.join(tiers)}. Next: "
                       f"{ss.cell_label(first)}, seed {first.seed}")
        return
    _set_threads(None, None)
    _exit_if_failed(ss.run_sweeps(sweeps, runs_dir, shard=k_of_n,
                                  report=_progress(False), retry_failed=retry_failed))


def _shard(shard: str) -> tuple[int, int]:
    try:
        k, n = (int(part) for part in shard.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise BadInput(f"--shard {shard!r}: expected K/N with 0 <= K < N")
    return k, n


@study_app.command("probe")
@_user_errors
def study_probe(
    sweeps: Annotated[list[Path], typer.Argument(help="Sweep files.")],
    runs_dir: RunsDir = Path("runs"),
    square_queries: Annotated[int, typer.Option(help="Square's query budget of the probe.")]
    = 1000,
    shard: ShardOption = "0/1",
) -> None:
    """Square alone at another query budget on every finished, evaluated run of the sweeps.

    Kept as a record of its own (the report's Square-1000 columns)."""
    from trades_repro.smallscale import probe_square, sweep_specs

    if not 1 <= square_queries <= MAX_SQUARE_QUERIES:  # the spec's own bound, named here
        raise BadInput(f"--square-queries {square_queries}: must be from 1 to "
                       f"{MAX_SQUARE_QUERIES:,}")
    _folder_option("--runs-dir", runs_dir, writes=False)
    sweep_specs(sweeps)  # a bad sweep file is named before the folder
    if not runs_dir.is_dir():  # a mistyped folder probed nothing and exited 0
        raise BadInput(f"--runs-dir {runs_dir}: not a folder")
    _set_threads(None, None)
    n, before = probe_square(sweeps, runs_dir, queries=square_queries, shard=_shard(shard),
                             report=_progress(False))
    if n == before == 0:
        raise Inconclusive(f"no finished, evaluated run of the sweeps in {runs_dir}: nothing "
                           "probed")
    typer.echo(f"probed {n} run(s) with Square at {square_queries} queries"
               + (f"; {before} probed before, skipped" if before else ""))


@study_app.command("report")
@_user_errors
def study_report(
    evidence: Annotated[Path, typer.Option(help="Evidence folder (no weights).")]
    = Path("evidence/cpu"),
    out: Annotated[Path, typer.Option(help="Markdown report; PNGs go to its stem folder.")]
    = Path("docs/small_scale.md"),
    runs_dir: Annotated[Path | None, typer.Option(help="Copy finished runs' evidence from "
                                                  "here first.")] = None,
) -> None:
    """Regenerate the small-scale report (tables, tests, plots) from the evidence alone.

    Exit 2 when --runs-dir is not a folder; 3, with the report left as it was, when the
    evidence holds no evaluated run."""
    from trades_repro.smallscale import export
    from trades_repro.smallscale_report import write_report

    if runs_dir is not None and not runs_dir.is_dir():
        raise BadInput(f"--runs-dir {runs_dir}: not a folder")
    _folder_option("--evidence", evidence, writes=runs_dir is not None)
    if runs_dir is None and not evidence.is_dir():  # a mistyped path is not "no evidence"
        raise BadInput(f"--evidence {evidence}: not a folder")
    _file_option("--out", out)
    if runs_dir is not None:
        typer.echo(f"exported {export(runs_dir, evidence)} run(s) from {runs_dir}")
    typer.echo(str(write_report(evidence, out,
                                warn=lambda line: typer.echo(f"warning: {line}", err=True))))

