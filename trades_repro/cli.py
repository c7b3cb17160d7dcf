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
    from trades_repro.train import TrainingError

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (SpecError, DataError) as err:
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
