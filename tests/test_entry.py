"""The executable around the commands (`trades_repro.entry`): click's own exits, kept to the
contract. Real processes and real pipes: CliRunner never runs this code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "trades_repro"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_the_console_script_is_the_entry_point():
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.scripts]\ntrades-repro = "trades_repro.entry:run"\n' in text


@pytest.mark.parametrize(("args", "needle"), [
    (["bogus"], "error: No such command 'bogus'. (see 'trades-repro --help')"),
    (["train"], "error: Missing argument 'spec_file'. (see 'trades-repro train --help')"),
    (["run-claim", "--jobs", "0", "--dry-run"], "error: Invalid value for '--jobs'"),
    (["spec", "show", "x.yaml", "--nope"], "error: No such option: --nope"),
])
def test_usage_errors_are_one_line_and_exit_2(args, needle):
    result = _run(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(needle), result.stderr
    assert "╭" not in result.stderr


def test_help_exits_0_and_without_a_command_2():
    assert _run("--help").returncode == 0
    assert _run().returncode == 2


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_help_into_a_closed_pipe_stops_with_141(args):
    # the reader is gone before a word is written, as with `trades-repro --help | true`
    shell = f"{' '.join(CLI)} {' '.join(args)} | true; exit ${{PIPESTATUS[0]}}"
    assert subprocess.run(["bash", "-c", shell], timeout=120).returncode == 141


def test_an_error_line_into_a_closed_pipe_stops_with_141():
    shell = f"{' '.join(CLI)} bogus 2>&1 | true; exit ${{PIPESTATUS[0]}}"
    assert subprocess.run(["bash", "-c", shell], timeout=120).returncode == 141


def test_a_broken_install_is_one_line_naming_a_log_and_exit_4(tmp_path):
    code = ("import sys; sys.modules['trades_repro.cli'] = None; "
            "from trades_repro.entry import main; sys.exit(main(['--help']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 4
    line, = result.stderr.strip().splitlines()
    assert line.startswith("error: trades-repro could not start: ModuleNotFoundError: import of "
                           "trades_repro.cli halted")
    log = Path(line.rsplit("(traceback in ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()
    log.unlink()


def test_an_unexpected_error_outside_the_commands_exits_4_not_1(monkeypatch, capsys):
    from trades_repro import entry

    def broken(*args, **kwargs):
        raise RuntimeError("typer changed under us")

    monkeypatch.setattr("typer.main.get_command", lambda app: type(
        "Command", (), {"make_context": broken})())
    assert entry.main(["--help"]) == 4
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: trades-repro failed unexpectedly: RuntimeError: typer "
                           "changed under us (traceback in ")
    Path(line.rsplit("(traceback in ", 1)[1].rstrip(")")).unlink()
