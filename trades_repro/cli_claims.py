"""`trades-repro claims list`, `verify`, `run-claim`, `demo` and `status`: the paper's claims,
judged from run folders and run where evidence is missing. Registered on `cli.app`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from trades_repro.cli import (
    EXIT_FAILED,
    Console,
    RunsDir,
    _exit_if_failed,
    _file_option,
    _folder_option,
    _progress,
    _set_threads,
    _user_errors,
    app,
)
from trades_repro.errors import BadInput

claims_app = typer.Typer(help="The paper's claims as data.", no_args_is_help=True)
app.add_typer(claims_app, name="claims")

ClaimsDir = Annotated[Path, typer.Option(help="Folder of claims files (arms.yaml + one per "
                                         "paper artefact).")]
TierOption = Annotated[str, typer.Option(help="instant, cpu, reduced or full.")]
Patterns = Annotated[list[str] | None, typer.Argument(
    help="Claim ids or glob patterns (table_2.*); none or 'all': every claim.")]
JunitOption = Annotated[Path | None, typer.Option(help="Write JUnit XML here.")]


def _tier(name: str) -> str:
    from trades_repro.claimkinds import TIERS
    from trades_repro.claims import ClaimsError

    if name not in TIERS:
        raise ClaimsError(f"--tier: unknown tier {name!r}; known: {', '.join(TIERS)}")
    return name


def _selected(claims_dir: Path, patterns: list[str] | None, tier: str | None):
    from trades_repro.claimkinds import TIERS
    from trades_repro.claims import ClaimsError, load_catalogue

    catalogue = load_catalogue(claims_dir)
    entries = catalogue.select(patterns, tier)
    matching = catalogue.select(patterns) if patterns else []
    unmatched = [p for p in patterns or () if p != "all" and not catalogue.select([p])]
    if unmatched:  # a typo beside a good pattern must not pass unnoticed
        shown = " ".join(repr(p) for p in unmatched)  # '' is a pattern too
        raise ClaimsError(f"no claim matches {shown} in {claims_dir}")
    if patterns and not entries:
        have = sorted({t for e in matching for t in catalogue.tiers_of(e)}, key=TIERS.index)
        shown = " ".join(repr(p) for p in patterns)
        raise ClaimsError(f"no claim matching {shown} has the '{tier}' tier "
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

    Exit 0 every judged claim held (claims not run are not judged), 1 one failed, 2 bad
    input, 3 none failed but some could not be decided (undetermined, or incomplete without
    --allow-partial), no claim has the tier, or no evidence: not one claim could be judged."""
    from trades_repro.errors import Inconclusive

    _folder_option("--runs-dir", runs_dir, writes=False)
    _file_option("--report", report)
    _file_option("--junit", junit)
    judgements, titles = _judge(patterns, _tier(tier), runs_dir, claims_dir, allow_partial,
                                must_exist=True)  # a typo would read as "no evidence" (3)
    if not judgements:  # nothing judged is not "every claim held"
        raise Inconclusive(f"no claim in {claims_dir} has the '{tier}' tier: nothing judged")
    _report(judgements, titles, tier, runs_dir, report, junit)
    _exit_for(judgements)


def _runs_to_read(runs_dir: Path) -> None:
    """Exit 2 (one line) unless `runs_dir` is an existing folder: a command that only reads
    runs would take a mistyped one for an empty one."""
    _folder_option("--runs-dir", runs_dir, writes=False)
    if not runs_dir.is_dir():
        raise BadInput(f"--runs-dir {runs_dir}: no such folder")


def _exit_for(judgements, run_failed: bool = False, elsewhere=()) -> None:
    """1 when a claim (or a run) failed; 3 when none did but some claims are undetermined or
    incomplete (judged only with --allow-partial: found, but not decided), or wait for runs
    another launch (`elsewhere`) is training. Claims not run are not judged."""
    from trades_repro.errors import Inconclusive

    if run_failed or any(j.status == "failed" for j in judgements):
        raise typer.Exit(EXIT_FAILED)
    if not judgements:
        raise Inconclusive("no claim was selected at this tier: nothing judged")
    if elsewhere and any(j.status != "held" for j in judgements):
        raise Inconclusive(f"{len(elsewhere)} run(s) are being trained by another launch "
                           f"({_who(elsewhere)}); follow them with `trades-repro status`")
    undetermined = [j.id for j in judgements if j.status == "undetermined"]
    if undetermined:
        raise Inconclusive(f"{len(undetermined)} claim(s) undetermined: "
                           f"{', '.join(undetermined[:5])}")
    if judgements and all(j.status in ("not run", "incomplete") for j in judgements):
        raise Inconclusive(f"no evidence: none of the {len(judgements)} claim(s) could be "
                           "judged (not run or incomplete); run-claim trains what they need")
    incomplete = [j.id for j in judgements if j.status == "incomplete"]
    if incomplete:
        raise Inconclusive(f"{len(incomplete)} claim(s) incomplete (seeds missing; "
                           f"--allow-partial judges them): {', '.join(incomplete[:5])}")


def _who(runs) -> str:
    """The first few runs' holders: 'vm pid 12, job 77_0; …'."""
    shown = "; ".join(r.elsewhere for r in runs[:3])
    return shown + ("; …" if len(runs) > 3 else "")


def _judge(patterns, tier, runs_dir, claims_dir, allow_partial, must_exist=False):
    from trades_repro.verify import Context, Evidence, judge_all

    catalogue, entries = _selected(claims_dir, patterns, tier)  # typos in patterns first
    if must_exist:
        _runs_to_read(runs_dir)
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
        help="slurm: per-run limit as sbatch reads it: minutes, MM:SS, HH:MM:SS, "
        "D-HH, D-HH:MM or D-HH:MM:SS.",
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
    _file_option("--report", report, writes=not dry_run)
    _file_option("--junit", junit, writes=not dry_run)
    catalogue, entries = _selected(claims_dir, patterns, tier)
    runs = runclaim.plan(catalogue, entries, tier, runs_dir)
    device_kind = device_kind or ("h100" if tier in runclaim.GPU_TIERS else "cpu")
    if device_kind not in DEVICE_KINDS:
        raise ClaimsError(f"--device-kind: unknown {device_kind!r}; known: "
                          f"{', '.join(DEVICE_KINDS)}")
    overrides = {"jobs": jobs, "jobs_per_gpu": jobs_per_gpu, "partition": partition,
                 "time": int(time) if time and time.isdigit() else time, "gpus": gpus,
                 "cpus": cpus, "mem_gb": mem_gb, "account": account, "qos": qos}
    # checked before the plan is shown: a dry run refuses what the real run would
    chosen = executors.build(executor, runs_dir, progress=not quiet, overrides=overrides,
                             config=executors.load_config(executor_config),
                             check_commands=not dry_run)
    _print_plan(runs, entries, tier, device_kind)
    if dry_run:
        _print_arms(runs, device_kind)
        return
    on_cluster = isinstance(chosen, executors.Slurm) and chosen.config.cluster == "slurm"
    submit_only = isinstance(chosen, executors.Slurm) and not chosen.config.wait
    if not on_cluster:  # a SLURM login node has no GPU, waiting or not; its jobs do
        runclaim.require_device(tier, runs)
    _set_threads(None, None)  # one CPU thread unless CUDA: see _set_threads
    say = _progress(quiet)
    with runclaim.properties_alongside(entries, runs_dir, say):
        failures = runclaim.execute(runs, runs_dir, report=say, progress=not quiet,
                                    executor=chosen, retry_failed=retry_failed)
    if submit_only:
        _after_submit(patterns, tier, runs_dir, failures,
                      [r for r in runs if r.state in runclaim.ELSEWHERE])
        return
    ids = [e.id for e in entries]
    judgements, titles = _judge(ids, tier, runs_dir, claims_dir, False)
    report = report or runs_dir / f"report_{tier}.md"
    _report(judgements, titles, tier, runs_dir, report, junit)
    for run, error in failures:
        typer.echo(f"run {run.digest} failed: {error}", err=True)
    _exit_for(judgements, run_failed=bool(failures),
              elsewhere=runclaim.taken_elsewhere(runs, runs_dir))


def _after_submit(patterns, tier: str, runs_dir: Path, failures, elsewhere) -> None:
    """Submitted, not judged: say what was left to other launches, how to follow and judge;
    exit 1 if some failed before."""
    from trades_repro.runclaim import describe_elsewhere

    if elsewhere:  # not submitted again: a relaunch submits only what nobody has
        typer.echo(f"{len(elsewhere)} run(s) left to other launches "
                   f"({describe_elsewhere(elsewhere)}): {_who(elsewhere)}")
    which = " ".join(repr(p) for p in patterns or ["all"])
    typer.echo(f"follow: trades-repro status {which} --tier {tier} --runs-dir {runs_dir}")
    typer.echo(f"judge when done: trades-repro verify {which} --tier {tier} "
               f"--runs-dir {runs_dir}")
    _exit_if_failed([f"{run.digest} failed: {error}" for run, error in failures])


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
                               progress=not quiet, config=executors.load_config(None),
                               overrides={"jobs": jobs} if jobs > 1 else None)
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
    from rich.markup import escape
    from rich.table import Table

    from trades_repro import status as statuslib

    catalogue, entries = _selected(claims_dir, patterns, tier and _tier(tier))  # typos first
    _runs_to_read(runs_dir)  # a typo would read as "nothing started"
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
    for row in rows:  # escaped: "[stale lock: …]" and "[step 12]" read as rich markup
        notable = [statuslib.describe(r) for r in row.runs if r.state != "done"]
        cells = (row.claim, row.tier, row.arm, *map(str, row.counts().values()),
                 "\n".join(notable))
        table.add_row(*map(escape, cells))
    Console(width=max(160, Console().width)).print(table)


def _print_plan(runs, entries, tier: str, device_kind: str) -> None:
    from collections import Counter

    from trades_repro.runclaim import estimate_hours

    states = Counter(r.state for r in runs)
    props = sum(e.claim.kind == "property" for e in entries)
    hours, missing = estimate_hours(runs, device_kind)
    console = Console()
    console.print(f"{len(entries)} claims at tier {tier}: {len(runs)} runs "
                  f"({_counts(states)}), {props} property tests", highlight=False,
                  soft_wrap=True)
    where = "GPU" if device_kind != "cpu" else "CPU"
    amount = f"{hours:.1f} h" if hours >= 1 else f"{60 * hours:.0f} min"
    console.print(f"estimated {where} time ({device_kind}, spec/costs.yaml): {amount}"
                  + (f"; no cost entry for {', '.join(missing)}" if missing else ""),
                  highlight=False, soft_wrap=True)


def _counts(states) -> str:
    """'2 finished, 0 to evaluate, 0 to resume, 1 to train', then the other states there are."""
    text = (f"{states['done']} finished, {states['evaluate']} to evaluate, "
            f"{states['resume']} to resume, {states['train']} to train")
    others = (("failed", "failed before"), ("running", "being trained elsewhere"),
              ("queued", "queued in SLURM"))
    return text + "".join(f", {states[s]} {what}" for s, what in others if states[s])


def _print_arms(runs, device_kind: str) -> None:
    from rich.table import Table

    from trades_repro.runclaim import by_arm

    table = Table(title="runs per arm", title_justify="left")
    for column in ("arm", "runs", "pending", f"est. hours ({device_kind})"):
        table.add_column(column)
    for arm, n, pending, hours in by_arm(runs, device_kind):
        table.add_row(arm, str(n), str(pending), f"{hours:.1f}")
    Console().print(table)

