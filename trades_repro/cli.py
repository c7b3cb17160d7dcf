"""`trades-repro`: a thin Typer front end; every command parses paths, then calls the library.

This module holds the app, the error handling every command shares, and `train`,
`evaluate`, `diagnose` and `spec`; the claims commands are in `cli_claims.py`, the study's
in `cli_study.py`.

Exit codes (every command wrapped by `_user_errors`; see `trades_repro.errors`):
0 ok (``diagnose``: not overestimated); 1 the run failed (a non-finite loss) or, for
``diagnose``, robustness overestimated; 2 bad input (one line on stderr, no traceback);
3 inconclusive (no verdict could be decided); 4 the command itself failed unexpectedly (one
line on stderr naming a log file that holds the traceback). When the reader of the output
closes its pipe early (`… | head`), a command stops quietly with 141, the shell's status for
SIGPIPE, instead of reporting a crash.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import sys
import tempfile
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, TypeVar

import click
import torch
import typer
from rich.console import Console as RichConsole

from trades_repro.data import DataError
from trades_repro.errors import BadInput
from trades_repro.spec import ExperimentSpec, SpecError, load_spec

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INCONCLUSIVE, EXIT_CRASHED = 1, 2, 3, 4
EXIT_READER_GONE = 128 + 13  # SIGPIPE: the shell's status for `… | head` closing early

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
EvalBatchOption = Annotated[int | None, typer.Option(
    "--eval-batch", help="Images per attack batch (default: from the image size and free GPU "
    "memory; on a CPU 500, and 128 for train's validation). Lower it if the GPU runs out of "
    "memory.")]


def _checked_eval_batch(eval_batch: int | None) -> None:
    """`--eval-batch` below 1 is refused as the option, before any run folder is read."""
    if eval_batch is not None:
        from trades_repro.evalbatch import checked

        checked(eval_batch)


def _folder_option(option: str, path: Path | None, *, writes: bool = True) -> None:
    """Exit 2 (one line), before any work, when a folder option names a file or lies under
    one, or, for a folder the command writes, lies where nothing may be written. Without
    this, `--runs-dir FILE` trained nothing and exited 4 as if the code had crashed."""
    if path is not None and (why := _blocked(path, writes=writes)):
        raise BadInput(f"{option} {path}: {why}")


def _file_option(option: str, path: Path | None, *, writes: bool = True) -> None:
    """Exit 2 (one line), before any work, when a file the command writes cannot be (with
    `writes` false, a dry run: only what can be told without making its folder)."""
    if path is None:
        return
    try:
        folder = path.is_dir()
    except OSError as err:  # a name too long for the file system
        raise BadInput(f"{option} {path}: not a usable path: {err.strerror or err}") from None
    why = "a folder, not a file" if folder else _blocked(path, writes=writes, file=True)
    if why:
        raise BadInput(f"{option} {path}: {why}")


def _blocked(path: Path, *, writes: bool, file: bool = False) -> str | None:
    """Why the folder `path` (or the folder of the file `path`) cannot be made and used.
    Where it will be written, a folder is made and removed in the nearest existing one:
    permission bits say nothing to root, and under /proc nothing may be made at all."""
    folders = path.parents if file else (path, *path.parents)
    try:
        existing = next((p for p in folders if p.exists()), None)
    except OSError as err:  # a name too long for the file system
        return f"not a usable path: {err.strerror or err}"
    if existing is not None and not existing.is_dir():
        return "not a folder" if existing == path else f"{existing} is a file"
    if not writes or existing is None:
        return None
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".trades-repro-probe-", dir=existing))
        longest = os.pathconf(existing, "PC_NAME_MAX")
    except OSError as err:
        return f"nothing can be made in {existing}: {err.strerror or err}"
    if any(len(os.fsencode(part)) > longest for part in path.parts):
        return f"a name in it is longer than the file system's {longest} bytes"
    return None


class Console(RichConsole):
    """rich's Console, except that a closed pipe raises BrokenPipeError for `_user_errors`
    to handle: rich's own handler exits 1, which here means a claim or a run failed."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(errno.EPIPE, "the reader closed the pipe")


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _bad_input_errors() -> tuple[type[Exception], ...]:
    """Exception types that mean bad input (exit 2). A module with its own error type adds it
    here, or subclasses `trades_repro.errors.BadInput` (always included)."""
    from trades_repro.checkpoints import CheckpointError
    from trades_repro.evaluate import EvaluationError

    return (BadInput, SpecError, DataError, CheckpointError, EvaluationError)


def _user_errors(func: F) -> F:
    """Known errors become one line on stderr and a documented exit code (module docstring);
    anything unexpected exits 4 with its traceback in a log file, never 0 or 1."""
    from trades_repro.errors import Inconclusive
    from trades_repro.train import TrainingError

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise  # the command's own exit code, or click's usage error (2)
        except _bad_input_errors() as err:
            raise _fail(str(err), EXIT_BAD_INPUT) from None
        except TrainingError as err:
            raise _fail(str(err), EXIT_FAILED) from None
        except Inconclusive as err:
            raise _fail(f"inconclusive: {err}", EXIT_INCONCLUSIVE) from None
        except (Exception, SystemExit) as err:  # noqa: BLE001 - the one catch-all
            # SystemExit too: our commands end with typer.Exit, so a sys.exit here came from
            # code we called (a user's model), and its 0 must not pass for "held"
            if isinstance(err, BrokenPipeError) and (gone := _readers_gone()):
                raise _stop_quietly(gone) from None
            log = _traceback_log(func.__name__)
            message = (str(err).strip().splitlines() or [""])[0]
            raise _fail(f"{func.__name__} failed unexpectedly: {type(err).__name__}: {message} "
                        f"(traceback in {log})", EXIT_CRASHED) from None

    if func.__doc__:  # Typer takes the help from the docstring: each paragraph on one line
        wrapper.__doc__ = _reflowed(inspect.getdoc(func))
    return wrapper  # type: ignore[return-value]


def _reflowed(doc: str) -> str:
    """A docstring's paragraphs each on one line. Rich prints a help text's line breaks as
    they are, so paragraphs wrapped at the source's width came out ragged in `--help`."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in doc.split("\n\n"))


def _readers_gone() -> list[int]:
    """The standard streams (stdout, stderr) whose reader has closed its end of the pipe, as
    in `trades-repro spec show … | head`: Linux flags such a write end with POLLERR."""
    import select

    if not hasattr(select, "poll"):  # Windows: no way to tell, so it stays a crash report
        return []
    poller, fds = select.poll(), []
    for stream in (sys.stdout, sys.stderr):
        try:
            fds.append(stream.fileno())
        except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
            continue
        poller.register(fds[-1], select.POLLOUT)
    return [fd for fd, event in poller.poll(0) if event & select.POLLERR]


def _stop_quietly(fds: list[int]) -> typer.Exit:
    """The reader left: stop without a word, as Unix tools do (128 + SIGPIPE), and point the
    closed streams at /dev/null so that Python's exit-time flush does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(devnull, fd)
    os.close(devnull)
    return typer.Exit(EXIT_READER_GONE)


def _traceback_log(command: str) -> Path:
    """Write the current exception's traceback to a fresh file in the temp folder."""
    import tempfile
    import traceback

    handle, name = tempfile.mkstemp(prefix=f"trades-repro-{command}-", suffix=".log")
    with os.fdopen(handle, "w") as log:
        log.write(f"trades-repro {command} {' '.join(sys.argv[1:])}\n")
        traceback.print_exc(file=log)
    return Path(name)


@app.command()
@_user_errors
def train(
    spec_file: Annotated[Path, typer.Argument(help="Experiment spec (YAML).")],
    runs_dir: Annotated[Path, typer.Option(help="Folder that holds run folders.")] = Path("runs"),
    quiet: Annotated[bool, typer.Option(help="No progress bar (for scripts).")] = False,
    eval_batch: EvalBatchOption = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads for torch (default: 1 on CPU, as run-claim, demo and study "
        "train). Another count rounds differently on a CPU, so the run's numbers would "
        "differ from those of the same digest trained by run-claim.")] = None,
) -> None:
    """Train TRADES as the spec says; writes runs/<digest>/ (a finished run is skipped)."""
    from trades_repro import runlock, store
    from trades_repro.train import train as run_training

    _folder_option("--runs-dir", runs_dir)
    spec = load_spec(spec_file)
    _set_threads(threads, spec.device)
    with runlock.hold(store.run_dir_for(spec, runs_dir)):  # RunBusy (exit 2) if held
        result = run_training(spec, runs_dir, progress=not quiet, eval_batch=eval_batch)
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
@_user_errors
def spec_schema() -> None:
    """Print the JSON schema of an experiment spec."""
    typer.echo(json.dumps(ExperimentSpec.model_json_schema(), indent=2))


@spec_app.command("show")
@_user_errors
def spec_show(spec_file: Annotated[Path, typer.Argument(
        help="Experiment spec or sweep (YAML).")]) -> None:
    """Print the resolved spec (every default filled in) and its digest.

    For a sweep, every expanded run's grid point, seed and digest."""
    from trades_repro.sweep import is_sweep_file, load_sweep

    if is_sweep_file(spec_file):
        sweep, specs = load_sweep(spec_file)
        typer.echo(f"sweep of {sweep.base}: {len(specs)} runs")
        for spec, (cell, seed) in zip(specs, _sweep_points(sweep), strict=True):
            point = " ".join(f"{k}={v}" for k, v in cell.items())
            typer.echo(f"{spec.digest()}  seed={seed} {point}".rstrip())
        return
    spec = load_spec(spec_file)
    typer.echo(json.dumps(spec.model_dump(mode="json"), indent=2, sort_keys=True))
    typer.echo(f"digest: {spec.digest()}")


def _sweep_points(sweep):
    return [(cell, seed) for cell in sweep.cells() for seed in sweep.seed_list()]


def main() -> None:  # pragma: no cover - console-script convenience
    sys.exit(app())


# ------------------------------------------------------------------- evaluation and diagnosis

AttacksOption = Annotated[list[str] | None, typer.Option(
    "--attacks", help="Attacks, comma-separated or repeated: pgd10, apgd-ce, apgd-t, fab-t, "
    "square, autoattack, or the presets all / square-only.")]


ThreadsOption = Annotated[int | None, typer.Option(
    min=1, help="CPU threads for torch (default: 1 on CPU).")]


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
    if quiet:
        return lambda line: None
    # markup off: our lines are data ("loss nan [step 12]"), and rich ate "[step 12]" as a tag
    return lambda line: console.print(line, highlight=False, markup=False)


def _print_record(console: Console, title: str, record) -> None:
    from rich.markup import escape
    from rich.table import Table

    from trades_repro.diagnose import settings_line, table_rows
    from trades_repro.evaluate import DIAGNOSE_RULE, verdict_line

    table = Table(title=title, title_justify="left")
    for column in ("metric", "value", "note"):
        table.add_column(column)
    for row in table_rows(record):
        table.add_row(*map(escape, row))
    console.print(table)
    console.print(settings_line(record), highlight=False, soft_wrap=True, markup=False)
    if record.checklist:
        rows = Table(title="masking checklist", title_justify="left")
        for column in ("item", "status", "detail", "cost"):
            rows.add_column(column)
        for row in record.checklist:
            rows.add_row(row.item, row.status, escape(row.detail), f"{row.seconds:.1f} s")
        console.print(rows)
    first = sorted(record.verdicts, key=lambda v: v.rule != DIAGNOSE_RULE.name)  # exit's first
    for verdict in first:
        prefix = "verdict: " if verdict.rule == DIAGNOSE_RULE.name else "also: "
        line = verdict_line(verdict, record.attacks.get(verdict.attack))
        console.print(prefix + line, highlight=False, soft_wrap=True, markup=False)


SeedOption = Annotated[int | None, typer.Option(
    min=0, max=2**32 - 1,  # torch seeds wrap around at 2^32: a larger one repeats a smaller
    help="Seed of PGD's and AutoAttack's random starts (default: the spec's, or 0).")]
SaveAdvOption = Annotated[bool, typer.Option(
    "--save-adversarial", help="Keep each attack's adversarial examples (.safetensors).")]
Tf32Option = Annotated[bool, typer.Option(
    "--tf32", help="TF32 for the attacks on Ampere and later GPUs: faster, different "
    "rounding; kept as a separate record that claims never use; no effect on a CPU.")]


@app.command()
@_user_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<digest>/).")],
    attacks: AttacksOption = None,
    n_examples: Annotated[int | None, typer.Option(help="First N test images.")] = None,
    square_queries: Annotated[int | None, typer.Option(
        help="Square's query budget (default: the spec's, normally AutoAttack's standard "
        "5000). Another budget is a separate record, never the run's own evaluation.")]
    = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    seed: SeedOption = None,
    save_adversarial: SaveAdvOption = False,
    tf32: Tf32Option = False,
    threads: ThreadsOption = None,
    eval_batch: EvalBatchOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
) -> None:
    """Evaluate the run's selected checkpoint(s) into RUN_DIR/eval.json (resumable).

    Exit as diagnose does, on the worst of the checkpoints' verdicts (rule
    pgd10_minus_square_v2): 0 not overestimated, 1 overestimated, 2 bad input, 3 inconclusive
    or no verdict (e.g. --attacks pgd10), 4 the evaluation failed (traceback in a log file).
    """
    from trades_repro.diagnose import evaluate_run, parse_attacks

    _checked_eval_batch(eval_batch)
    _set_threads(threads, device)
    chosen = parse_attacks(attacks) if attacks else None
    records = evaluate_run(run_dir, attacks=chosen, n_examples=n_examples, device=device,
                           seed=seed, save_adversarial=save_adversarial,
                           eval_batch=eval_batch, square_queries=square_queries,
                           tf32=tf32, report=_progress(quiet))
    for record in records:
        _print_record(Console(), f"{record.checkpoint} ({', '.join(record.policies)})", record)
    typer.echo(str(run_dir / "eval.json"))
    _exit_on_verdicts(records)


@app.command()
@_user_errors
def diagnose(
    checkpoint: Annotated[Path, typer.Argument(help="safetensors or torch state dict.")],
    dataset: Annotated[str, typer.Option(help="digits, fashion_mnist, cifar10, ...")],
    model: Annotated[str | None, typer.Option(
        help="Our architecture: small_cnn, resnet18 (also TRADES-AWP's names), wrn-34-10 "
        "(official TRADES' CIFAR-10 model); see docs/checkpoints.md.")]
    = None,
    factory: Annotated[str | None, typer.Option(
        help="module:function returning the nn.Module (on PYTHONPATH).")] = None,
    width: Annotated[int, typer.Option(help="small_cnn width.")] = 32,
    normalize: Annotated[bool, typer.Option(help="Our model has a Normalize layer.")] = False,
    eps: Annotated[str, typer.Option(help="L-inf radius, e.g. 8/255 or 0.2.")] = "8/255",
    n_examples: Annotated[int | None, typer.Option(help="First N test images.")] = None,
    attacks: AttacksOption = None,
    square_queries: Annotated[int, typer.Option(
        help="Square's query budget (AutoAttack's standard: 5000).")] = 5000,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    data_root: Annotated[str | None, typer.Option(help="Dataset folder.")] = None,
    download: Annotated[bool, typer.Option(
        help="Let torchvision download the dataset into the dataset folder (./data unless "
        "--data-root) when no copy is found.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write eval.json + landscape here.")] = None,
    seed: SeedOption = None,
    save_adversarial: SaveAdvOption = False,
    checklist: Annotated[bool, typer.Option(
        "--checklist", help="Also run the masking checklist (PGD-100x5, margin loss, FGSM, "
        "eps sweep, noise, Square-only images); its rows do not change the exit code.")]
    = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON, no table.")] = False,
    tf32: Tf32Option = False,
    threads: ThreadsOption = None,
    eval_batch: EvalBatchOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
) -> None:
    """Is this checkpoint's PGD robustness real? Rule pgd10_minus_square_v2 decides.

    Exit 0 not overestimated (the 95% interval lies below 8 points), 1 overestimated (it lies
    at or above), 2 bad input (also: the model does not fit the dataset, or outputs
    probabilities), 3 inconclusive (the interval straddles the threshold, a masking check
    fired, or no verdict), 4 the evaluation itself failed (traceback in a log file).
    """
    from trades_repro.diagnose import diagnose as run_diagnosis
    from trades_repro.diagnose import parse_attacks, parse_eps

    _checked_eval_batch(eval_batch)
    _folder_option("--out", out)
    _set_threads(threads, device)
    record = run_diagnosis(
        checkpoint, dataset=dataset, arch=model, factory=factory, width=width,
        normalize=normalize, eps=parse_eps(eps), n_examples=n_examples,
        attacks=parse_attacks(attacks) if attacks else None, device=device,
        data_root=data_root, square_queries=square_queries, seed=seed or 0, out=out,
        save_adversarial=save_adversarial, checklist=checklist, eval_batch=eval_batch,
        download=download, tf32=tf32, report=_progress(quiet or json_output))
    if json_output:
        typer.echo(record.model_dump_json(indent=2))
    else:
        _print_record(Console(), f"{checkpoint} on {dataset}", record)
    _exit_on_verdicts([record])


def _exit_on_verdicts(records: list) -> None:
    """Exit 1 when any record's `diagnose` verdict is flagged, 3 (its line on stderr) when
    one is inconclusive or missing, or there is no record at all; else return (exit 0)."""
    from trades_repro.errors import Inconclusive
    from trades_repro.evaluate import DIAGNOSE_RULE, verdict_line

    pairs = [(r, next(v for v in r.verdicts if v.rule == DIAGNOSE_RULE.name)) for r in records]
    if any(verdict.outcome == "flagged" for _, verdict in pairs):
        raise typer.Exit(EXIT_FAILED)
    if not pairs:
        raise Inconclusive("no checkpoint was evaluated")
    for record, verdict in pairs:
        if verdict.outcome != "clear":  # _user_errors says "inconclusive:" once
            line = verdict_line(verdict, record.attacks.get(verdict.attack))
            raise Inconclusive(line.removeprefix("inconclusive: "))


RunsDir = Annotated[Path, typer.Option(help="Folder that holds run folders.")]


def _exit_if_failed(failures: list[str]) -> None:
    """Each failed run on stderr, then exit 1 (a run failed) if there was any."""
    for line in failures:
        typer.echo(f"run {line}", err=True)
    if failures:
        raise typer.Exit(EXIT_FAILED)


# The claims and study commands live in modules of their own; importing them registers them.
from trades_repro import cli_claims, cli_study  # noqa: E402, F401
