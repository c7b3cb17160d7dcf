"""The CLI surface: schema/show, and bad input as one line on stderr with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from factories import assert_one_line_error
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from trades_repro.cli import app

SPEC_DIR = Path(__file__).resolve().parents[1] / "spec"
runner = CliRunner()


def test_spec_schema_is_json_with_the_spec_sections():
    result = runner.invoke(app, ["spec", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert {"data", "model", "method", "optim", "validation", "monitor", "seed"} <= set(
        schema["properties"]
    )


def test_spec_show_prints_resolved_spec_and_digest():
    result = runner.invoke(app, ["spec", "show", str(SPEC_DIR / "digits.yaml")])
    assert result.exit_code == 0, result.output
    body, digest_line = result.stdout.rsplit("digest: ", 1)
    resolved = json.loads(body)
    assert resolved["data"]["dataset"] == "digits"
    assert resolved["optim"]["momentum"] == 0.9  # a default filled in
    assert len(digest_line.strip()) == 16


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("seed: 1\nmethod: {beta: 3\n", "malformed YAML"),
        ("data: {dataset: digits, colour: red}", "data.colour"),
        ("optim: {epochs: many}", "optim.epochs"),
        ("method: {attack: {eps: -8/255}}", "method.attack.eps"),
        ("optim: {batch_size: 0}", "optim.batch_size"),
        ("data: {dataset: imagenet}", "data.dataset"),
    ],
)
@pytest.mark.parametrize("command", ["train", "show"])
def test_bad_spec_exits_2_naming_file_and_field(tmp_path, text, needle, command):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    args = ["train", str(path), "--runs-dir", str(tmp_path)] if command == "train" else [
        "spec", "show", str(path)
    ]
    assert_one_line_error(runner.invoke(app, args), "bad.yaml", needle)


def test_missing_spec_file(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "absent.yaml")])
    assert_one_line_error(result, "absent.yaml", "not found")


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "tinyimagenet"])
def test_dataset_root_without_files(tmp_path, dataset):
    path = tmp_path / "spec.yaml"
    empty = tmp_path / "empty"
    empty.mkdir()
    path.write_text(f"data: {{dataset: {dataset}, root: {empty}}}\ndevice: cpu\n")
    result = runner.invoke(app, ["train", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert_one_line_error(result, "data.root", str(empty))
    assert not (tmp_path / "runs").exists()  # nothing written for a run that never started


def test_exit_codes_are_documented_in_help():
    text = " ".join(runner.invoke(app, ["diagnose", "--help"], terminal_width=200).stdout.split())
    for needle in ("Exit 0 not overestimated", "1 overestimated", "2 bad input",
                   "3 inconclusive", "4 the evaluation itself failed"):
        assert needle in text, needle


def test_no_option_help_is_swallowed_by_rich_markup():
    """Typer renders help with Rich, which takes `[...]` as markup and drops it: a help text
    '[default: 1 on CPU]' showed as 'CPU threads for torch .'."""
    command = typer.main.get_command(app)
    texts = [(f"{name} {param.name}", param.help or "")
             for name, sub in _commands(command) for param in sub.params
             if param.param_type_name == "option"]
    assert texts
    assert not [where for where, text in texts if "[" in text], texts


def _commands(group, prefix=""):
    for name, sub in group.commands.items():
        if hasattr(sub, "commands"):
            yield from _commands(sub, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", sub


def test_train_eval_batch_below_one_is_one_line_bad_input_before_any_training(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("data: {dataset: digits}\nmodel: {arch: small_cnn}\ndevice: cpu\n")
    result = runner.invoke(app, ["train", str(spec), "--runs-dir", str(tmp_path / "runs"),
                                 "--eval-batch", "0"])
    assert_one_line_error(result, "--eval-batch 0")
    assert not (tmp_path / "runs").exists()  # refused before a run folder or an epoch


@pytest.mark.parametrize("command", [
    ["evaluate", "{run}"],
    ["diagnose", "{run}/best.safetensors", "--dataset", "digits"],
])
def test_evaluate_and_diagnose_refuse_eval_batch_below_one_as_the_option(tmp_path, command):
    # the run folder need not even exist: the option is refused first, and named, not
    # reported as a bad spec.json field (evaluation.batch_size) as it was
    args = [a.format(run=tmp_path / "missing_run") for a in command]
    result = runner.invoke(app, [*args, "--eval-batch", "0"])
    assert_one_line_error(result, "--eval-batch 0")


def test_every_command_help_is_reflowed_paragraphs():
    """Rich prints a help text's line breaks as they are: a docstring paragraph wrapped at
    the source's width came out ragged in `--help` and cut mid-sentence in a group's
    command listing (which shows the first paragraph)."""
    command = typer.main.get_command(app)
    helps = {name: sub.help or "" for name, sub in _commands(command)}
    helps |= {name: sub.help or "" for name, sub in command.commands.items()
              if hasattr(sub, "commands")}
    assert len(helps) >= 14
    assert not {name: text for name, text in helps.items() if not text}
    assert not {name: text for name, text in helps.items()
                if any("\n" in paragraph for paragraph in text.split("\n\n"))}
    diagnose = " ".join(runner.invoke(app, ["diagnose", "--help"], terminal_width=200)
                        .stdout.split())
    assert "1 overestimated (it lies at or above)" in diagnose


CLAIMS = str(SPEC_DIR.parent / "claims")
SWEEP = str(SPEC_DIR / "sweeps" / "digits_eps0p2.yaml")
FOLDER_OPTIONS = [  # (command, the option that names a folder)
    (["train", str(SPEC_DIR / "digits.yaml")], "--runs-dir"),
    (["verify", "--claims-dir", CLAIMS], "--runs-dir"),
    (["run-claim", "instant.*", "--claims-dir", CLAIMS], "--runs-dir"),
    (["run-claim", "instant.*", "--claims-dir", CLAIMS, "--dry-run"], "--runs-dir"),
    (["status", "--claims-dir", CLAIMS], "--runs-dir"),
    (["claims", "list", "--claims-dir", CLAIMS], "--runs-dir"),
    (["demo", "--claims-dir", CLAIMS], "--runs-dir"),
    (["study", "sweep", SWEEP], "--runs-dir"),
    (["study", "probe", SWEEP], "--runs-dir"),
    (["study", "report", "--out", "{tmp}/report.md"], "--evidence"),
    (["diagnose", "{tmp}/absent.pt", "--dataset", "digits", "--model", "small_cnn"], "--out"),
]
FILE_OPTIONS = [  # (command, the option that names a file the command writes)
    (["verify", "--claims-dir", CLAIMS, "--runs-dir", "{tmp}"], "--report"),
    (["verify", "--claims-dir", CLAIMS, "--runs-dir", "{tmp}"], "--junit"),
    (["run-claim", "instant.*", "--claims-dir", CLAIMS, "--runs-dir", "{tmp}/runs"], "--report"),
    (["run-claim", "instant.*", "--claims-dir", CLAIMS, "--runs-dir", "{tmp}/runs"], "--junit"),
    (["demo", "--claims-dir", CLAIMS, "--runs-dir", "{tmp}/runs"], "--plot"),
    (["study", "report", "--evidence", "{tmp}"], "--out"),
]


def _args(command: list[str], tmp_path: Path) -> list[str]:
    return [a.format(tmp=tmp_path) for a in command]


@pytest.mark.parametrize(("command", "option"), FOLDER_OPTIONS)
@pytest.mark.parametrize("under", [False, True])
def test_a_folder_option_naming_a_file_is_one_line_bad_input(tmp_path, command, option, under):
    """`--runs-dir FILE` trained nothing and exited 4 ("train failed unexpectedly:
    NotADirectoryError"), as if our code had crashed; a mistyped folder is bad input."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    folder = afile / "runs" if under else afile
    result = runner.invoke(app, [*_args(command, tmp_path), option, str(folder)])
    why = f"{afile} is a file" if under else "not a folder"
    assert_one_line_error(result, f"{option} {folder}", why)
    assert result.stderr == f"error: {option} {folder}: {why}\n"
    assert afile.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


@pytest.mark.parametrize(("command", "option"), FILE_OPTIONS)
@pytest.mark.parametrize("target", ["afile/out.png", "adir"])
def test_an_output_file_option_that_cannot_be_written_is_one_line_bad_input(
        tmp_path, command, option, target):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    path = tmp_path / target
    result = runner.invoke(app, [*_args(command, tmp_path), option, str(path)])
    why = f"{tmp_path / 'afile'} is a file" if "/" in target else "a folder, not a file"
    assert_one_line_error(result, f"{option} {path}", why)
    assert result.stderr == f"error: {option} {path}: {why}\n"
    assert not (tmp_path / "runs").exists()  # refused before any run


def test_a_runs_dir_where_nothing_may_be_written_is_refused_before_training(
        tmp_path, monkeypatch):
    """As root every folder is writable, so the refusal is shown with os.access answering
    as it would for a user without write permission on tmp_path."""
    import os

    def access(path, mode):  # tmp_path can be searched, not written
        return Path(path) != tmp_path or not mode & os.W_OK

    monkeypatch.setattr(os, "access", access)
    result = runner.invoke(app, ["train", str(SPEC_DIR / "digits.yaml"),
                                 "--runs-dir", str(tmp_path / "runs")])
    assert_one_line_error(result, f"{tmp_path} is not writable")
    report = runner.invoke(app, ["verify", "--claims-dir", CLAIMS, "--report",
                                 str(tmp_path / "report.md")])
    assert_one_line_error(report, f"--report {tmp_path / 'report.md'}: {tmp_path} is not "
                          "writable")
    (tmp_path / "evidence").mkdir()
    reading = runner.invoke(app, ["verify", "--claims-dir", CLAIMS, "--runs-dir",
                                  str(tmp_path / "evidence")])
    assert reading.exit_code == 3  # reading commands need no write permission


@pytest.mark.parametrize("value", ["0", "-2", "two"])
@pytest.mark.parametrize("command", [
    ["diagnose", "{tmp}/w.pt", "--dataset", "digits", "--model", "small_cnn"],
    ["train", str(SPEC_DIR / "digits.yaml"), "--runs-dir", "{tmp}/runs"]])
def test_threads_below_one_is_refused_not_turned_into_one(tmp_path, value, command):
    """`--threads 0` ran silently on one thread."""
    args = [a.format(tmp=tmp_path) for a in command]
    result = runner.invoke(app, [*args, "--threads", value])
    assert result.exit_code == 2
    assert "--threads" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_an_existing_output_file_may_be_written_over(tmp_path):
    """A report from an earlier run is replaced, not refused as 'not a folder'."""
    report = tmp_path / "report.md"
    report.write_text("an earlier report")
    (tmp_path / "runs").mkdir()
    result = runner.invoke(app, ["verify", "instant.*", "--claims-dir", CLAIMS, "--runs-dir",
                                 str(tmp_path / "runs"), "--tier", "instant",
                                 "--report", str(report)])
    assert result.exit_code == 3, result.output  # no evidence: judged, written, exit 3
    assert report.read_text() != "an earlier report"


def test_a_path_with_no_existing_ancestor_is_not_blocked(monkeypatch):
    from trades_repro import cli

    monkeypatch.setattr(Path, "exists", lambda self: False)  # e.g. a deleted working folder
    assert cli._blocked(Path("a/b"), writes=True) is None
    assert cli._blocked(Path("a/b.md"), writes=True, file=True) is None


def test_help_paragraphs_are_joined_and_kept_apart():
    from trades_repro import cli

    assert cli._reflowed("One\n    two  three.\n\nFour\nfive.") == "One two three.\n\nFour five."


def test_a_closed_pipe_is_seen_and_silenced(monkeypatch):
    """The in-process half of the pipe test in test_exit_codes.py: which stream lost its
    reader, and that writing to it afterwards goes nowhere instead of failing."""
    import io
    import os
    import sys

    from trades_repro import cli

    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = io.TextIOWrapper(io.FileIO(write_end, "w", closefd=False))
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # no fileno: skipped, stderr still seen
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        assert cli._readers_gone() == [write_end]
        monkeypatch.setattr(sys, "stdout", stream)
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        assert cli._readers_gone() == [write_end]
        stop = cli._stop_quietly([write_end])
        assert stop.exit_code == 141
        assert os.write(write_end, b"after") == 5  # /dev/null now
        assert cli._readers_gone() == []
    finally:
        os.close(write_end)


names = st.sampled_from(["a", "b", "c"])
relative_paths = st.lists(names, min_size=1, max_size=3).map(lambda parts: Path(*parts))


def _build(root: Path, tree: dict[Path, str]) -> None:
    for path, kind in sorted(tree.items(), key=lambda item: len(item[0].parts)):
        try:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).mkdir() if kind == "folder" else (root / path).write_text("x")
        except OSError:
            continue  # a shorter path of the tree took this place first


def _mkdir_fails(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return True
    return False


def _write_fails(path: Path) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.open("a").close()
    except OSError:
        return True
    return False


def _file_refused(path: Path) -> bool:
    from trades_repro import cli
    from trades_repro.errors import BadInput

    try:
        cli._file_option("--out", path)
    except BadInput:
        return True
    return False


@given(tree=st.dictionaries(relative_paths, st.sampled_from(["file", "folder"]), max_size=5),
       target=relative_paths)
def test_a_folder_is_blocked_exactly_when_it_cannot_be_made(tree, target):
    """Against the file system itself: `_blocked` finds a problem with a folder exactly when
    `mkdir -p` fails, and `_file_option` one with a file exactly when writing it fails."""
    import tempfile

    from trades_repro import cli

    with tempfile.TemporaryDirectory() as tmp:
        _build(Path(tmp), tree)
        path = Path(tmp) / target
        assert (cli._blocked(path, writes=True) is not None) == _mkdir_fails(path)
    with tempfile.TemporaryDirectory() as tmp:
        _build(Path(tmp), tree)
        path = Path(tmp) / target
        assert _file_refused(path) == _write_fails(path)


def test_without_poll_a_broken_pipe_is_not_taken_for_a_closed_reader(monkeypatch):
    import select

    from trades_repro import cli

    monkeypatch.delattr(select, "poll")
    assert cli._readers_gone() == []


@pytest.mark.parametrize("first", ["trades_repro.cli", "trades_repro.cli_claims",
                                   "trades_repro.cli_study"])
def test_every_command_is_registered_whichever_module_is_imported_first(first):
    """The claims and study commands register themselves on cli.app; a circular import
    between them (cli_study importing from a half-imported cli_claims) failed at import."""
    import subprocess
    import sys

    code = (f"import importlib, typer; importlib.import_module({first!r})\n"
            "from trades_repro.cli import app\n"
            "print(' '.join(sorted(typer.main.get_command(app).commands)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["claims", "demo", "diagnose", "evaluate", "run-claim",
                                   "spec", "status", "study", "train", "verify"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_where_no_folder_can_be_made_is_refused_before_the_work(tmp_path):
    # root passes every permission check, yet nothing can be made under /proc
    result = runner.invoke(app, ["train", str(SPEC_DIR / "digits.yaml"),
                                 "--runs-dir", "/proc/nope/runs"])
    assert_one_line_error(result, "--runs-dir /proc/nope/runs: nothing can be made in /proc: "
                          "No such file or directory")
    long_name = tmp_path / ("a" * 300) / "report.md"
    result = runner.invoke(app, ["verify", "--claims-dir", CLAIMS, "--report", str(long_name)])
    assert_one_line_error(result, "--report")
    assert result.stderr.strip().endswith("not a usable path: File name too long")
    result = runner.invoke(app, ["train", str(SPEC_DIR / "digits.yaml"), "--runs-dir",
                                 str(long_name.parent)])
    assert result.stderr.strip().endswith("not a usable path: File name too long")
    deep = tmp_path / ("a" * 200) / ("b" * 300)  # the missing first name hides the long one
    result = runner.invoke(app, ["train", str(SPEC_DIR / "digits.yaml"), "--runs-dir",
                                 str(deep)])
    assert_one_line_error(result, "a name in it is longer than the file system's 255 bytes")
    assert not list(tmp_path.iterdir())  # the probe leaves nothing behind


def test_a_dry_run_refuses_the_options_the_real_run_would(tmp_path):
    for options in (["--executor", "bogus"], ["--executor", "slurm", "--time", "abc"],
                    ["--executor-config", str(tmp_path / "absent.yaml")]):
        result = runner.invoke(app, ["run-claim", "--claims-dir", CLAIMS, "--tier", "instant",
                                     "--runs-dir", str(tmp_path / "runs"), "--dry-run",
                                     *options])
        assert result.exit_code == 2, (options, result.output)
    sweep = next((SPEC_DIR / "sweeps").glob("*.yaml"))
    for shard in ("2/1", "0/0", "a/b"):
        result = runner.invoke(app, ["study", "sweep", str(sweep), "--dry-run", "--shard", shard,
                                     "--runs-dir", str(tmp_path / "runs")])
        assert_one_line_error(result, f"--shard {shard!r}: expected K/N with 0 <= K < N")


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_option_out_of_range_is_the_options_fault(tmp_path, seed):
    # it used to reach the run's spec and blame spec.json's evaluation.seed
    for command in ("evaluate", "diagnose"):
        result = runner.invoke(app, [command, str(tmp_path), "--seed", seed])
        assert result.exit_code == 2 and "--seed" in result.output, result.output
        assert "spec.json" not in result.output


def test_an_executor_config_that_is_not_utf8_exits_2_naming_it(tmp_path):
    config = tmp_path / "slurm.yaml"
    config.write_bytes(b"\xff\xfe slurm")
    result = runner.invoke(app, ["run-claim", "--claims-dir", CLAIMS, "--tier", "instant",
                                 "--dry-run", "--executor-config", str(config)])
    assert_one_line_error(result, f"--executor-config: {config}: not UTF-8 text")


def test_a_name_of_the_file_systems_longest_length_is_fine(tmp_path):
    from trades_repro.cli import _blocked

    assert _blocked(tmp_path / "a" / ("b" * 255), writes=True) is None
    assert _blocked(tmp_path / "a" / ("b" * 256), writes=True) == (
        "a name in it is longer than the file system's 255 bytes")



def test_progress_lines_and_verification_cells_print_brackets_verbatim(capsys):
    """rich read "[step 12]" as a markup tag and dropped it from progress lines and tables."""
    from rich.console import Console as RichConsole

    from trades_repro.cli import _progress
    from trades_repro.report import print_tables
    from trades_repro.verify import Judgement

    _progress(False)("loss is nan at epoch 3 [step 12]")
    assert "loss is nan at epoch 3 [step 12]" in capsys.readouterr().err
    judged = Judgement(id="t.c", artefact="t", kind="table_cell", tier="cpu", status="failed",
                       paper="[bold]8[/bold]", detail="0 of 5 runs [no weights]")
    console = RichConsole(record=True, width=200)
    print_tables(console, [judged], {})
    text = console.export_text()
    assert "[bold]8[/bold]" in text and "[no weights]" in text


@pytest.mark.parametrize(("option", "threads"), [([], 1), (["--threads", "2"], 2)])
def test_train_on_a_cpu_takes_one_thread_unless_told(tmp_path, monkeypatch, option, threads):
    """`train` ran with torch's default thread count while run-claim, demo and study take
    one: on a CPU the same digest then gave other numbers (metrics.jsonl differed from its
    first line), and a run `train` finished was later judged by run-claim as its own."""
    import torch

    from trades_repro import train as training

    seen = []

    class Done:
        skipped, records, run_dir = True, [], tmp_path / "runs" / "x"

    monkeypatch.setattr(training, "train",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or Done())
    spec = tmp_path / "spec.yaml"
    spec.write_text("data: {dataset: digits}\nmodel: {arch: small_cnn}\ndevice: cpu\n")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        result = runner.invoke(app, ["train", str(spec), "--runs-dir",
                                     str(tmp_path / "runs"), *option])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    assert seen == [threads]
