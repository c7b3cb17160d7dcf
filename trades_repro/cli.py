"""`trades-repro`: a thin Typer front end; every command parses paths, then calls the library.

Exit codes: 0 ok, 1 the run itself failed (e.g. a non-finite loss), 2 bad input (one line on
stderr, no traceback).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, TypeVar

import torch
import typer
from rich.console import Console

from trades_repro.data import DataError
from trades_repro.spec import ExperimentSpec, SpecError, load_spec

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2

app = typer.Typer(
    name="trades-repro",
    help="Reproduce 'Adversarial Robustness Overestimation and Instability in TRADES'.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
spec_app = typer.Typer(help="Inspect experiment specs.", no_args_is_help=True)
app.add_typer(spec_app, name="spec")

F = TypeVar("F", bound=Callable[..., object])


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _user_errors(func: F) -> F:
    """Known errors become one line on stderr and a documented exit code."""
    from trades_repro.checkpoints import CheckpointError
    from trades_repro.evaluate import EvaluationError
    from trades_repro.train import TrainingError

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (SpecError, DataError, CheckpointError, EvaluationError) as err:
            raise _fail(str(err), EXIT_BAD_INPUT) from None
        except TrainingError as err:
            raise _fail(str(err), EXIT_FAILED) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@_user_errors
def train(
    spec_file: Annotated[Path, typer.Argument(help="Experiment spec (YAML).")],
    runs_dir: Annotated[Path, typer.Option(help="Folder that holds run folders.")] = Path("runs"),
    quiet: Annotated[bool, typer.Option(help="No progress bar (for scripts).")] = False,
) -> None:
    """Train TRADES as the spec says; writes runs/<digest>/ (a finished run is skipped)."""
    from trades_repro.train import train as run_training

    spec = load_spec(spec_file)
    result = run_training(spec, runs_dir, progress=not quiet)
    console = Console(stderr=quiet)
    if result.skipped:
        console.print(f"already finished, nothing to do: {result.run_dir}")
    elif result.records:
        last = result.records[-1]
        best = max(result.records, key=lambda r: r.val_pgd10_acc)
        console.print(
            f"epoch {last.epoch}: clean {last.val_clean_acc:.4f}, PGD-10 {last.val_pgd10_acc:.4f}"
            f"; best PGD-10 {best.val_pgd10_acc:.4f} at epoch {best.epoch}"
        )
    typer.echo(str(result.run_dir))


@spec_app.command("schema")
def spec_schema() -> None:
    """Print the JSON schema of an experiment spec."""
    typer.echo(json.dumps(ExperimentSpec.model_json_schema(), indent=2))


@spec_app.command("show")
@_user_errors
def spec_show(spec_file: Annotated[Path, typer.Argument(help="Experiment spec (YAML).")]) -> None:
    """Print the resolved spec (every default filled in) and its digest."""
    spec = load_spec(spec_file)
    typer.echo(json.dumps(spec.model_dump(mode="json"), indent=2, sort_keys=True))
    typer.echo(f"digest: {spec.digest()}")


def main() -> None:  # pragma: no cover - console-script convenience
    sys.exit(app())


# ------------------------------------------------------------------- evaluation and diagnosis

AttacksOption = Annotated[list[str] | None, typer.Option(
    "--attacks", help="Attacks, comma-separated or repeated: pgd10, apgd-ce, apgd-t, fab-t, "
    "square, autoattack, or the presets all / square-only.")]


ThreadsOption = Annotated[int | None, typer.Option(
    help="CPU threads for torch [default: 1 on CPU].")]


def _set_threads(threads: int | None, device: str | None) -> None:
    """One CPU thread unless told: the attacks run many tiny forwards (Square: one per query)
    where a second thread gains little, while OpenMP spinning on a shared 2-core machine cost
    4x (the digits diagnosis: 5 min with 2 threads, 78 s with 1, measured)."""
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    elif device != "cuda" and not (device in (None, "auto") and torch.cuda.is_available()):
        torch.set_num_threads(1)


def _progress(quiet: bool) -> Callable[[str], None]:
    console = Console(stderr=True)
    return (lambda line: None) if quiet else (lambda line: console.print(line, highlight=False))


def _print_record(console: Console, title: str, record) -> None:
    from rich.table import Table

    from trades_repro.diagnose import table_rows
    from trades_repro.evaluate import PRIMARY_RULE, verdict_line

    table = Table(title=title, title_justify="left")
    for column in ("metric", "value", "note"):
        table.add_column(column)
    for row in table_rows(record):
        table.add_row(*row)
    console.print(table)
    for verdict in record.verdicts:
        prefix = "verdict: " if verdict.rule == PRIMARY_RULE.name else "also: "
        console.print(prefix + verdict_line(verdict), highlight=False, soft_wrap=True)


@app.command()
@_user_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<digest>/).")],
    attacks: AttacksOption = None,
    n_examples: Annotated[int | None, typer.Option(help="First N test images.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    threads: ThreadsOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
) -> None:
    """Evaluate the run's selected checkpoint(s) into RUN_DIR/eval.json (resumable)."""
    from trades_repro.diagnose import evaluate_run, parse_attacks

    _set_threads(threads, device)
    chosen = parse_attacks(attacks) if attacks else None
    evals = evaluate_run(run_dir, attacks=chosen, n_examples=n_examples, device=device,
                         report=_progress(quiet))
    for file, record in evals.checkpoints.items():
        _print_record(Console(), f"{file} ({', '.join(record.policies)})", record)
    typer.echo(str(run_dir / "eval.json"))


@app.command()
@_user_errors
def diagnose(
    checkpoint: Annotated[Path, typer.Argument(help="safetensors or torch state dict.")],
    dataset: Annotated[str, typer.Option(help="digits, fashion_mnist, cifar10, ...")],
    model: Annotated[str | None, typer.Option(help="Our architecture: small_cnn, resnet18.")]
    = None,
    factory: Annotated[str | None, typer.Option(
        help="module:function returning the nn.Module (on PYTHONPATH).")] = None,
    width: Annotated[int, typer.Option(help="small_cnn width.")] = 32,
    normalize: Annotated[bool, typer.Option(help="Our model has a Normalize layer.")] = False,
    eps: Annotated[str, typer.Option(help="L-inf radius, e.g. 8/255 or 0.2.")] = "8/255",
    n_examples: Annotated[int | None, typer.Option(help="First N test images.")] = None,
    attacks: AttacksOption = None,
    square_queries: Annotated[int, typer.Option(help="Square's query budget.")] = 5000,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    data_root: Annotated[str | None, typer.Option(help="Dataset folder.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write eval.json + landscape here.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON, no table.")] = False,
    threads: ThreadsOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
) -> None:
    """Is this checkpoint's PGD robustness real? Exit 0 no, 1 overestimated, 2 bad input."""
    from trades_repro.diagnose import diagnose as run_diagnosis
    from trades_repro.diagnose import parse_attacks, parse_eps
    from trades_repro.evaluate import PRIMARY_RULE

    _set_threads(threads, device)
    record = run_diagnosis(
        checkpoint, dataset=dataset, arch=model, factory=factory, width=width,
        normalize=normalize, eps=parse_eps(eps), n_examples=n_examples,
        attacks=parse_attacks(attacks) if attacks else None, device=device,
        data_root=data_root, square_queries=square_queries, out=out,
        report=_progress(quiet or json_output))
    if json_output:
        typer.echo(record.model_dump_json(indent=2))
    else:
        _print_record(Console(), f"{checkpoint} on {dataset}", record)
    primary = next(v for v in record.verdicts if v.rule == PRIMARY_RULE.name)
    if primary.flagged:
        raise typer.Exit(EXIT_FAILED)
