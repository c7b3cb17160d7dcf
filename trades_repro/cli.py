"""`trades-repro`: a thin Typer front end; every command parses paths, then calls the library.

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
    "memory; 500 on a CPU). Lower it if the GPU runs out of memory.")]


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


def _file_option(option: str, path: Path | None) -> None:
    """Exit 2 (one line), before any work, when a file the command writes cannot be."""
    if path is None:
        return
    why = "a folder, not a file" if path.is_dir() else _blocked(path, writes=True, file=True)
    if why:
        raise BadInput(f"{option} {path}: {why}")


def _blocked(path: Path, *, writes: bool, file: bool = False) -> str | None:
    """Why the folder `path` (or the folder of the file `path`) cannot be made and used."""
    folders = path.parents if file else (path, *path.parents)
    existing = next((p for p in folders if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return "not a folder" if existing == path else f"{existing} is a file"
    if writes and not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
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
        except Exception as err:  # noqa: BLE001 - the one place that catches everything
            if isinstance(err, BrokenPipeError) and (gone := _readers_gone()):
                raise _stop_quietly(gone) from None
            log = _traceback_log(func.__name__)
            message = (str(err).strip().splitlines() or [""])[0]
            raise _fail(f"{func.__name__} failed unexpectedly: {type(err).__name__}: {message} "
                        f"(traceback in {log})", EXIT_CRASHED) from None

    return wrapper  # type: ignore[return-value]


def _readers_gone() -> list[int]:
    """The standard streams (stdout, stderr) whose reader has closed its end of the pipe, as
    in `trades-repro spec show … | head`: Linux flags such a write end with POLLERR."""
    import select

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
) -> None:
    """Train TRADES as the spec says; writes runs/<digest>/ (a finished run is skipped)."""
    from trades_repro import runlock, store
    from trades_repro.train import train as run_training

    _folder_option("--runs-dir", runs_dir)
    spec = load_spec(spec_file)
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
    from trades_repro.spec import is_sweep_file, load_sweep

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
    return (lambda line: None) if quiet else (lambda line: console.print(line, highlight=False))


def _print_record(console: Console, title: str, record) -> None:
    from rich.table import Table

    from trades_repro.diagnose import settings_line, table_rows
    from trades_repro.evaluate import DIAGNOSE_RULE, verdict_line

    table = Table(title=title, title_justify="left")
    for column in ("metric", "value", "note"):
        table.add_column(column)
    for row in table_rows(record):
        table.add_row(*row)
    console.print(table)
    console.print(settings_line(record), highlight=False, soft_wrap=True)
    if record.checklist:
        rows = Table(title="masking checklist", title_justify="left")
        for column in ("item", "status", "detail", "cost"):
            rows.add_column(column)
        for row in record.checklist:
            rows.add_row(row.item, row.status, row.detail, f"{row.seconds:.1f} s")
        console.print(rows)
    first = sorted(record.verdicts, key=lambda v: v.rule != DIAGNOSE_RULE.name)  # exit's first
    for verdict in first:
        prefix = "verdict: " if verdict.rule == DIAGNOSE_RULE.name else "also: "
        line = verdict_line(verdict, record.attacks.get(verdict.attack))
        console.print(prefix + line, highlight=False, soft_wrap=True)


SeedOption = Annotated[int | None, typer.Option(
    help="Seed of PGD's and AutoAttack's random starts (default: the spec's, or 0).")]
SaveAdvOption = Annotated[bool, typer.Option(
    "--save-adversarial", help="Keep each attack's adversarial examples (.safetensors).")]


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
    threads: ThreadsOption = None,
    eval_batch: EvalBatchOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
) -> None:
    """Evaluate the run's selected checkpoint(s) into RUN_DIR/eval.json (resumable).

    Exit 0 done, 2 bad input, 4 the evaluation failed (traceback in a log file).
    """
    from trades_repro.diagnose import evaluate_run, parse_attacks

    _checked_eval_batch(eval_batch)
    _set_threads(threads, device)
    chosen = parse_attacks(attacks) if attacks else None
    records = evaluate_run(run_dir, attacks=chosen, n_examples=n_examples, device=device,
                           seed=seed, save_adversarial=save_adversarial,
                           eval_batch=eval_batch, square_queries=square_queries,
                           report=_progress(quiet))
    for record in records:
        _print_record(Console(), f"{record.checkpoint} ({', '.join(record.policies)})", record)
    typer.echo(str(run_dir / "eval.json"))


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
    out: Annotated[Path | None, typer.Option(help="Write eval.json + landscape here.")] = None,
    seed: SeedOption = None,
    save_adversarial: SaveAdvOption = False,
    checklist: Annotated[bool, typer.Option(
        "--checklist", help="Also run the masking checklist (PGD-100x5, margin loss, FGSM, "
        "eps sweep, noise, Square-only images); its rows do not change the exit code.")]
    = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON, no table.")] = False,
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
    from trades_repro.errors import Inconclusive
    from trades_repro.evaluate import DIAGNOSE_RULE, verdict_line

    _checked_eval_batch(eval_batch)
    _folder_option("--out", out)
    _set_threads(threads, device)
    record = run_diagnosis(
        checkpoint, dataset=dataset, arch=model, factory=factory, width=width,
        normalize=normalize, eps=parse_eps(eps), n_examples=n_examples,
        attacks=parse_attacks(attacks) if attacks else None, device=device,
        data_root=data_root, square_queries=square_queries, seed=seed or 0, out=out,
        save_adversarial=save_adversarial, checklist=checklist, eval_batch=eval_batch,
        report=_progress(quiet or json_output))
    if json_output:
        typer.echo(record.model_dump_json(indent=2))
    else:
        _print_record(Console(), f"{checkpoint} on {dataset}", record)
    verdict = next(v for v in record.verdicts if v.rule == DIAGNOSE_RULE.name)
    if verdict.outcome == "flagged":
        raise typer.Exit(EXIT_FAILED)
    if verdict.outcome != "clear":  # _user_errors says "inconclusive:" once
        line = verdict_line(verdict, record.attacks.get(verdict.attack))
        raise Inconclusive(line.removeprefix("inconclusive: "))


# ------------------------------------------------------------------- claims and verification

claims_app = typer.Typer(help="The paper's claims as data.", no_args_is_help=True)
app.add_typer(claims_app, name="claims")

ClaimsDir = Annotated[Path, typer.Option(help="Folder of claims files (arms.yaml + one per "
                                         "paper artefact).")]
RunsDir = Annotated[Path, typer.Option(help="Folder that holds run folders.")]
TierOption = Annotated[str, typer.Option(help="instant, cpu, reduced or full.")]
Patterns = Annotated[list[str] | None, typer.Argument(
    help="Claim ids or glob patterns (table_2.*); none or 'all': every claim.")]
JunitOption = Annotated[Path | None, typer.Option(help="Write JUnit XML here.")]


def _tier(name: str) -> str:
    from trades_repro.claims import TIERS, ClaimsError

    if name not in TIERS:
        raise ClaimsError(f"--tier: unknown tier {name!r}; known: {', '.join(TIERS)}")
    return name


def _selected(claims_dir: Path, patterns: list[str] | None, tier: str | None):
    from trades_repro.claims import TIERS, ClaimsError, load_catalogue

    catalogue = load_catalogue(claims_dir)
    entries = catalogue.select(patterns, tier)
    matching = catalogue.select(patterns) if patterns else []
    if patterns and not matching:
        shown = " ".join(repr(p) for p in patterns)  # '' is a pattern too
        raise ClaimsError(f"no claim matches {shown} in {claims_dir}")
    if patterns and not entries:
        have = sorted({t for e in matching for t in catalogue.tiers_of(e)}, key=TIERS.index)
        raise ClaimsError(f"no claim matching {' '.join(patterns)} has the '{tier}' tier "
                          f"(theirs: {', '.join(have) or 'none'}; `trades-repro claims list` "
                          "shows every claim's tiers)")
    return catalogue, entries


@claims_app.command("list")
@_user_errors
def claims_list(
    patterns: Patterns = None,
    tier: Annotated[str | None, typer.Option(help="Only claims this tier can run.")] = None,
    claims_dir: ClaimsDir = Path("claims"),
    runs_dir: RunsDir = Path("runs"),
) -> None:
    """Every claim with its kind, source, the tiers it can run at and its status."""
    from rich.table import Table

    from trades_repro.verify import Context, Evidence, judge

    _folder_option("--runs-dir", runs_dir, writes=False)
    catalogue, entries = _selected(claims_dir, patterns, tier and _tier(tier))
    evidence = Evidence(runs_dir)
    table = Table(title=f"{len(entries)} claims in {claims_dir}", title_justify="left")
    for column in ("claim", "kind", "source", "tiers", "status"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        tiers = catalogue.tiers_of(entry)
        status = judge(entry, Context(catalogue, evidence, tier or tiers[-1])).status
        source = f"{entry.claim.source.artefact}: {entry.claim.source.where}"
        table.add_row(entry.id, entry.claim.kind, source, ", ".join(tiers), status)
    Console().print(table)


@app.command()
@_user_errors
def verify(
    patterns: Patterns = None,
    tier: TierOption = "full",
    runs_dir: RunsDir = Path("runs"),
    claims_dir: ClaimsDir = Path("claims"),
    report: Annotated[Path | None, typer.Option(help="Write a Markdown report here.")] = None,
    junit: JunitOption = None,
    allow_partial: Annotated[bool, typer.Option(
        help="Judge claims on fewer seeds than they name (the report says so).")] = False,
) -> None:
    """Judge claims against the evidence in RUNS_DIR.

    Exit 0 every judged claim held, 1 one failed, 2 bad input, 3 none failed but some could
    not be decided (undetermined), or no evidence: not one claim could be judged."""
    _folder_option("--runs-dir", runs_dir, writes=False)
    _file_option("--report", report)
    _file_option("--junit", junit)
    judgements, titles = _judge(patterns, _tier(tier), runs_dir, claims_dir, allow_partial)
    _report(judgements, titles, tier, runs_dir, report, junit)
    _exit_for(judgements)


def _exit_for(judgements, run_failed: bool = False) -> None:
    """1 when a claim (or a run) failed; 3 when none did but some claims are undetermined."""
    from trades_repro.errors import Inconclusive

    if run_failed or any(j.status == "failed" for j in judgements):
        raise typer.Exit(EXIT_FAILED)
    undetermined = [j.id for j in judgements if j.status == "undetermined"]
    if undetermined:
        raise Inconclusive(f"{len(undetermined)} claim(s) undetermined: "
                           f"{', '.join(undetermined[:5])}")
    if judgements and all(j.status in ("not run", "incomplete") for j in judgements):
        raise Inconclusive(f"no evidence: none of the {len(judgements)} claim(s) could be "
                           "judged (not run or incomplete); run-claim trains what they need")


def _judge(patterns, tier, runs_dir, claims_dir, allow_partial):
    from trades_repro.verify import Context, Evidence, judge_all

    catalogue, entries = _selected(claims_dir, patterns, tier)
    context = Context(catalogue, Evidence(runs_dir), tier, allow_partial)
    return judge_all(entries, context), catalogue.titles


def _report(judgements, titles, tier, runs_dir, report, junit) -> None:
    from trades_repro.report import print_tables, write_junit, write_markdown

    print_tables(Console(), judgements, titles)
    if report is not None:
        write_markdown(report, judgements, titles, tier=tier, runs_dir=runs_dir)
        typer.echo(f"report: {report}")
    if junit is not None:
        write_junit(junit, judgements, tier=tier)


ExecutorOption = Annotated[str, typer.Option(
    help="inline: one run after another here; local: separate processes (--jobs, round "
    "robin over the GPUs); slurm: one submitit job array.")]
SlurmOption = Annotated[str | None, typer.Option(help="slurm: overrides the config file.",
                                                 rich_help_panel="SLURM")]
SlurmInt = Annotated[int | None, typer.Option(min=0, help="slurm: per run; overrides the "
                                              "config file.", rich_help_panel="SLURM")]


@app.command("run-claim")
@_user_errors
def run_claim(
    patterns: Patterns = None,
    tier: TierOption = "instant",
    runs_dir: RunsDir = Path("runs"),
    claims_dir: ClaimsDir = Path("claims"),
    dry_run: Annotated[bool, typer.Option(help="Print the plan and its cost; run nothing.")]
    = False,
    device_kind: Annotated[str, typer.Option(
        help="Cost table column for the estimate: h100 or cpu.")] = "",
    report: Annotated[Path | None, typer.Option(help="Markdown report (default: "
                                                "RUNS_DIR/report_<tier>.md).")] = None,
    junit: JunitOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars or lines.")] = False,
    executor: ExecutorOption = "inline",
    jobs: Annotated[int | None, typer.Option(min=1, help="local: runs at once (default: GPUs "
                                             "× jobs-per-gpu, or 1 on a CPU).")] = None,
    jobs_per_gpu: Annotated[int | None, typer.Option(
        min=1, help="local: runs sharing one GPU (default: 1).")] = None,
    executor_config: Annotated[Path | None, typer.Option(
        help="YAML with a `slurm:` and/or `local:` block (spec/slurm.example.yaml).")] = None,
    retry_failed: Annotated[bool, typer.Option(
        help="Run again the runs that failed before (skipped otherwise).")] = False,
    partition: SlurmOption = None,
    time: Annotated[str | None, typer.Option(
        help="slurm: per-run limit, minutes or D-HH:MM:SS (days optional).",
        rich_help_panel="SLURM")] = None,
    gpus: SlurmInt = None,
    cpus: SlurmInt = None,
    mem_gb: Annotated[float | None, typer.Option(help="slurm: memory per run (GB).",
                                                 rich_help_panel="SLURM")] = None,
    account: SlurmOption = None,
    qos: SlurmOption = None,
) -> None:
    """Train and evaluate what the claims need at TIER, then verify them.

    Finished runs are skipped, partial ones resumed, shared arms run once, and runs another
    launch is training are left to it. Exit codes as `verify`; 3 also when the tier needs a GPU
    and none is visible; 1 also when a run failed. With `--executor slurm` it submits one job
    array and exits 0: follow it with `trades-repro status`, judge it with
    `trades-repro verify`."""
    from trades_repro import executors, runclaim
    from trades_repro.claims import ClaimsError
    from trades_repro.runclaim import DEVICE_KINDS

    tier = _tier(tier)
    _folder_option("--runs-dir", runs_dir, writes=not dry_run)
    _file_option("--report", report)
    _file_option("--junit", junit)
    catalogue, entries = _selected(claims_dir, patterns, tier)
    runs = runclaim.plan(catalogue, entries, tier, runs_dir)
    device_kind = device_kind or ("h100" if tier in runclaim.GPU_TIERS else "cpu")
    if device_kind not in DEVICE_KINDS:
        raise ClaimsError(f"--device-kind: unknown {device_kind!r}; known: "
                          f"{', '.join(DEVICE_KINDS)}")
    _print_plan(runs, entries, tier, device_kind)
    if dry_run:
        _print_arms(runs, device_kind)
        return
    overrides = {"jobs": jobs, "jobs_per_gpu": jobs_per_gpu, "partition": partition,
                 "time": int(time) if time and time.isdigit() else time, "gpus": gpus,
                 "cpus": cpus, "mem_gb": mem_gb, "account": account, "qos": qos}
    chosen = executors.build(executor, runs_dir, progress=not quiet, overrides=overrides,
                             config=executors.load_config(executor_config))
    submit_only = isinstance(chosen, executors.Slurm) and not chosen.config.wait
    if not submit_only:  # a SLURM login node has no GPU; its jobs do
        runclaim.require_device(tier)
    _set_threads(None, None)  # one CPU thread unless CUDA: see _set_threads
    say = _progress(quiet)
    with runclaim.properties_alongside(entries, runs_dir, say):
        failures = runclaim.execute(runs, runs_dir, report=say, progress=not quiet,
                                    executor=chosen, retry_failed=retry_failed)
    if submit_only:
        _after_submit(patterns, tier, runs_dir, failures)
        return
    ids = [e.id for e in entries]
    judgements, titles = _judge(ids, tier, runs_dir, claims_dir, False)
    report = report or runs_dir / f"report_{tier}.md"
    _report(judgements, titles, tier, runs_dir, report, junit)
    for run, error in failures:
        typer.echo(f"run {run.digest} failed: {error}", err=True)
    _exit_for(judgements, run_failed=bool(failures))


def _after_submit(patterns, tier: str, runs_dir: Path, failures) -> None:
    """Submitted, not judged: say how to follow and judge; exit 1 if some failed before."""
    which = " ".join(repr(p) for p in patterns or ["all"])
    typer.echo(f"follow: trades-repro status {which} --tier {tier} --runs-dir {runs_dir}")
    typer.echo(f"judge when done: trades-repro verify {which} --tier {tier} "
               f"--runs-dir {runs_dir}")
    _exit_if_failed([f"{run.digest} failed: {error}" for run, error in failures])


def _exit_if_failed(failures: list[str]) -> None:
    """Each failed run on stderr, then exit 1 (a run failed) if there was any."""
    for line in failures:
        typer.echo(f"run {line}", err=True)
    if failures:
        raise typer.Exit(EXIT_FAILED)


@app.command()
@_user_errors
def demo(
    runs_dir: RunsDir = Path("runs"),
    claims_dir: ClaimsDir = Path("claims"),
    jobs: Annotated[int, typer.Option(min=1, help="Runs at once, each its own process (1: one "
                                      "after another in this process).")] = 2,
    download: Annotated[bool, typer.Option(
        help="Let torchvision download Fashion-MNIST into ./data when no copy is found.")]
    = False,
    plot: Annotated[Path | None, typer.Option(
        help="FOSC and PGD-10 per epoch (default: RUNS_DIR/demo_fosc.png).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
) -> None:
    """The paper's story in three real Fashion-MNIST runs on the CPU (about 9 min on 2 cores).

    Seed 0 of each cpu-tier arm: Table 2's risky corner, the same with Algorithm 1, and the
    safe corner. Prints clean, PGD-10, Square-5000, the margin with its interval, the verdict
    and peak FOSC; plots FOSC per epoch. Exit 0 when all three ran, whatever their verdicts;
    1 when a run failed."""
    import time

    from trades_repro import demo as demolib
    from trades_repro import executors
    from trades_repro.claims import load_catalogue

    _folder_option("--runs-dir", runs_dir)
    _file_option("--plot", plot)
    if plot is not None and plot.suffix.lower() != ".png":
        raise BadInput(f"--plot {plot}: expected the path of a .png file")
    start = time.monotonic()
    runs = demolib.plan(load_catalogue(claims_dir), download=download)
    executor = executors.build("local" if jobs > 1 else "inline", runs_dir,
                               progress=not quiet, overrides={"jobs": jobs},
                               config=executors.load_config(None))
    _set_threads(None, None)
    failures = demolib.execute(runs, runs_dir, executor=executor, report=_progress(quiet),
                               progress=not quiet)
    found = demolib.summaries(runs, runs_dir)
    if found:
        typer.echo("Fashion-MNIST, ε = 0.2, seed 0 of each cpu-tier arm:")
        for run in runs:
            typer.echo(f"  {demolib.configuration(run)}")
        typer.echo("")
        for line in demolib.text_table(demolib.table(found)):
            typer.echo(line)
        typer.echo("accuracies in %; flagged: PGD-10 − Square-5000 ≥ 8 points (Table 2's "
                   "rule); CI: the paired 95 % interval of the margin")
        png = demolib.plot(plot or runs_dir / "demo_fosc.png", found)
        typer.echo(f"FOSC and PGD-10 per epoch: {png}; one seed is not a rate: "
                   "docs/small_scale.md has the rates over seeds")
    typer.echo(f"{len(found)} of {len(runs)} runs in {(time.monotonic() - start) / 60:.1f} min")
    _exit_if_failed(failures)


@app.command("status")
@_user_errors
def status(
    patterns: Patterns = None,
    tier: Annotated[str | None, typer.Option(help="Only this tier (default: every tier with "
                                             "a run folder).")] = None,
    runs_dir: RunsDir = Path("runs"),
    claims_dir: ClaimsDir = Path("claims"),
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False,
) -> None:
    """Per claim and arm: runs done / running / failed / pending.

    With job ids, each running run's epoch and ETA, and each failed run's error line. Reads
    run folders only."""
    from rich.table import Table

    from trades_repro import status as statuslib

    _folder_option("--runs-dir", runs_dir, writes=False)
    catalogue, entries = _selected(claims_dir, patterns, tier and _tier(tier))
    rows = statuslib.collect(catalogue, entries, runs_dir, tier)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    if not rows:
        typer.echo("no runs started for these claims; --tier shows a tier's pending runs")
        return
    table = Table(title=f"{runs_dir} at {statuslib.snapshot_time()}", title_justify="left")
    for column in ("claim", "tier", "arm", *statuslib.STATES, "runs"):
        table.add_column(column, overflow="fold")
    for row in rows:
        notable = [statuslib.describe(r) for r in row.runs if r.state != "done"]
        table.add_row(row.claim, row.tier, row.arm, *map(str, row.counts().values()),
                      "\n".join(notable))
    Console(width=max(160, Console().width)).print(table)


def _print_plan(runs, entries, tier: str, device_kind: str) -> None:
    from collections import Counter

    from trades_repro.runclaim import estimate_hours

    states = Counter(r.state for r in runs)
    props = sum(e.claim.kind == "property" for e in entries)
    hours, missing = estimate_hours(runs, device_kind)
    console = Console()
    console.print(f"{len(entries)} claims at tier {tier}: {len(runs)} runs "
                  f"({states['done']} finished, {states['evaluate']} to evaluate, "
                  f"{states['resume']} to resume, {states['train']} to train"
                  + (f", {states['failed']} failed before" if states["failed"] else "")
                  + f"), {props} property tests", highlight=False, soft_wrap=True)
    where = "GPU" if device_kind != "cpu" else "CPU"
    amount = f"{hours:.1f} h" if hours >= 1 else f"{60 * hours:.0f} min"
    console.print(f"estimated {where} time ({device_kind}, spec/costs.yaml): {amount}"
                  + (f"; no cost entry for {', '.join(missing)}" if missing else ""),
                  highlight=False, soft_wrap=True)


def _print_arms(runs, device_kind: str) -> None:
    from rich.table import Table

    from trades_repro.runclaim import by_arm

    table = Table(title="runs per arm", title_justify="left")
    for column in ("arm", "runs", "pending", f"est. hours ({device_kind})"):
        table.add_column(column)
    for arm, n, pending, hours in by_arm(runs, device_kind):
        table.add_row(arm, str(n), str(pending), f"{hours:.1f}")
    Console().print(table)


# ------------------------------------------------------------------- small-scale study (issue 19)

study_app = typer.Typer(help="The CPU study of when TRADES overestimates robustness "
                        "(docs/small_scale.md).", no_args_is_help=True)
app.add_typer(study_app, name="study")


STATES = ("done", "evaluate", "resume", "train", "failed")  # runclaim.run_state's, in order
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
) -> None:
    """Train and evaluate the sweeps' runs (finished skipped, partial resumed).

    Exit 1 when a run failed. Each next run is every cell's first seed, then the further
    seeds of cells with a flagged run, then the rest; a second launch on the same files
    shares the work."""
    from trades_repro import smallscale as ss

    _folder_option("--runs-dir", runs_dir, writes=not dry_run)
    if dry_run:
        for path, counts in ss.progress(sweeps, runs_dir):
            states = ", ".join(f"{counts[k]} {k}" for k in STATES if counts.get(k))
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
    _exit_if_failed(ss.run_sweeps(sweeps, runs_dir, shard=_shard(shard),
                                  report=_progress(False)))


def _shard(shard: str) -> tuple[int, int]:
    try:
        k, n = (int(part) for part in shard.split("/"))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        raise BadInput(f"--shard {shard!r}: expected K/N with 0 <= K < N") from None
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
    from trades_repro.smallscale import probe_square

    if square_queries < 1:
        raise BadInput(f"--square-queries {square_queries}: must be at least 1")
    _folder_option("--runs-dir", runs_dir)
    _set_threads(None, None)
    n = probe_square(sweeps, runs_dir, queries=square_queries, shard=_shard(shard),
                     report=_progress(False))
    typer.echo(f"probed {n} run(s) with Square at {square_queries} queries")


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
    _file_option("--out", out)
    if runs_dir is not None:
        typer.echo(f"exported {export(runs_dir, evidence)} run(s) from {runs_dir}")
    typer.echo(str(write_report(evidence, out)))


def _reflowed(doc: str) -> str:
    """A docstring's paragraphs each on one line. Rich prints a help text's line breaks as
    they are, so paragraphs wrapped at the source's width came out ragged in `--help`."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in doc.split("\n\n"))


for _group in (app, spec_app, claims_app, study_app):
    for _info in _group.registered_commands:
        if _info.help is None and _info.callback is not None and _info.callback.__doc__:
            _info.help = _reflowed(inspect.getdoc(_info.callback))
